"""Default hyperparameters of the two-stage recipe, one entry per backbone family."""

from __future__ import annotations

DEFAULTS = {
    # Sun et al. 2025, Sec. 4.1, on Lumina-mGPT 7B: stage 1 lr 0.01 for about 1500 steps, stage 2 lr 5e-6
    # for about 70 steps on the Q/K/V projections of every layer, about 8 text-image pairs per step.
    "lumina-mgpt": dict(stage1_steps=1500, stage1_lr=0.01, stage2_steps=70, stage2_lr=5e-6, batch_size=8),
    # mini: tuned here so that `tokenbooth demo` learns a subject in a couple of minutes on 2 CPU cores.
    # Its embeddings are ~50x smaller than Lumina-mGPT's, hence the smaller stage-1 step; its layers are
    # 5M parameters, not 7B, hence a larger stage-2 step.
    "mini": dict(stage1_steps=250, stage1_lr=3e-3, stage2_steps=60, stage2_lr=2e-4, batch_size=8),
}
# The paper reports no Janus-Pro settings; its Lumina-mGPT ones are the starting point (both are Llama-style
# decoders trained with next-token cross-entropy on VQ codes).
DEFAULTS["janus-pro"] = dict(DEFAULTS["lumina-mgpt"])


def defaults_for(family: str) -> dict:
    return dict(DEFAULTS.get(family, DEFAULTS["lumina-mgpt"]))
