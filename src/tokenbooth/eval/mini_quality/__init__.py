"""How good is mini? `tokenbooth eval mini-quality [--model mini] [--out docs]` (or, as before,
`python -m tokenbooth.eval.mini_quality ...`, which forwards to it: __main__.py).

- VQGAN: reconstruction PSNR on renders from a seed stream pretraining never used.
- Prompt adherence: captions naming a (class, color, background) combination that pretraining never drew
  (toyworld.HELD_OUT_COMBOS), at every position; the attribute reader (eval/reader.py) reads class,
  background, object color and position back from the generated pixels. The same for seen combinations,
  and the reader's own accuracy on true renders and on their VQGAN reconstructions (its ceilings), so the
  numbers can be read against both.
- Diversity: one prompt, several seeds: how many of the images differ.
Writes OUT/mini-quality.json and OUT/mini-samples.png. Every image is drawn through `sampling.draw`, so
--sampler sjd samples with SJD.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...backbones import load_backbone
from ...images import make_grid
from ...io import atomic_save_image, atomic_write_json
from ...sampling import SamplingConfig, draw_codes
from ...toyworld import HELD_OUT_COMBOS, POSITIONS, describe, random_instance, random_scene, render
from ...vq import pil_to_tensor, tensor_to_pil
from ..reader import AttributeReader, load_reader


@dataclass
class MiniQualityConfig:
    """What `tokenbooth eval mini-quality` measures; the command fills it from its flags."""

    model: str = "mini"
    out: Path = Path("docs")
    seed: int = 0  # of the prompts' draw and of sampling
    sampling: dict = field(default_factory=dict)  # SamplingConfig fields over the family's (checked already)


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
    """Images for `prompts`, `batch` at a time, with the sampler `cfg` names (decoded a batch at a time)."""
    images = []
    for i in range(0, len(prompts), batch):
        codes = draw_codes(backbone, prompts[i : i + batch], cfg)
        images += tensor_to_pil(backbone.decode_images(codes))
    return images


def measure(cfg: MiniQualityConfig) -> dict:
    """Every figure above into cfg.out; returns mini-quality.json's content."""
    torch.set_flush_denormal(True)
    t0 = time.time()
    backbone = load_backbone(cfg.model)
    sampling = SamplingConfig.for_family(backbone.family, seed=cfg.seed, **cfg.sampling)  # mini's unless asked
    rng = random.Random(cfg.seed)

    held_prompts, held_asked = prompts_for(sorted(HELD_OUT_COMBOS), rng)
    seen_combos = []
    while len(seen_combos) < len(HELD_OUT_COMBOS):
        s = random_scene(rng)
        seen_combos.append((s.instance.cls, s.instance.color, s.background))
    seen_prompts, seen_asked = prompts_for(seen_combos, rng)
    held_images = generate(backbone, held_prompts, sampling)
    seen_images = generate(backbone, seen_prompts, sampling)

    reader = load_reader()
    ceiling, ceiling_recon = reader_ceilings(reader, backbone)
    diversity_prompt, seeds = "a blue car on the grass", list(range(8))
    codes = torch.cat([draw_codes(backbone, [diversity_prompt], SamplingConfig(**{**sampling.to_dict(), "seed": s}))
                       for s in seeds])
    distinct = len({tuple(c.flatten().tolist()) for c in codes})

    result = {
        "model": cfg.model,
        "vqgan_psnr_db": vqgan_psnr(backbone),
        "adherence_held_out_combinations": adherence(reader, held_images, held_asked),
        "adherence_seen_combinations": adherence(reader, seen_images, seen_asked),
        "reader_on_true_renders": ceiling,
        "reader_on_vqgan_reconstructions": ceiling_recon,
        "chance": {"cls": 1 / 12, "background": 0.1, "color": 0.1, "position": 1 / 3},
        "prompts_per_set": len(held_prompts),
        "diversity": {"prompt": diversity_prompt, "seeds": len(seeds), "distinct_images": distinct},
        "sampling": sampling.to_dict(),
        "seconds": round(time.time() - t0, 1),
        "command": "python -m tokenbooth.eval.mini_quality",  # as the figures on record were made
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.out / "mini-quality.json", result)
    samples = held_images[:24] + tensor_to_pil(backbone.decode_images(codes))
    atomic_save_image(make_grid(samples, columns=8), cfg.out / "mini-samples.png")
    for key in ("vqgan_psnr_db", "adherence_held_out_combinations", "adherence_seen_combinations",
                "reader_on_true_renders", "reader_on_vqgan_reconstructions", "diversity"):
        print(f"{key}: {result[key]}")
    return result


def reader_ceilings(reader: AttributeReader, backbone) -> tuple[dict, dict]:
    """The reader's adherence on 300 true renders and on their VQGAN reconstructions: the best a drawing can
    score, before and after the image tokenizer."""
    scenes = [random_scene(random.Random(f"ceiling:{i}"), allow_held_out=True) for i in range(300)]
    renders = [render(s, backbone.resolution) for s in scenes]
    asked = [asked_of(s) for s in scenes]
    on_renders = adherence(reader, renders, asked)
    recon = tensor_to_pil(backbone.decode_images(backbone.encode_images(pil_to_tensor(renders))))
    return on_renders, adherence(reader, recon, asked)

