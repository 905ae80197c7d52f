"""Pretrain mini from scratch on toyworld, on a CPU: python -m tokenbooth.pretrain.mini all [--recipe v2|v3]

Six steps, each resumable and each skipped when its output exists:
  data         render the pretraining scenes (reserved subjects and held-out combinations never appear)
  vqgan        train the tiny VQGAN (L1 + L2 reconstruction + codebook loss, dead codes restarted)
  tokenizer    train the BPE text tokenizer on captions and lay out the Chameleon-style vocabulary
  transformer  encode every scene to VQ tokens once, then train the Chameleon transformer
  decoder      sharpen the VQGAN decoder (encoder and codebook frozen, so tokens stay valid)
  export       write the model folder that `--model mini` loads
Budget on 2 cores, alone: VQGAN about 40 min, encoding 10 min, transformer about 2.5 s a step (4800 steps, 3.3 h),
decoder 4 min: about 4.2 h in all. `--device cuda` runs the same steps on a GPU (the default when one is there).
`--recipe v3` (issue #23) trains on a tokenizer made by the pilot (`--vqgan`) and exports to <work>/model;
`--max-minutes` stops the transformer checkpointed, so a long run spreads over sessions.
The recipes and the data step live in mini_recipes.py, the VQGAN and decoder steps in mini_vqgan.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.chameleon import PROMPT_TEMPLATE, ChameleonBackbone
from ..backbones.chameleon_build import BPE_MERGES, chameleon_config, train_bpe_tokenizer
from ..errors import UserError
from ..io import atomic_path
from ..toyworld import caption
from .loop import load_checkpoint, log, resume, save_checkpoint, warmup_cosine, zero_denormals  # noqa: F401 (resume: re-exported)
from .mini_recipes import (  # noqa: F401 (re-exported: mini's names, read by the pilot, tests and benchmarks)
    MINI_SPEC, MODEL_DIR, RECIPES, RESOLUTION, V2, V3, VQGAN_CONFIG, WARMUP, Recipe, build_data, load_pixels,
    load_scenes,
)
from .mini_vqgan import finetune_decoder, restart_dead_codes, train_vqgan, use_trained_vqgan, vqgan_psnr  # noqa: F401


# --- text tokenizer and vocabulary ---------------------------------------------------------------------

def train_tokenizer(work: Path, recipe: Recipe = V2) -> None:
    if (work / "tokenizer.json").exists():
        return
    rng = random.Random(0)
    texts = [caption(s, rng) for s in load_scenes(work)[:20000]]
    texts += [PROMPT_TEMPLATE.format(w=RESOLUTION, h=RESOLUTION, prompt="")] * 1000
    tok = train_bpe_tokenizer(texts, recipe.vqgan.n_embed, BPE_MERGES)
    with atomic_path(work / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    log(f"tokenizer: {tok.get_vocab_size()} tokens")


# --- transformer ----------------------------------------------------------------------------------------

def new_backbone(work: Path, recipe: Recipe = V2, device: str = "cpu"):
    from tokenizers import Tokenizer
    from transformers import ChameleonForConditionalGeneration

    from ..vq import load_vqgan

    tokenizer = Tokenizer.from_file(str(work / "tokenizer.json"))
    torch.manual_seed(0)
    config = chameleon_config(tokenizer.get_vocab(), recipe.vqgan.n_embed, hidden=recipe.hidden, layers=recipe.layers,
                              heads=recipe.heads, context=recipe.context, resolution=RESOLUTION)
    model = ChameleonForConditionalGeneration(config).to(device)
    return ChameleonBackbone("mini", model, tokenizer, load_vqgan(work / "vqgan"), recipe.spec)


@torch.no_grad()
def encode_dataset(work: Path, backbone) -> torch.Tensor:
    path = work / "codes.npy"
    if not path.exists():
        log("encoding every scene to VQ tokens once")
        pixels = load_pixels(work)
        codes = torch.cat([backbone.encode_images(chunk) for chunk in pixels.split(500)])
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, codes.numpy().astype(np.int16))
    return torch.from_numpy(np.load(path).astype(np.int64))


def training_batch(backbone, scenes, codes, indices, step: int):
    """Sequences of prompt + image block; loss only on the image block. One in ten has no text at all,
    which teaches the unconditional branch that classifier-free guidance needs."""
    seqs, labels = [], []
    for i in indices:
        rng = random.Random(f"{step}:{i}")  # captions vary across epochs yet resume exactly
        seq, lab = pretraining_sequence(backbone, codes[i], None if rng.random() < 0.1 else caption(scenes[i], rng))
        seqs.append(seq)
        labels.append(lab)
    return pad_batch(seqs, labels, backbone.model.config.pad_token_id)


def pretraining_sequence(backbone, codes: torch.Tensor, prompt: str | None) -> tuple[list[int], list[int]]:
    """One picture's (rows, cols) codes after its prompt (None: the unconditional header) and its labels: the
    image block and trailer, nothing on the prompt."""
    body = backbone.layout.body_from_codes(codes[None])[0].tolist() + list(backbone.layout.trailer)
    prefix = backbone.unconditional_ids() if prompt is None else backbone.prompt_ids(prompt)
    return prefix + body, [-100] * len(prefix) + body


def pad_batch(seqs, labels, pad_id):
    """Right padding: with a causal mask, padding after the last real token is never attended to."""
    n = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (n - len(s)) for s in seqs])
    lab = torch.tensor([l + [-100] * (n - len(l)) for l in labels])
    return ids, lab


def sequence_loss(backbone, ids, labels):
    """Full-vocabulary next-token loss over the whole image block, structure tokens and trailer included:
    pre-training teaches the layout too, as Lumina-mGPT's own training does (personalization scores codes only).
    Matrix products run in bfloat16 (2.7x faster on a CPU with AVX512-BF16), weights and the loss stay fp32."""
    losses, known = next_token_losses(backbone, ids, labels)
    return losses[known].mean()


def next_token_losses(backbone, ids, labels, compute_dtype=torch.bfloat16, inputs_embeds=None):
    """Each position's full-vocabulary cross-entropy against the next label, flattened, and where a label is
    known (not -100); matrix products in `compute_dtype` (float32: none under autocast), the loss in fp32.
    `inputs_embeds`, when given, stands for the ids' embeddings (rows trained apart from the table)."""
    with torch.autocast(backbone.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden, _ = backbone.hidden_states(None if inputs_embeds is not None else ids, inputs_embeds=inputs_embeds)
        logits = backbone.vocabulary_logits(hidden)
    logits = logits.float()
    targets = labels.to(logits.device)[:, 1:].reshape(-1)
    known = targets != -100
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.clamp_min(0), reduction="none")
    return losses, known


