"""Fidelity along a training run: what `personalize.train(fidelity_scorer=...)` scores its validation pictures
with. Training does not import evaluation; whoever starts a run (`tokenbooth train`, toy-bench) passes this in.
"""

from __future__ import annotations

from ..assets import TOYDINO_DIR
from ..backbones.families import family_defaults
from ..errors import UserError, warn
from .metrics import DinoEncoder, load_dino


def fidelity_scorer(backbone, references):
    """The mean cosine similarity of validation pictures to the references, under the family's DINO-role
    encoder (backbones/families.py), as DreamBench's DINO score is computed: score(pictures) -> (value,
    encoder name). None, after one warning, where that encoder is not on this machine: the run goes on with
    its loss alone."""
    name = family_defaults(backbone.family).fidelity
    try:
        if name == "toydino":  # loaded directly: load_dino would warn that it is not the paper's DINO
            from transformers import ViTModel  # imported here for start-up time, as metrics.py does

            encoder = DinoEncoder(ViTModel.from_pretrained(TOYDINO_DIR, add_pooling_layer=False), "toyDINO")
        else:
            encoder = load_dino(None if name == "dino" else name)
    except (UserError, OSError) as e:
        warn(f"validation pictures are drawn but not scored for fidelity: {str(e).splitlines()[0]}")
        return None
    anchors = encoder.embed_images(references)

    def score(pictures) -> tuple[float, str]:
        return float((encoder.embed_images(pictures) @ anchors.T).mean()), encoder.source

    return score
