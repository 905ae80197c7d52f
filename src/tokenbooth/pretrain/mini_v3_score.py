"""Scores mini v3's tokenizer pilot (mini_v3_pilot.py): python -m tokenbooth.pretrain.mini_v3_score --work DIR

On the held-out renders (the reader's held-out stream, never trained on by any VQGAN here or by v2's), for
each finished design and for v2's shipped VQGAN (assets/mini/vqgan, the reference point):
  PSNR of the reconstructions, whole picture and the subject's pixels (coverage >= 0.5, from the renderer);
  the attribute reader's accuracy per attribute on the reconstructions and on the renders themselves
  (pretrain/reader.py's `reconstructions`, eval/reader.py's `accuracy`), and "identity, all": the share of
  pictures in which every identity attribute is read right;
  codes used on the held-out set.
Also the subject's share of the picture on the training renders (pixels, and tokens at 4x and 8x).
Writes <work>/results.json and <work>/grid.png (rows: the renders, then each design's reconstructions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..assets import MINI_DIR
from ..eval.reader import IDENTITY, VALUES, accuracy, load_reader, scene_attributes
from ..io import atomic_save_image, atomic_write_json
from ..toyworld import pretraining_scene
from ..vq import load_vqgan
from .loop import log
from .mini_v3_pilot import HELD_OUT_SPLITS, held_out_scenes, render_set, token_share
from .reader import reconstructions

V2_SHIPPED = MINI_DIR / "vqgan"
GRID_COLUMNS = 10  # held-out pictures shown per row of the comparison grid
GRID_SCALE = 2  # nearest-neighbour enlargement, so single pixels can be seen


def psnr(recon: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> float:
    """Mean over pictures of the PSNR (dB, 0..255 scale), over the pixels `where` is true (all if None)."""
    err = (recon.astype(np.float64) - truth.astype(np.float64)) ** 2  # (N, H, W, 3)
    if where is None:
        mse = err.reshape(len(err), -1).mean(1)
    else:
        w = where[..., None].astype(np.float64)
        mse = (err * w).reshape(len(err), -1).sum(1) / (3 * w.reshape(len(w), -1).sum(1)).clip(min=1)
    return float(np.mean(10 * np.log10(255**2 / np.maximum(mse, 1e-8))))


def identity_right(reader, images, scenes) -> np.ndarray:
    """Per picture: is every identity attribute read right?"""
    readings = reader.read(images)
    truth = [scene_attributes(s) for s in scenes]
    return np.array([all(r[a] == t[a] for a in IDENTITY) for r, t in zip(readings, truth)])


def identity_figures(reader, images, scenes) -> dict:
    """"identity, all" over the pictures and for each of toyworld's subject sizes: is a subject that fills more
    of the picture (more tokens) kept whole more often?"""
    right = identity_right(reader, images, scenes)
    sizes = np.array([s.size for s in scenes])
    return {"identity_all": float(right.mean()),
            "identity_all_by_size": {str(size): float(right[sizes == size].mean()) for size in sorted(set(sizes))}}


@torch.no_grad()
def codes_used(vqgan_dir: Path, pixels: np.ndarray) -> int:
    vqgan = load_vqgan(vqgan_dir)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return int(torch.cat([vqgan.encode(c).flatten() for c in x.split(100)]).unique().numel())


def held_out_renders(work: Path, split: str, scenes) -> tuple[np.ndarray, np.ndarray]:
    """uint8 renders and [0, 1] subject coverage of a held-out split (test: the pilot's held_out.npz)."""
    path = work / ("held_out.npz" if split == "test" else f"held_out-{split}.npz")
    if not path.exists():
        pixels, masks = render_set(scenes)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, pixels=pixels, masks=masks)
        tmp.replace(path)
    data = np.load(path)
    return data["pixels"], data["masks"].astype(np.float32) / 255.0


