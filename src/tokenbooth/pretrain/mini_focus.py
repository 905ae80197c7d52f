"""mini v3's question about the transformer: does mini draw *its subject* better when its pretraining loss is
spent on the subject's image tokens rather than on the background's?

    python -m tokenbooth.pretrain.mini_focus train NAME --subject-weight W --steps N [--max-minutes M]
    python -m tokenbooth.pretrain.mini_focus export NAME      # a model folder beside the run, for --model

Why: in mini v2's pretraining the subject covers 16% of the image tokens yet its tokens cost 3.42 nats against
1.14 for the background's, and backgrounds carry 64% of the loss (issue #23). The demo's subject is wrong with
v2's decoder and with a sharper one alike (docs/mini-v3-pilot.md): the transformer draws the wrong subject.
This continues v2's shipped transformer on v2's own frozen codes (so the VQGAN, the tokenizer and the token
layout stay exactly as they are) with each image token's cross-entropy weighted 1 + subject_weight x (the
subject's coverage of that token's pixels, from the renderer: `mini_v3_pilot.subject_mask`). Weight 0 is plain
continued pretraining, the control. No instrument (reader, toyDINO, toyCLIP) is part of the loss.

Data: the decoder experiment's renders and codes (`mini_decoder data`: pretraining scenes 0..19,999 of v2's
stream, which v2 trained on; reserved subjects and held-out combinations never appear), captioned as v2's
pretraining captions them, one in ten without text (guidance's unconditional row), as mini.py does.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..assets import MINI_DIR
from ..io import atomic_write_json
from ..toyworld import caption, pretraining_scene
from .loop import (
    StepLog, add_run_options, load_checkpoint, log, optimizer_step, resume, run_from_options, save_checkpoint,
    warmup_cosine, zero_denormals,
)
from .mini import next_token_losses, pad_batch

CHECKPOINT_EVERY = 25  # steps: a few minutes of 2 CPU cores
WARMUP = 25


@dataclass(frozen=True)
class FocusRun:
    name: str
    subject_weight: float = 4.0
    steps: int = 600
    batch: int = 48  # v2's pretraining batch
    lr: float = 2e-4  # peak; v2's last cycle peaked at 3e-4 and decayed to zero
    compute_dtype: str = "float32"  # "bfloat16" where the CPU has AVX512-BF16 (mini.py's pretraining used it)


# --- data -------------------------------------------------------------------------------------------------

def load_train(work: Path):
    """Codes (N, 16, 16) and the subject's coverage of each token's pixels (N, 16, 16), from mini_decoder's data."""
    data = np.load(work / "train.npz")
    codes = torch.from_numpy(data["codes"].astype(np.int64))
    masks = torch.from_numpy(data["masks"]).float() / 255.0
    down = masks.shape[-1] // codes.shape[-1]
    cover = F.avg_pool2d(masks[:, None], down)[:, 0]
    return codes, cover


def token_weights(layout, cover: torch.Tensor, subject_weight: float) -> torch.Tensor:
    """(B, rows, cols) coverage -> (B, body_length + trailer) loss weights aligned with the image block:
    1 + subject_weight x coverage at image tokens, 1 at row ends, image end and trailer."""
    w = 1.0 + subject_weight * cover
    b = w.shape[0]
    if layout.row_end is not None:
        w = torch.cat([w, w.new_ones(b, layout.rows, 1)], dim=2)
    return torch.cat([w.reshape(b, -1), w.new_ones(b, 1 + len(layout.trailer))], dim=1)


def focus_batch(backbone, codes, cover, indices: list[int], step: int, subject_weight: float):
    """mini.py's pretraining batch (prompt + image block, loss on the image block, one in ten unconditional)
    with each label's weight beside it."""
    layout = backbone.layout
    bodies = layout.body_from_codes(codes[indices])
    weights = token_weights(layout, cover[indices], subject_weight)
    seqs, labels, wts = [], [], []
    for row, i in enumerate(indices):
        rng = random.Random(f"focus:{step}:{i}")  # captions vary across epochs yet resume exactly
        body = bodies[row].tolist() + list(layout.trailer)
        scene = pretraining_scene(i)
        prefix = backbone.unconditional_ids() if rng.random() < 0.1 else backbone.prompt_ids(caption(scene, rng))
        seqs.append(prefix + body)
        labels.append([-100] * len(prefix) + body)
        wts.append([0.0] * len(prefix) + weights[row].tolist())
    ids, lab = pad_batch(seqs, labels, backbone.model.config.pad_token_id)
    w = torch.tensor([x + [0.0] * (ids.shape[1] - len(x)) for x in wts])
    return ids, lab, w


