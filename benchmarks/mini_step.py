"""What a mini pretraining step costs per recipe (pretrain/mini.py), side by side: v2 (256 tokens a picture)
against v3 (64 tokens), and v3 at other sizes, so the transformer v3 can afford at v2's budget is measured.

    python benchmarks/mini_step.py [--rounds 3] [--steps 3] [--sizes 256x6,512x8]

Random weights (speed does not depend on them), random codes, real captions and token layout: each recipe's
own training batch (pretrain/mini.training_batch), loss (sequence_loss: bf16 matrix products where the CPU has
them) and AdamW step, batch 48. Rounds interleave the candidates (the machine's speed drifts); the best round of
each is kept. Writes benchmarks/results/mini_step.json.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from tokenbooth.backbones.chameleon import ChameleonBackbone
from tokenbooth.backbones.chameleon_build import BPE_MERGES, chameleon_config, train_bpe_tokenizer
from tokenbooth.io import atomic_write_json
from tokenbooth.pretrain.mini import RESOLUTION, V2, V3, Recipe, sequence_loss, training_batch
from tokenbooth.toyworld import caption, pretraining_scene
from tokenbooth.vq import VQGAN

RESULTS = Path(__file__).parent / "results"


def candidate(recipe: Recipe, scenes) -> tuple[ChameleonBackbone, torch.optim.Optimizer, torch.Tensor]:
    """A recipe's backbone at random weights, its optimizer and random codes for `scenes`."""
    rng = random.Random(0)
    tokenizer = train_bpe_tokenizer([caption(s, rng) for s in scenes], recipe.vqgan.n_embed, BPE_MERGES)
    torch.manual_seed(0)
    config = chameleon_config(tokenizer.get_vocab(), recipe.vqgan.n_embed, hidden=recipe.hidden,
                              layers=recipe.layers, heads=recipe.heads, context=recipe.context,
                              resolution=RESOLUTION)
    from transformers import ChameleonForConditionalGeneration

    model = ChameleonForConditionalGeneration(config).train()
    backbone = ChameleonBackbone("mini", model, tokenizer, VQGAN(recipe.vqgan).eval(), recipe.spec)
    side = RESOLUTION // recipe.vqgan.downsample
    codes = torch.randint(recipe.vqgan.n_embed, (len(scenes), side, side))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    return backbone, opt, codes


def seconds_a_step(backbone, opt, scenes, codes, batch: int, steps: int) -> tuple[float, int]:
    """Mean seconds of `steps` training steps (after one warm-up step) and the tokens a batch holds."""
    times, tokens = [], 0
    for step in range(steps + 1):
        indices = [(step * batch + i) % len(scenes) for i in range(batch)]
        ids, labels = training_batch(backbone, scenes, codes, indices, step)
        t0 = time.perf_counter()
        loss = sequence_loss(backbone, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.model.parameters(), 1.0)
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
        tokens = ids.numel()
    return sum(times) / len(times), tokens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sizes", default="256x6,512x8", help="other widths x layers to try for v3")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    scenes = [pretraining_scene(i) for i in range(200)]
    recipes = {"v2": V2, "v3": V3}
    for size in filter(None, args.sizes.split(",")):
        hidden, layers = map(int, size.split("x"))
        recipes[f"v3 {size}"] = replace(V3, hidden=hidden, layers=layers)
    built = {name: candidate(r, scenes) for name, r in recipes.items()}
    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for rnd in range(args.rounds):
        for name, (backbone, opt, codes) in built.items():
            s, tokens[name] = seconds_a_step(backbone, opt, scenes, codes, recipes[name].transformer_batch, args.steps)
            best[name] = min(best.get(name, s), s)
            print(f"round {rnd}: {name}: {s:.3f} s a step", flush=True)
    rows = {}
    for name, (backbone, _, _) in built.items():
        params = sum(p.numel() for p in backbone.model.parameters())
        rows[name] = {"hidden": recipes[name].hidden, "layers": recipes[name].layers, "parameters": params,
                      "batch_tokens": tokens[name], "s_per_step": round(best[name], 3),
                      "vs_v2": round(best[name] / best["v2"], 3)}
        print(f"{name:>10}: {params / 1e6:5.1f}M parameters, {tokens[name]} tokens a batch, "
              f"{best[name]:.2f} s a step, {best[name] / best['v2']:.2f}x v2's")
    atomic_write_json(RESULTS / "mini_step.json", {"threads": torch.get_num_threads(), "rounds": args.rounds,
                                                   "steps": args.steps, "recipes": rows})


if __name__ == "__main__":
    main()
