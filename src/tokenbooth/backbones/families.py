"""Defaults per backbone family, for training and for sampling: the one table that decides them.

Every caller (the CLI, the demo, the benchmarks, the web app) builds its configs from here through
`TrainConfig.for_family` and `SamplingConfig.for_family`; a flag the user gives overrides one entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

# The model every command, the demo and the web app use unless told otherwise: the bundled one, which runs on a
# laptop's CPU.
DEFAULT_MODEL = "mini"

# Images `generate` draws at once unless --batch-size says otherwise: memory grows with the batch (every image
# has its KV cache, twice with guidance), so the default is small: `generate`'s old single batch of 4, which a
# laptop's CPU holds with mini. `tokenbooth plan -n B` gives a large model's figure at batch B (Lumina-mGPT 7B 768
# with guidance, bf16: 17.1 GB at 1, 25.1 GB at 4). A family whose table entry names its own value uses that.
DEFAULT_SAMPLE_BATCH_SIZE = 4


@dataclass(frozen=True)
class FamilyDefaults:
    train: dict  # TrainConfig fields
    sample: dict  # SamplingConfig fields
    # What scores fidelity along a training run (its validation pictures against the references): "dino",
    # DreamBench's DINO ViT-S/16 from the Hugging Face cache; "toydino", the bundled encoder in DINO's role in
    # toyworld; or a ViT folder.
    fidelity: str = "dino"
    sample_batch_size: int = DEFAULT_SAMPLE_BATCH_SIZE  # images `generate` draws at once (its --batch-size)
    # The text of classifier-free guidance's unconditional row, in the prompt's template (Emu3); None: the
    # family's own unconditional prefix (Lumina-mGPT: the image header alone; Janus-Pro: the prompt padded out).
    negative_prompt: str | None = None
    # The dtype the weights are held in when a load names none; None: the checkpoint's own.
    weights_dtype: str | None = None


# Sun et al. 2025, Sec. 4.1, on Lumina-mGPT 7B: stage 1 lr 0.01 for about 1500 steps, stage 2 lr 5e-6 for
# about 70 steps on the Q/K/V projections of every layer, about 8 text-image pairs per step; sampling with
# classifier-free guidance 4.0 and image top-k 2000.
PAPER = FamilyDefaults(
    train=dict(stage1_steps=1500, stage1_lr=0.01, stage2_steps=70, stage2_lr=5e-6, batch_size=8),
    sample=dict(cfg_scale=4.0, image_top_k=2000),
)

FAMILIES: dict[str, FamilyDefaults] = {
    "lumina-mgpt": PAPER,
    # The paper reports no Janus-Pro settings; its Lumina-mGPT ones are the starting point for training
    # (both are Llama-style decoders trained with next-token cross-entropy on VQ codes). Sampling follows
    # DeepSeek's generation script (cfg_weight 5, the whole 16,384-code distribution).
    "janus-pro": FamilyDefaults(train=dict(PAPER.train), sample=dict(cfg_scale=5.0, image_top_k=16384)),
    # mini (v2, 64 px): tuned on toyworld's dev subjects (README, toy-bench), never on the test ones. Its
    # embeddings are ~50x smaller than Lumina-mGPT's and its layers 5M parameters, not 7B: stage 1 converges in
    # about 100 steps at the paper's lr (the loss moves little more after), and stage 2 at 2e-4 memorizes the
    # references in 60 steps and forgets the prompt (tried). Retuned after the third pretraining cycle
    # (docs/toybench/dev-tuning.md, tries E-H): stage 2 at 5e-5 then cost fidelity and prompts, 2e-5 added
    # fidelity over stage 1; guidance 2.0 kept dev fidelity of 3.0 and followed prompts far better (the paper's
    # 4.0 breaks mini's pictures into patches). Top-k 2000 is the whole 1024-code book; 256 and 64 changed nothing
    # beyond noise. Stage 1 at 3e-3 rather than the paper's 1e-2 (try J): at 1e-2 [V] ends 4-5x as long as a
    # word's embedding; at 3e-3 fidelity stayed and two-stage prompts came within 5% of the base model's.
    # 300 stage-1 steps gave less in every column (try I).
    "mini": FamilyDefaults(
        # bf16 matrix products over its fp32 weights: 2.5x faster on a CPU with AVX512-BF16.
        train=dict(stage1_steps=100, stage1_lr=3e-3, stage2_steps=60, stage2_lr=2e-5, batch_size=8,
                   compute_dtype="bfloat16"),
        sample=dict(cfg_scale=2.0, image_top_k=2000),
        fidelity="toydino",
        # fp32 master weights under the bf16 matrix products above, whatever a folder stores: a mini whose
        # transformer is saved in bf16 to fit the package (v3) trains and samples as an fp32 one, its weights
        # rounded once on disk (+0.0002 nats of held-out loss for v3, docs/mini-v3-pilot.md).
        weights_dtype="float32",
    ),
    # Emu3-Gen (BAAI, 8B). Sampling as BAAI's README ("Quickstart", image_generation.py): classifier-free
    # guidance 3.0 against its negative prompt, top-k 2048 (of 32,768 codes). Its "masterpiece, film grained,
    # best quality." suffix is a prompt the user may write, not part of the model's template. Training: ours,
    # published for no personalization of Emu3; the paper's Lumina-mGPT settings, by the same reasoning as for
    # Janus-Pro (a Llama-style decoder of the same size trained with next-token cross-entropy on VQ codes).
    # BAAI's own full fine-tuning (scripts/t2i_sft.sh) runs at lr 1e-5, the scale of the paper's stage 2 (5e-6).
    "emu3": FamilyDefaults(
        train=dict(PAPER.train),
        sample=dict(cfg_scale=3.0, image_top_k=2048),
        negative_prompt=("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                         "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                         "username, blurry."),
    ),
}


def family_defaults(family: str) -> FamilyDefaults:
    try:
        return FAMILIES[family]
    except KeyError:
        raise UserError(f"unknown backbone family {family!r} (known: {', '.join(FAMILIES)})") from None
