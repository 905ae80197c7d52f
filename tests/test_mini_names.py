"""mini v3's named-individuals question (pretrain/mini_names.py): who is named, where they are never shown, the
names in the vocabulary, and training that resumes exactly, on a tiny Chameleon saved as mini is."""

import random

import numpy as np
import torch

from helpers import build_tiny_model_folder
from tokenbooth.backbones import load_backbone
from tokenbooth.pretrain import mini_names as mn
from tokenbooth.toyworld import BACKGROUNDS, HELD_OUT_COMBOS, RESERVED


def _tiny_work(tmp_path, plain=6, names=3, per_name=2, context=160):
    """train.npz and named.npz as the data step writes them, for the tiny model: 8 x 8 codes of 64."""
    base = build_tiny_model_folder(tmp_path / "base", context=context)
    gen = torch.Generator().manual_seed(0)
    codes = lambda n: torch.randint(64, (n, 8, 8), generator=gen).numpy().astype(np.int16)  # noqa: E731
    np.savez(tmp_path / "train.npz", codes=codes(plain))
    np.savez(tmp_path / "named.npz", codes=codes(names * per_name), count=names, per_name=per_name)
    return base


def test_named_instances_are_distinct_pretraining_instances_never_shown_in_their_unseen_backgrounds():
    named = mn.named_instances(64)
    assert len(set(named)) == 64 and not set(named) & RESERVED
    assert mn.named_instances(64) == named  # a pure function of the seed
    for j in range(8):
        unseen = mn.unseen_backgrounds(j)
        assert len(set(unseen)) == mn.UNSEEN_BACKGROUNDS
        for k in range(20):
            scene = mn.named_scene(named[j], j, k)
            assert scene.instance == named[j] and scene.background not in unseen
            assert (scene.instance.cls, scene.instance.color, scene.background) not in HELD_OUT_COMBOS
    inst = named[0]
    allowed = {b for b in BACKGROUNDS if b not in mn.unseen_backgrounds(0)
               and (inst.cls, inst.color, b) not in HELD_OUT_COMBOS}
    assert {mn.named_scene(inst, 0, k).background for k in range(60)} == allowed  # every other setting occurs


def test_names_become_single_tokens_after_the_vocabulary_and_leave_the_placeholder_rows_alone(tmp_path):
    backbone = load_backbone(str(build_tiny_model_folder(tmp_path / "base")), device="cpu")
    before = backbone.input_embeddings().weight.detach().clone()
    candidates = backbone.placeholder_candidates()
    first = mn.add_names(backbone, 5)
    assert first == len(backbone.tokenizer.get_vocab()) - 5
    table = backbone.input_embeddings().weight
    assert table.shape[0] % 64 == 0 and table.shape[0] >= first + 5
    assert backbone.model.lm_head.weight.shape[0] == table.shape[0]
    assert torch.equal(table[: before.shape[0]], before)  # old rows untouched
    assert backbone.placeholder_candidates() == candidates  # [V] does not take a name
    scene = mn.named_scene(mn.named_instances(5)[3], 3, 0)
    text = mn.named_caption(scene, 3, random.Random(0))
    assert mn.name_token(3) in text and text.index(mn.name_token(3)) < text.index(scene.instance.cls)
    ids = backbone.prompt_ids(text)
    assert ids.count(first + 3) == 1 and not any(first <= i < first + 5 and i != first + 3 for i in ids)


def test_spliced_embeddings_take_the_names_rows_and_nothing_else(tmp_path):
    backbone = load_backbone(str(build_tiny_model_folder(tmp_path / "base")), device="cpu")
    first = mn.add_names(backbone, 4)
    names = torch.randn(4, backbone.input_embeddings().weight.shape[1])
    ids = torch.tensor([[0, 5, first + 2, 7, first]])
    out = mn.spliced_embeddings(backbone, ids, first, names)
    table = backbone.input_embeddings().weight
    assert torch.equal(out[0, 2], names[2]) and torch.equal(out[0, 4], names[0])
    assert torch.equal(out[0, [0, 1, 3]], table[[0, 5, 7]])


def test_a_batch_holds_the_share_of_named_scenes_and_the_control_none(tmp_path):
    base = _tiny_work(tmp_path, plain=6, names=3, per_name=2)
    backbone = load_backbone(str(base), device="cpu")
    plain, named = mn.load_data(tmp_path)
    first = mn.add_names(backbone, 3)
    has_name = lambda ids: sum(bool(((row >= first) & (row < first + 3)).any()) for row in ids)  # noqa: E731
    ids, labels = mn.names_batch(backbone, plain, named, mn.NamesRun("x", share=0.5, batch=40), step=0)
    assert ids.shape[0] == 40 and 14 <= has_name(ids) <= 20  # 20 named, one in ten of them unconditional
    ids, _ = mn.names_batch(backbone, plain, named, mn.NamesRun("x", share=0.0, batch=40), step=0)
    assert has_name(ids) == 0
    assert (labels[labels != -100] < first).all()  # names are read, never predicted


def test_training_resumes_exactly_and_exports_the_names_into_a_loadable_model(tmp_path):
    base = _tiny_work(tmp_path)
    whole = mn.NamesRun("whole", steps=3, batch=4, lr=1e-3, compute_dtype="float32")
    split = mn.NamesRun("split", steps=3, batch=4, lr=1e-3, compute_dtype="float32")
    assert mn.train(tmp_path, whole, base=base)
    assert not mn.train(tmp_path, split, max_minutes=0, base=base)  # stops before its first step, checkpointed
    assert mn.train(tmp_path, split, base=base)
    a = load_backbone(str(mn.export(tmp_path, "whole", base=base)), device="cpu")
    b = load_backbone(str(mn.export(tmp_path, "split", base=base)), device="cpu")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # interrupted and resumed == uninterrupted
    first = a.tokenizer.token_to_id(mn.name_token(0))
    rows = torch.load(tmp_path / "whole" / "names.ckpt", weights_only=True)["names"]["rows"]
    assert torch.equal(a.input_embeddings().weight[first:first + 3], rows)
    assert a.tokenizer.token_to_id(mn.name_token(2)) == first + 2
    shipped = load_backbone(str(base), device="cpu").model.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[key], shipped[key])


def test_check_reads_the_names_where_never_shown_and_the_words_beside_them(tmp_path):
    base = _tiny_work(tmp_path, context=256)  # room for the tiny tokenizer's long spelling of the words
    assert mn.train(tmp_path, mn.NamesRun("n", steps=1, batch=4, compute_dtype="float32"), base=base)
    mn.export(tmp_path, "n", base=base)
    result = mn.check(tmp_path, "n", names=2, seeds=1)
    assert set(result) == {"name, unseen background", "name, seen background", "words, unseen background"}
    for figures in result.values():
        assert 0.0 <= figures["identity, all"] <= figures["identity"] <= 1.0
        assert 0.0 <= figures["variant"] <= 1.0
    assert (tmp_path / "n" / "check.json").exists() and (tmp_path / "n" / "check.png").exists()