def score_tokenizer(vqgan_dir: Path, reader, renders, scenes, pixels, masks) -> tuple[dict, list]:
    recon = reconstructions(vqgan_dir, renders)
    arr = np.stack([np.asarray(im) for im in recon])
    cfg = load_vqgan(vqgan_dir).config
    return {
        "tokens_per_image": (cfg.resolution // cfg.downsample) ** 2, "codebook": cfg.n_embed,
        "codes_used_held_out": codes_used(vqgan_dir, pixels),
        "psnr": psnr(arr, pixels), "psnr_subject": psnr(arr, pixels, masks >= 0.5),
        "psnr_background": psnr(arr, pixels, masks < 0.5),
        "reader": accuracy(reader, recon, scenes), **identity_figures(reader, recon, scenes),
    }, recon


def subject_share(work: Path, n: int = 5000) -> dict:
    """How much of the picture the subject is, on the training renders (toyworld's sizes small and large)."""
    data = np.load(work / "train.npz")
    masks = data["masks"][:n].astype(np.float32) / 255.0
    sizes = np.array([pretraining_scene(i).size for i in range(len(masks))])
    out = {}
    for name, sel in (("all", slice(None)), ("small", sizes == "small"), ("large", sizes == "large")):
        m = masks[sel]
        out[name] = {"pixels": float(m.mean()), "tokens_4x": token_share(m, 4), "tokens_8x": token_share(m, 8),
                     "n": int(len(m))}
    return out


def grid(rows: list[tuple[str, list]], path: Path) -> None:
    label_w, side = 70, 64 * GRID_SCALE
    sheet = Image.new("RGB", (label_w + side * GRID_COLUMNS, side * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * side + side // 2 - 6), label, fill=(0, 0, 0))
        for c, im in enumerate(images[:GRID_COLUMNS]):
            sheet.paste(im.resize((side, side), Image.NEAREST), (label_w + c * side, r * side))
    atomic_save_image(sheet, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/v3pilot"))
    ap.add_argument("--only", nargs="*", help="score only these (design names, 'v2'); keep the others' figures")
    ap.add_argument("--split", choices=sorted(HELD_OUT_SPLITS), default="test",
                    help="held-out renders to score on: choose on dev, report test once (the pilot's first "
                         "designs were scored on test)")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    scenes = held_out_scenes(split=args.split)
    pixels, masks = held_out_renders(args.work, args.split, scenes)
    renders = [Image.fromarray(p) for p in pixels]
    reader = load_reader()
    suffix = "" if args.split == "test" else f"-{args.split}"
    results_path = args.work / f"results{suffix}.json"
    results = json.loads(results_path.read_text()) if args.only and results_path.exists() else {}
    if "identity_all_by_size" not in results.get("renders", {}):
        results.update({"n_held_out": len(scenes), "subject_share": subject_share(args.work),
                        "renders": {"reader": accuracy(reader, renders, scenes),
                                    **identity_figures(reader, renders, scenes)}})
    rows = [("renders", renders)]
    # every design folder with a finished VQGAN (snapshots such as A400 included), then v2's as the reference
    candidates = [(p.parent.name, p) for p in sorted(args.work.glob("*/vqgan"))] + [("v2 shipped", V2_SHIPPED)]
    for name, folder in candidates:
        if not (folder / "vqgan.safetensors").exists():
            continue
        if not args.only or name.split()[0] in args.only:
            log(f"scoring {name}")
            results[name], _ = score_tokenizer(folder, reader, renders, scenes, pixels, masks)
            run = folder.parent / "run.json"
            if run.exists():
                results[name]["run"] = json.loads(run.read_text())
        recon = reconstructions(folder, renders[:GRID_COLUMNS])  # the grid's few pictures, redrawn cheaply
        rows.append((name, recon))
        grid([("renders", renders), (name, recon)], args.work / f"grid-{name.replace(' ', '-')}{suffix}.png")
    grid(rows, args.work / f"grid{suffix}.png")
    atomic_write_json(results_path, results)
    attrs = list(VALUES)
    log("design  tokens  PSNR  subject  id-all (by size)  " + "  ".join(a[:6] for a in attrs))
    for name in ["renders", *(name for name, _ in candidates)]:
        if name in results:
            r = results[name]
            by_size = ", ".join(f"{k} {v:.3f}" for k, v in r.get("identity_all_by_size", {}).items())
            log(f"{name}  {r.get('tokens_per_image', '-')}  {r.get('psnr', float('nan')):.2f}  "
                f"{r.get('psnr_subject', float('nan')):.2f}  {r['identity_all']:.3f} ({by_size})  "
                + "  ".join(f"{r['reader'][a]:.3f}" for a in attrs))


if __name__ == "__main__":
    main()
