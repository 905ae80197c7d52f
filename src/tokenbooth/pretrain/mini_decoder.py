"""mini v3's question about the decoder: does a decoder that draws the subject better, on mini v2's frozen codes,
make the demo's subject right? (docs/mini-v3-pilot.md: it does not; the transformer is where identity is lost.)

    python -m tokenbooth.pretrain.mini_decoder data
    python -m tokenbooth.pretrain.mini_decoder train NAME --subject-weight W --edge-weight E --steps N
    python -m tokenbooth.pretrain.mini_decoder score NAME... --split dev|test    # 'v2': the shipped decoder

Why the decoder alone: v2's shipped tokenizer keeps backgrounds at 33 dB and subjects at 19 dB, and the reader
loses 18 points of accent and 13 of parts on its reconstructions (docs/mini-v3-pilot.md). The encoder and the
codebook stay frozen, so every picture's tokens, and the transformer trained on them, stay exactly valid: only
what a code sequence is drawn as changes, for every image mini has ever made and will make.

The loss is v2's L1 + L2 with each pixel weighted 1 + subject_weight x (the subject's coverage of it, from the
renderer: `mini_v3_pilot.subject_mask`), plus, optionally, an L1 on horizontal and vertical pixel differences
(edges: accents and parts are thin strokes that a plain pixel loss lets blur). No instrument (reader, toyDINO,
toyCLIP) is part of the loss: the reader only scores the result.

Splits: training renders are pretraining scenes 0..19,999 (v2's stream, which v2's VQGAN trained on); the reader's
held-out stream (base seed 7, which neither the reader nor any VQGAN trained on) gives a dev split (scenes
500..999, for every choice) and a test split (scenes 0..499, the pilot's, reported once).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..assets import MINI_DIR
from ..eval.reader import accuracy, load_reader
from ..io import atomic_write_json
from ..toyworld import pretraining_scene
from ..vq import load_vqgan, save_vqgan
from .loop import add_run_options, log, run_from_options, save_checkpoint, warmup_cosine, zero_denormals
from .mini_v3_pilot import HELD_OUT_SPLITS as SPLITS
from .mini_v3_pilot import held_out_scenes, render_set
from .mini_v3_score import identity_figures, psnr

NUM_TRAIN = 20_000
CHECKPOINT_EVERY = 200  # steps: about a minute of 2 CPU cores
SHIPPED = MINI_DIR / "vqgan"


@dataclass(frozen=True)
class DecoderRun:
    name: str
    subject_weight: float = 4.0
    edge_weight: float = 0.0
    steps: int = 2000
    batch: int = 16
    lr: float = 1e-4


# --- data -------------------------------------------------------------------------------------------------

def split_scenes(split: str):
    if split == "train":
        return [pretraining_scene(i) for i in range(NUM_TRAIN)]
    return held_out_scenes(split=split)


def build_split(work: Path, split: str) -> Path:
    """Renders of a split with the subject's coverage, and their frozen v2 codes: `<work>/<split>.npz`."""
    path = work / f"{split}.npz"
    if path.exists():
        return path
    t0 = time.time()
    pixels, masks = render_set(split_scenes(split))
    codes = encode(load_vqgan(SHIPPED), to_tensor(pixels))
    tmp = work / f".{split}.tmp.npz"
    np.savez(tmp, pixels=pixels, masks=masks, codes=codes.numpy().astype(np.int16))
    tmp.replace(path)  # whole or not at all
    log(f"data: {len(pixels)} {split} scenes rendered and encoded in {time.time() - t0:.0f} s")
    return path


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode(model, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.encode(chunk) for chunk in pixels.split(500)])


def load_split(work: Path, split: str):
    data = np.load(build_split(work, split))
    masks = torch.from_numpy(data["masks"]).float()[:, None] / 255.0
    return to_tensor(data["pixels"]), masks, torch.from_numpy(data["codes"].astype(np.int64))


# --- the loss ---------------------------------------------------------------------------------------------

def decoder_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, run: DecoderRun) -> torch.Tensor:
    """v2's L1 + L2, each pixel weighted 1 + subject_weight x coverage (normalised: weight 0 is exactly v2's
    loss), plus edge_weight x L1 of the pixel differences along both axes, weighted the same way."""
    w = 1.0 + run.subject_weight * mask
    err = (recon - target).abs() + (recon - target).pow(2)
    loss = (err * w).sum() / (w.sum() * err.shape[1])
    if run.edge_weight:
        for dim in (-1, -2):
            edge_err = (recon.diff(dim=dim) - target.diff(dim=dim)).abs()
            w_edge = w.narrow(dim, 0, w.shape[dim] - 1)
            loss = loss + run.edge_weight * (edge_err * w_edge).sum() / (w_edge.sum() * err.shape[1])
    return loss


