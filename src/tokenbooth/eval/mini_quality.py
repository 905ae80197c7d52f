"""How good is mini? python -m tokenbooth.eval.mini_quality [--model mini] [--out docs]

- VQGAN: reconstruction PSNR on renders from a seed stream pretraining never used.
- Prompt adherence: captions naming a (class, color, background) combination that pretraining never drew
  (toyworld.HELD_OUT_COMBOS), at every position; the attribute reader (eval/reader.py) reads class,
  background, object color and position back from the generated pixels. The same for seen combinations,
  and the reader's own accuracy on true renders and on their VQGAN reconstructions (its ceilings), so the
  numbers can be read against both.
- Diversity: one prompt, several seeds: how many of the images differ.
Writes OUT/mini-quality.json and OUT/mini-samples.png.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from ..backbones import load_backbone
from ..commands.common import add_sampling_flags, sampling_overrides
from ..errors import UserError
from ..images import make_grid
from ..io import atomic_save_image, atomic_write_json
from ..sampling import SamplingConfig, sample_image_tokens
from ..toyworld import HELD_OUT_COMBOS, POSITIONS, describe, random_instance, random_scene, render
from .reader import AttributeReader, load_reader
from ..vq import pil_to_tensor, tensor_to_pil


def vqgan_psnr(backbone, n: int = 500) -> float:
    scenes = [random_scene(random.Random(f"psnr:{i}"), allow_held_out=True) for i in range(n)]
    pixels = pil_to_tensor([render(s, backbone.resolution) for s in scenes])
    recon = backbone.decode_images(backbone.encode_images(pixels))
    to255 = lambda t: ((t + 1) * 127.5).round()  # noqa: E731
    mse = (to255(recon) - to255(pixels)).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(255**2 / mse.clamp_min(1e-8))).mean().item()


ASKED = ("cls", "color", "background", "position")


def adherence(reader: AttributeReader, images, asked: list[dict]) -> dict:
    """Share of images whose asked attributes the reader reads back; "all_three" is background, color and
    position (mini v1's figure), "all_four" adds the class."""
    readings = reader.read(images)
    hits = {a: sum(r[a] == q[a] for r, q in zip(readings, asked)) for a in ASKED}
    hits["all_three"] = sum(all(r[a] == q[a] for a in ("color", "background", "position")) for r, q in zip(readings, asked))
    hits["all_four"] = sum(all(r[a] == q[a] for a in ASKED) for r, q in zip(readings, asked))
    return {k: v / len(asked) for k, v in hits.items()}


def asked_of(scene) -> dict:
    return {"cls": scene.instance.cls, "color": scene.instance.color, "background": scene.background,
            "position": scene.position}


def prompts_for(combos, rng):
    prompts, asked = [], []
    for cls, color, background in combos:
        for position in POSITIONS:
            inst = random_instance(rng, cls=cls, color=color)
            prompts.append(describe(inst, background, position))
            asked.append({"cls": cls, "color": color, "background": background, "position": position})
    return prompts, asked


def generate(backbone, prompts, cfg, batch=24):
    images = []
    for i in range(0, len(prompts), batch):
        codes = sample_image_tokens(backbone, prompts[i : i + batch], cfg)
        images += tensor_to_pil(backbone.decode_images(codes))
    return images


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--seed", type=int, default=0)
    add_sampling_flags(ap)
    args = ap.parse_args(argv)
    try:
        measure(args)
    except UserError as e:
        sys.exit(f"tokenbooth: error: {e}")


def measure(args) -> None:
    torch.set_flush_denormal(True)
    t0 = time.time()
    overrides = sampling_overrides(args)  # checked before the model loads
    backbone = load_backbone(args.model)
    cfg = SamplingConfig.for_family(backbone.family, seed=args.seed, **overrides)  # mini's defaults unless asked
    rng = random.Random(args.seed)

    held_prompts, held_asked = prompts_for(sorted(HELD_OUT_COMBOS), rng)
    seen_combos = []
    while len(seen_combos) < len(HELD_OUT_COMBOS):
        s = random_scene(rng)
        seen_combos.append((s.instance.cls, s.instance.color, s.background))
    seen_prompts, seen_asked = prompts_for(seen_combos, rng)
    held_images = generate(backbone, held_prompts, cfg)
    seen_images = generate(backbone, seen_prompts, cfg)

    reader = load_reader()
    ceiling_scenes = [random_scene(random.Random(f"ceiling:{i}"), allow_held_out=True) for i in range(300)]
    ceiling_renders = [render(s, backbone.resolution) for s in ceiling_scenes]
    ceiling_asked = [asked_of(s) for s in ceiling_scenes]
    ceiling = adherence(reader, ceiling_renders, ceiling_asked)
    recon = tensor_to_pil(backbone.decode_images(backbone.encode_images(pil_to_tensor(ceiling_renders))))
    ceiling_recon = adherence(reader, recon, ceiling_asked)

    diversity_prompt = "a blue car on the grass"
    seeds = list(range(8))
    codes = torch.cat([sample_image_tokens(backbone, [diversity_prompt], SamplingConfig(**{**cfg.to_dict(), "seed": s})) for s in seeds])
    distinct = len({tuple(c.flatten().tolist()) for c in codes})

    result = {
        "model": args.model,
        "vqgan_psnr_db": vqgan_psnr(backbone),
        "adherence_held_out_combinations": adherence(reader, held_images, held_asked),
        "adherence_seen_combinations": adherence(reader, seen_images, seen_asked),
        "reader_on_true_renders": ceiling,
        "reader_on_vqgan_reconstructions": ceiling_recon,
        "chance": {"cls": 1 / 12, "background": 0.1, "color": 0.1, "position": 1 / 3},
        "prompts_per_set": len(held_prompts),
        "diversity": {"prompt": diversity_prompt, "seeds": len(seeds), "distinct_images": distinct},
        "sampling": cfg.to_dict(),
        "seconds": round(time.time() - t0, 1),
        "command": "python -m tokenbooth.eval.mini_quality",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "mini-quality.json", result)
    samples = held_images[:24] + tensor_to_pil(backbone.decode_images(codes))
    atomic_save_image(make_grid(samples, columns=8), args.out / "mini-samples.png")
    for key in ("vqgan_psnr_db", "adherence_held_out_combinations", "adherence_seen_combinations",
                "reader_on_true_renders", "reader_on_vqgan_reconstructions", "diversity"):
        print(f"{key}: {result[key]}")


if __name__ == "__main__":
    main()