def transformer_lr(step: int, recipe: Recipe = V2) -> float:
    """Linear warm-up at the start of each cycle, then cosine decay to zero at its end."""
    start = 0
    for steps, peak in recipe.transformer_cycles:
        if step < start + steps:
            t = step - start
            return warmup_cosine(peak, t, steps, WARMUP)
        start += steps
    return 0.0


def cycle_ends(recipe: Recipe) -> list[int]:
    return [sum(steps for steps, _ in recipe.transformer_cycles[: i + 1]) for i in range(len(recipe.transformer_cycles))]


def train_transformer(work: Path, recipe: Recipe = V2, device: str = "cpu", max_minutes: float | None = None) -> bool:
    """Trains (or resumes) to the recipe's last step; stops checkpointed after max_minutes. True when done."""
    out = work / "transformer"
    if (out / "model.safetensors").exists():
        return True
    backbone = new_backbone(work, recipe, device)
    model = backbone.model
    scenes, codes = load_scenes(work), encode_dataset(work, backbone)
    train_idx = torch.arange(len(scenes) - 1000)  # the last 1000 are the VQGAN's held-out set
    trainable = backbone.trainable_parameters()  # the VQGAN is trained apart, before
    decay = [p for p in trainable.values() if p.dim() >= 2]
    no_decay = [p for p in trainable.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe.transformer_cycles[0][1], betas=(0.9, 0.95))
    ckpt_path = work / "transformer.ckpt"
    step = resume(ckpt_path, "transformer", opt, model=model)
    model.train()
    started, t0, running, since_log = time.time(), time.time(), 0.0, 0  # a resumed run's first log is short
    while step < recipe.transformer_steps:
        lr = transformer_lr(step, recipe)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(step)
        batch_idx = train_idx[torch.randint(len(train_idx), (recipe.transformer_batch,), generator=gen)].tolist()
        ids, labels = training_batch(backbone, scenes, codes, batch_idx, step)
        loss = sequence_loss(backbone, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            zero_denormals(opt)
        running, since_log = running + loss.item(), since_log + 1
        if step % 25 == 0:
            log(f"transformer step {step} loss {running / since_log:.4f} lr {lr:.2e} "
                f"({(time.time() - t0) / since_log:.2f}s/step)")
            t0, running, since_log = time.time(), 0.0, 0
        if step in cycle_ends(recipe)[:-1]:  # each cycle ends decayed: a model worth scoring on its own
            model.save_pretrained(work / f"transformer-step{step}")
        out_of_time = max_minutes is not None and time.time() - started > 60 * max_minutes
        if step % 100 == 0 or step == recipe.transformer_steps or out_of_time:
            save_checkpoint(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), step=step)
        if out_of_time and step < recipe.transformer_steps:
            log(f"transformer: stopped at step {step} after {max_minutes} min; run again to continue")
            return False
    model.eval()
    model.cpu().save_pretrained(out)
    return True