# --- training ---------------------------------------------------------------------------------------------

def decoder_params(model) -> list[torch.nn.Parameter]:
    """What learns: the decoder and the conv in front of it. Encoder and codebook stay frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.decoder.parameters()) + list(model.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def train(work: Path, run: DecoderRun, max_minutes: float | None = None) -> bool:
    """Runs to run.steps from the shipped decoder, checkpointed, resumable; True when done."""
    folder = work / run.name
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_path = folder / "train.ckpt"
    torch.manual_seed(0)
    pixels, masks, codes = load_split(work, "train")
    model = load_vqgan(SHIPPED)
    params = decoder_params(model)
    opt = torch.optim.Adam(params, lr=run.lr, betas=(0.5, 0.9))
    step, seconds = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, seconds = ck["step"], ck["seconds"]
        log(f"{run.name}: resumed at step {step}")
    model.train()
    start = time.time()
    while step < run.steps:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(run.lr, step, run.steps)
        # the batch is a function of the step, so a resumed run draws what an uninterrupted one would
        idx = torch.randint(len(pixels), (run.batch,), generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            zq = model.quantize.lookup(codes[idx])
        loss = decoder_loss(model.decode_latent(zq), pixels[idx], masks[idx], run)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seconds += time.time() - t0
        if step % 50 == 0:
            zero_denormals(opt)
        if step % 20 == 0:
            log(f"{run.name} step {step}/{run.steps} loss {loss.item():.4f} ({seconds / step:.3f} s/step)")
        stop = max_minutes is not None and time.time() - start > 60 * max_minutes
        if step % CHECKPOINT_EVERY == 0 or step == run.steps or stop:
            save_checkpoint(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), step=step, seconds=seconds)
        if stop and step < run.steps:
            return False
    save_vqgan(model.eval(), folder / "vqgan")
    atomic_write_json(folder / "run.json", {**asdict(run), "train_seconds": round(seconds, 1),
                                            "threads": torch.get_num_threads()})
    return True


# --- scoring ----------------------------------------------------------------------------------------------

@torch.no_grad()
def score(vqgan_dir: Path, work: Path, split: str, reader) -> dict:
    """PSNR (whole, subject, background) and the reader on the decoded frozen codes of a split's renders."""
    pixels, masks, codes = load_split(work, split)
    model = load_vqgan(vqgan_dir)
    recon = torch.cat([model.decode(chunk) for chunk in codes.split(250)])
    arr = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    truth = ((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    cover = masks[:, 0].numpy()
    images = [Image.fromarray(a) for a in arr]
    scenes = split_scenes(split)
    return {"psnr": psnr(arr, truth), "psnr_subject": psnr(arr, truth, cover >= 0.5),
            "psnr_background": psnr(arr, truth, cover < 0.5),
            "reader": accuracy(reader, images, scenes), **identity_figures(reader, images, scenes)}


def score_runs(work: Path, names: list[str], split: str) -> dict:
    reader = load_reader()
    results_path = work / f"scores-{split}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in names:
        folder = SHIPPED if name == "v2" else work / name / "vqgan"
        results[name] = score(folder, work, split, reader)
        r = results[name]
        log(f"{split} {name}: PSNR {r['psnr']:.2f} subject {r['psnr_subject']:.2f} background "
            f"{r['psnr_background']:.2f} identity-all {r['identity_all']:.3f} "
            + " ".join(f"{k}={v:.3f}" for k, v in r["reader"].items()))
    atomic_write_json(results_path, results)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["data", "train", "score"])
    ap.add_argument("names", nargs="*", help="run names (score: 'v2' is the shipped decoder)")
    ap.add_argument("--work", type=Path, default=Path("runs/mini-decoder"))
    add_run_options(ap, DecoderRun)  # --subject-weight, --edge-weight, --steps, --batch, --lr
    ap.add_argument("--split", choices=sorted(SPLITS), default="dev")
    ap.add_argument("--max-minutes", type=float)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)  # denormal floats make CPU kernels many times slower
    if args.what == "data":
        for split in ("train", "dev", "test"):
            build_split(args.work, split)
    elif args.what == "train":
        for name in args.names:
            run = run_from_options(DecoderRun, name, args)
            if train(args.work, run, args.max_minutes):
                log(f"{name}: done")
    else:
        score_runs(args.work, args.names, args.split)


if __name__ == "__main__":
    main()