def weighted_sequence_loss(backbone, ids, labels, weights, compute_dtype: str = "float32") -> torch.Tensor:
    """mini.py's pretraining loss with each label's term weighted, the sum divided by the weights' sum (so
    weight 1 everywhere is exactly the plain mean)."""
    losses, known = next_token_losses(backbone, ids, labels, getattr(torch, compute_dtype))
    w = weights.to(losses.device)[:, 1:].reshape(-1) * known
    return (losses * w).sum() / w.sum()


def learning_rate(run: FocusRun, step: int) -> float:
    return warmup_cosine(run.lr, step, run.steps, WARMUP)


# --- training ---------------------------------------------------------------------------------------------

def train(work: Path, run: FocusRun, max_minutes: float | None = None, base: str | Path = MINI_DIR,
          device: str = "cpu") -> bool:
    """Continues `base`'s transformer on `device` (cpu or cuda: the same run either way); True when the run has
    reached its last step."""
    from ..backbones import load_backbone

    run_dir = work / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "run.json", asdict(run))
    backbone = load_backbone(str(base), device=device)
    model = backbone.model
    codes, cover = load_train(work)
    trainable = backbone.trainable_parameters()
    decay = [p for p in trainable.values() if p.dim() >= 2]
    no_decay = [p for p in trainable.values() if p.dim() < 2]
    for p in trainable.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=run.lr, betas=(0.9, 0.95))
    ckpt = run_dir / "focus.ckpt"
    step = resume(ckpt, run.name, opt, model=model)
    model.train()
    started, progress = time.time(), StepLog(run.name)
    while step < run.steps:
        if max_minutes is not None and time.time() - started > max_minutes * 60:
            save_checkpoint(ckpt, model=model.state_dict(), opt=opt.state_dict(), step=step)
            log(f"{run.name}: stopped at step {step} (--max-minutes), checkpointed")
            return False
        for g in opt.param_groups:
            g["lr"] = learning_rate(run, step)
        gen = torch.Generator().manual_seed(step)
        idx = torch.randint(len(codes), (run.batch,), generator=gen).tolist()
        ids, labels, weights = (t.to(device) for t in focus_batch(backbone, codes, cover, idx, step, run.subject_weight))
        loss = optimizer_step(opt, weighted_sequence_loss(backbone, ids, labels, weights, run.compute_dtype),
                              model.parameters())
        step += 1
        progress.add(step, loss, f" lr {learning_rate(run, step - 1):.2e}")
        if step % 5 == 0:
            zero_denormals(opt)
        if step % CHECKPOINT_EVERY == 0 or step == run.steps:
            save_checkpoint(ckpt, model=model.state_dict(), opt=opt.state_dict(), step=step)
    return True


def export(work: Path, name: str, base: Path = MINI_DIR) -> Path:
    """A model folder `<work>/<name>/model`: the base folder with the run's transformer weights in it."""
    from safetensors.torch import save_model
    from transformers import ChameleonForConditionalGeneration

    ck = load_checkpoint(work / name / "focus.ckpt")
    if ck is None:
        raise SystemExit(f"no checkpoint for run {name!r} in {work}")
    out = work / name / "model"
    tmp = work / name / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    model = ChameleonForConditionalGeneration.from_pretrained(base)
    model.load_state_dict(ck["model"])
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    log(f"{name}: step {ck['step']} exported to {out}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "export"])
    ap.add_argument("name")
    ap.add_argument("--work", type=Path, default=Path("runs/mini-decoder"), help="where mini_decoder's data is")
    add_run_options(ap, FocusRun)  # --subject-weight, --steps, --batch, --lr, --compute-dtype
    ap.add_argument("--max-minutes", type=float)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)  # denormal floats make CPU kernels many times slower
    if args.what == "train":
        run = run_from_options(FocusRun, args.name, args)
        if train(args.work, run, args.max_minutes, device=args.device):
            log(f"{args.name}: done")
    else:
        export(args.work, args.name)


if __name__ == "__main__":
    main()
