"""Train the attribute reader (eval/reader.py) on renders of pretraining scenes: python -m tokenbooth.pretrain.reader

Labels are the renderer's own attributes; scenes come from the pretraining stream, so a reserved subject is
never among them. Pictures are rendered as they are needed, with a light blur and noise now and then so
that reading does not hinge on pixel-exact edges (VQGAN reconstructions and generated images have none).
Accuracy is reported per attribute on held-out renders (another seed stream), on the reserved subjects'
renders (never trained on), and, when a VQGAN is given, on its reconstructions of the held-out renders.
Budget on 2 cores: about 15 minutes. Resumable.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import ImageFilter

from ..assets import READER_DIR
from ..eval.reader import RESOLUTION, VALUES, AttributeReader, accuracy, labels, save_reader, to_pixels
from ..io import atomic_write_json
from ..toyworld import Scene, pretraining_scene, random_scene, render, reserved_instances
from .loop import log, resume, save_checkpoint, warmup_cosine, zero_denormals

STEPS = 3000
BATCH = 64
LR = 2e-3
HELD_OUT = 2000  # renders of another seed stream, never trained on


def augment(image, rng: random.Random):
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8)))
    return image


def training_batch(step: int):
    rng = random.Random(f"reader:{step}")
    scenes = [pretraining_scene(step * BATCH + i) for i in range(BATCH)]
    pixels = to_pixels([augment(render(s, RESOLUTION), rng) for s in scenes])
    if rng.random() < 0.5:
        pixels = pixels + torch.randn_like(pixels) * rng.uniform(0.0, 0.06)
    return pixels, labels(scenes)


def held_out_scenes(n: int = HELD_OUT) -> list[Scene]:
    return [pretraining_scene(i, base_seed=7) for i in range(n)]


def reserved_scenes() -> list[Scene]:
    """Each reserved subject in several contexts: subjects the reader never saw, as toy-bench shows them."""
    rng = random.Random(11)
    return [random_scene(rng, inst, allow_held_out=True) for inst in reserved_instances() for _ in range(20)]


def train(work: Path) -> AttributeReader:
    torch.manual_seed(0)
    model = AttributeReader()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    ckpt_path = work / "reader.ckpt"
    step = resume(ckpt_path, "reader", opt, model=model)
    model.train()
    t0 = time.time()
    while step < STEPS:
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(LR, step, STEPS, warmup=100)
        pixels, target = training_batch(step)
        logits = model(pixels)
        loss = sum(F.cross_entropy(logits[a], target[a]) for a in VALUES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            zero_denormals(opt)
        if step % 100 == 0:
            log(f"reader step {step} loss {loss.item():.4f} ({(time.time() - t0) / 100:.2f}s/step)")
            t0 = time.time()
        if step % 250 == 0 or step == STEPS:
            save_checkpoint(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), step=step)
    return model.eval()


@torch.no_grad()
def reconstructions(vqgan_dir: Path, images) -> list:
    from ..vq import load_vqgan, tensor_to_pil

    vqgan = load_vqgan(vqgan_dir)
    pixels = to_pixels(images, vqgan.config.resolution)
    out = []
    for chunk in pixels.split(100):
        out += tensor_to_pil(vqgan.decode(vqgan.encode(chunk)))
    return out


def report(model: AttributeReader, vqgan_dir: Path | None) -> dict:
    scenes = held_out_scenes()
    renders = [render(s, RESOLUTION) for s in scenes]
    reserved = reserved_scenes()
    out = {"held_out_renders": accuracy(model, renders, scenes),
           "reserved_subject_renders": accuracy(model, [render(s, RESOLUTION) for s in reserved], reserved),
           "n_held_out": len(scenes), "n_reserved": len(reserved)}
    if vqgan_dir is not None:
        out["held_out_reconstructions"] = accuracy(model, reconstructions(vqgan_dir, renders), scenes)
        out["vqgan"] = str(vqgan_dir)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/reader"), help="scratch folder for checkpoints")
    ap.add_argument("--vqgan", type=Path, default=None, help="a VQGAN folder: also report accuracy on its reconstructions")
    ap.add_argument("--report-only", action="store_true", help="measure the shipped reader, train nothing")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.report_only:
        from ..eval.reader import load_reader

        model = load_reader()
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        model = train(args.work)
    result = report(model, args.vqgan)
    for name in ("held_out_renders", "reserved_subject_renders", "held_out_reconstructions"):
        if name in result:
            log(name + ": " + ", ".join(f"{a} {v:.1%}" for a, v in result[name].items()))
    if args.report_only:
        atomic_write_json(READER_DIR / "accuracy.json", result)
    else:
        save_reader(model, READER_DIR, result)
        log(f"saved the reader to {READER_DIR}")


if __name__ == "__main__":
    main()
