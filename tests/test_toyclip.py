"""toyCLIP, the small CLIP trained on toyworld: the metric code reads it as it reads real CLIP, and its
CLIP-I / CLIP-T tell a subject from its siblings and a right caption from a wrong one."""

import pytest

from tokenbooth.pretrain.toyclip import MODEL_DIR, RESOLUTION, discrimination_report

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(),
                                reason="toyCLIP not trained: python -m tokenbooth.pretrain.toyclip")

MARGIN = 0.02  # cosine similarity


@pytest.fixture(scope="module")
def report():
    return discrimination_report(MODEL_DIR, verbose=False)


def test_load_clip_reads_toyclip_with_its_tokenizer():
    from tokenbooth.eval.metrics import load_clip

    clip = load_clip(str(MODEL_DIR))
    assert clip.crop == RESOLUTION
    tokens = clip.tokenizer.tokenize("a red striped robot on the beach, on the left")
    assert tokens == ["a</w>", "red</w>", "striped</w>", "robot</w>", "on</w>", "the</w>", "beach</w>", ",</w>",
                      "on</w>", "the</w>", "left</w>"]


def test_clip_i_ranks_a_subject_above_its_same_class_siblings(report):
    assert report["clip_i_same_subject"] > report["clip_i_sibling"] + MARGIN


def test_clip_t_ranks_the_own_caption_above_another_background(report):
    assert report["clip_t_own"] > report["clip_t_other_background"] + MARGIN


def test_clip_t_ranks_the_own_caption_above_another_color(report):
    assert report["clip_t_own"] > report["clip_t_other_color"] + MARGIN