def export(work: Path, recipe: Recipe = V2, transformer: Path | None = None, folder: Path | None = None) -> None:
    """Assemble the model folder that `--model` loads: v2's is the one that ships in the package. `transformer`
    (default: the finished one) may be a cycle's snapshot, <work>/transformer-step<N>."""
    from transformers import ChameleonForConditionalGeneration

    from ..backbones.chameleon import save_chameleon

    backbone = new_backbone(work, recipe)
    backbone.model = ChameleonForConditionalGeneration.from_pretrained(
        transformer or work / "transformer", dtype=getattr(torch, recipe.export_dtype))
    folder = folder or recipe.model_dir or work / "model"
    save_chameleon(backbone, folder)
    log(f"exported mini {recipe.name} to {folder}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["data", "vqgan", "tokenizer", "transformer", "decoder", "export", "all"])
    ap.add_argument("--work", type=Path, default=Path("runs/mini"), help="scratch folder for data and checkpoints")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one); checkpoints "
                    "resume on either")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="v2", help="which mini to train (v2 ships)")
    ap.add_argument("--vqgan", type=Path, help="a trained VQGAN folder to use instead of training one (v3: the "
                    "tokenizer pilot's design D)")
    ap.add_argument("--max-minutes", type=float, help="stop the transformer after this long, checkpointed")
    args = ap.parse_args(argv)
    recipe = RECIPES[args.recipe]
    args.work.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Denormal floats make CPU kernels many times slower once weights and gradients get small.
    torch.set_flush_denormal(True)
    steps = {
        "data": lambda work: build_data(work, recipe),
        "vqgan": lambda work: train_vqgan(work, recipe, device, trained=args.vqgan),
        "tokenizer": lambda work: train_tokenizer(work, recipe),
        "transformer": lambda work: train_transformer(work, recipe, device, args.max_minutes),
        "decoder": lambda work: finetune_decoder(work, recipe, device),
        "export": lambda work: export(work, recipe),
    }
    # Each step needs the ones before it; finished steps return at once, so asking for a later step
    # simply continues the pipeline. A transformer stopped by --max-minutes ends the run there.
    try:
        for name, fn in steps.items():
            if fn(args.work) is False or name == args.step:
                break
    except UserError as e:
        sys.exit(f"tokenbooth: error: {e}")


if __name__ == "__main__":
    main()
