"""What computing attention in float32 on the CPU buys (backbones/hf.float32_sdpa_on_cpu), side by side.

    python benchmarks/attention.py [--model mini] [--rounds 3] [--steps 5]

Personalization and mini's pretraining run under bfloat16 autocast, which hands SDPA bfloat16 queries, keys
and values; PyTorch's CPU flash-attention kernel is slower in bfloat16. The same model, the same batches,
switched between transformers' plain "sdpa" and tokenbooth's float32 version, rounds interleaved (the
machine's speed drifts), best round of each:
- a personalization step: stage 1's shape (batch 8, [V]'s gradient through every layer) and a stage 2 step
  (Q/K/V learn too), mini's defaults, bf16 autocast, the loss personalization uses (recipe.batch_loss)
- a pretraining step (batch 48, every weight learns, pretrain/mini.sequence_loss)
Also checks that both give the same loss (to bf16 rounding). Writes benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tokenbooth.backbones import load_backbone
from tokenbooth.backbones.hf import CPU_FLOAT32_SDPA
from tokenbooth.io import atomic_write_json
from tokenbooth.personalize import TrainConfig, load_reference_images
from tokenbooth.personalize.recipe import Placeholder, _autocast_for, batch_loss, make_batch, reference_tokens
from tokenbooth.toyworld import demo_subject

RESULTS = Path(__file__).parent / "results"
IMPLEMENTATIONS = ("sdpa", CPU_FLOAT32_SDPA)


def personalization_step(backbone, layers: bool):
    """A closure running one step of stage 1 (layers=False) or stage 2 (layers=True) on fixed batches."""
    cfg = TrainConfig.for_family(backbone.family, class_name="robot")
    gen = torch.Generator().manual_seed(0)
    placeholder = Placeholder(backbone, cfg, gen)
    images = load_reference_images(demo_subject.FOLDER, backbone.resolution)
    ids, labels = make_batch(backbone, placeholder, cfg, reference_tokens(backbone, images, flip=False), gen, True)
    qkv = [p for n, p in backbone.model.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight",
                                                                          "v_proj.weight"))]
    params = [placeholder.embedding] + (qkv if layers else [])
    for p in qkv:
        p.requires_grad_(layers)
    optimizer = torch.optim.SGD(params, lr=0.0)  # the step's cost, not its effect
    autocast = _autocast_for(backbone, cfg.compute_dtype)

    def step() -> float:
        loss = batch_loss(backbone, placeholder, ids, labels, autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def pretraining_step(backbone, batch: int = 48):
    from tokenbooth.pretrain.mini import pad_batch, sequence_loss

    gen = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(batch):
        side = backbone.layout.rows  # a square image block
        codes = torch.randint(backbone.vqgan.config.n_embed, (1, side, side), generator=gen)
        body = backbone.layout.body_from_codes(codes)[0].tolist() + list(backbone.layout.trailer)
        seqs.append(backbone.prompt_ids("a photo of a red robot on the beach") + body)
    ids, labels = pad_batch(seqs, seqs, backbone.model.config.pad_token_id)
    for p in backbone.model.parameters():
        p.requires_grad_(True)

    def step() -> float:
        loss = sequence_loss(backbone, ids, labels)
        loss.backward()
        backbone.model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def compare(backbone, step, rounds: int, steps: int) -> dict:
    """Best seconds per step of each implementation over interleaved rounds, and each one's loss."""
    seconds, losses = {name: [] for name in IMPLEMENTATIONS}, {}
    for _ in range(rounds):
        for name in IMPLEMENTATIONS:
            backbone.model.set_attn_implementation(name)
            losses[name] = step()  # warm-up, and the loss this implementation gives
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            seconds[name].append((time.perf_counter() - t0) / steps)
    best = {name: min(s) for name, s in seconds.items()}
    return {"seconds_per_step": best, "speedup": best["sdpa"] / best[CPU_FLOAT32_SDPA], "loss": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steps timed per round and implementation")
    ap.add_argument("--out", type=Path, default=RESULTS / "attention.json")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    result = {"model": args.model, "threads": torch.get_num_threads(), "rounds": args.rounds, "steps": args.steps}
    parts = {"stage 1 step (batch 8)": lambda b: personalization_step(b, layers=False),
             "stage 2 Q/K/V step (batch 8)": lambda b: personalization_step(b, layers=True),
             "pretraining step (batch 48)": pretraining_step}
    print(f"{'part':<30}{'sdpa s/step':>12}{'float32 s/step':>16}{'speedup':>9}{'loss sdpa':>11}{'loss f32':>10}")
    for name, make in parts.items():
        backbone = load_backbone(args.model)
        r = compare(backbone, make(backbone), args.rounds, args.steps)
        result[name] = r
        s, loss = r["seconds_per_step"], r["loss"]
        print(f"{name:<30}{s['sdpa']:>12.3f}{s[CPU_FLOAT32_SDPA]:>16.3f}{r['speedup']:>8.2f}x"
              f"{loss['sdpa']:>11.4f}{loss[CPU_FLOAT32_SDPA]:>10.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
