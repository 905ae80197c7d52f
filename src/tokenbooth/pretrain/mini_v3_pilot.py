"""mini v3's tokenizer pilot: VQGAN designs trained at equal compute, then scored by the reader (issue #23).

    python -m tokenbooth.pretrain.mini_v3_pilot data  --work /work/runs/v3pilot
    python -m tokenbooth.pretrain.mini_v3_pilot bench --work /work/runs/v3pilot   # seconds a step, each design
    python -m tokenbooth.pretrain.mini_v3_pilot train B --steps 1500 --work /work/runs/v3pilot [--device cuda]
    python -m tokenbooth.pretrain.mini_v3_pilot train E --steps 2800 --work /work/runs/v3pilot   # D + adversarial
    python -m tokenbooth.pretrain.mini_v3_score --work /work/runs/v3pilot          # figures and grids

Every design is tokenbooth's own `VQGAN` class (the Lumina-mGPT code path); only `VQGANConfig` and the loss
change. A run checkpoints atomically every CHECKPOINT_EVERY steps (model, optimizer, step, RNG, code usage)
and resumes bitwise; when it ends it writes `<work>/<design>/vqgan` as `save_vqgan` does.

The subject's pixels come from toyworld's renderer itself (`subject_mask`): the scene's subject drawn by the
same drawers onto a black and onto a white canvas; where the two agree, the subject covers the pixel. No
instrument (reader, toyDINO, toyCLIP) is used in training: they only judge the results (mini_v3_score.py).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..assets import MINI_DIR
from ..io import atomic_write_json
from ..toyworld import Scene, pretraining_scene, render
# The renderer's own drawers, so that the mask is exactly what `render` paints (toyworld has no public mask).
from ..toyworld.render import CANVAS, DRAWERS, _accessory, _Painter, draw_background, object_box
from ..vq import VQGAN, VQGANConfig, load_vqgan, save_vqgan
from .loop import log, save_checkpoint, warmup_cosine, zero_denormals
from .mini_recipes import RESOLUTION, VQGAN_CONFIG
from .mini_vqgan import restart_dead_codes
from .patch_discriminator import PatchDiscriminator, adaptive_weight, feature_matching_loss, hinge_discriminator_loss

NUM_TRAIN = 20_000  # pretraining scenes 0..N-1 of v2's stream (base seed 0); a 30-minute run sees ~1 epoch
NUM_HELD_OUT = 500  # scored on: the reader's held-out stream (base seed 7), never trained on by any VQGAN here
HELD_OUT_SEED = 7
# indices in the held-out stream: every later choice is made on "dev", "test" is reported once
HELD_OUT_SPLITS = {"test": range(0, NUM_HELD_OUT), "dev": range(NUM_HELD_OUT, 2 * NUM_HELD_OUT)}
CHECKPOINT_EVERY = 50  # steps: a few minutes at the 1.5-4 s a step one shared CPU thread gives


@dataclass(frozen=True)
class Design:
    """One tokenizer to compare: its VQGAN shape and how its reconstruction loss is weighted."""

    name: str
    vqgan: VQGANConfig
    subject_weight: float = 0.0  # a subject pixel counts 1 + this in the reconstruction loss
    lr: float = 4e-4
    batch: int = 8
    grow_from: Path | None = None  # a trained VQGAN one level shallower to start from (see `deepen`)
    # A patch discriminator trained alongside: its hinge loss and the L1 distance between its features on the
    # render and on the reconstruction (a perceptual loss learned here, from no instrument) join the loss,
    # scaled so that their gradient at the decoder's last layer is `adversarial_weight` times the
    # reconstruction's (taming's adaptive weight), from step `adversarial_start` on. 0: no discriminator.
    adversarial_weight: float = 0.0
    adversarial_start: int = 0
    note: str = ""


# 8x down-sampling keeps v2's 32 channels at full resolution (where a step's time goes) and widens the coarse
# levels, where each of the 64 tokens must now hold what four held: 32, 64, 128, 256 channels at 64..8 px.
WIDE_8X = VQGANConfig(embed_dim=32, n_embed=4096, z_channels=128, ch=32, ch_mult=(1, 2, 4, 8), num_res_blocks=1,
                      resolution=RESOLUTION)
DESIGNS = {
    "A": Design("A", VQGAN_CONFIG, note="v2's tokenizer: 4x, 256 tokens, 1024 codes, L1+L2"),
    "B": Design("B", WIDE_8X, subject_weight=4.0,
                note="8x, 64 tokens, 4096 codes, wider coarse levels, subject pixels weighted 5x"),
    # B's first run stayed a blur (11.7 dB) where A had learned: C keeps B but with v2's narrow channels
    # (one more 128-channel level), to tell "8x with 4096 codes" apart from "a wider net starts slower".
    "C": Design("C", replace(WIDE_8X, z_channels=64, ch_mult=(1, 2, 4, 4)), subject_weight=4.0,
                note="B with v2's channels: 8x, 64 tokens, 4096 codes, 32-64-128-128 channels, subject 5x"),
    # B and C learned too slowly from scratch on a CPU. D is C grown from v2's trained 4x tokenizer: its levels
    # keep v2's weights, the new 8 px level starts as an average pool / identity, so training begins from a
    # working (blurred) 8x tokenizer instead of noise; batch 16 feeds 4096 codes twice as often as C's 8.
    "D": Design("D", replace(WIDE_8X, z_channels=64, ch_mult=(1, 2, 4, 4)), subject_weight=4.0, lr=2e-4, batch=16,
                grow_from=MINI_DIR / "vqgan",
                note="C grown from v2's shipped 4x tokenizer (one identity-initialised 8 px level), batch 16, lr 2e-4"),
}
# D's reconstructions lose what L1 + L2 blur away (handles, antennae, the accent): E adds the sharpening losses
# VQGAN itself trains with, a discriminator and a perceptual distance, both learned in the run. The generator's
# term waits until the discriminator has had 300 steps to learn what renders look like.
DESIGNS["E"] = replace(DESIGNS["D"], name="E", adversarial_weight=0.5, adversarial_start=300,
                       note="D plus a patch discriminator: hinge loss and feature matching, adaptive weight 0.5")


# --- the subject's pixels, from the renderer ---------------------------------------------------------------

def _subject_on(scene: Scene, fill) -> np.ndarray:
    """The scene's subject (and accessory) drawn as `render` draws it, on a flat canvas of color `fill`."""
    rng = random.Random(scene.seed)
    draw_background(scene.background, rng)  # advances the RNG exactly as render() does before the box
    canvas = Image.new("RGB", (CANVAS, CANVAS), fill)
    painter = _Painter(canvas, object_box(scene, rng), scene.instance)
    head = DRAWERS[scene.instance.cls](painter)
    if scene.accessory and head is not None:
        _accessory(painter, head, scene.accessory)
    return np.asarray(canvas)


def subject_mask(scene: Scene, size: int = RESOLUTION) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the share of each pixel that the subject covers in render(scene, size)."""
    on_black, on_white = _subject_on(scene, (0, 0, 0)), _subject_on(scene, (255, 255, 255))
    covered = Image.fromarray(((on_black == on_white).all(-1) * 255).astype(np.uint8))
    if size != CANVAS:
        covered = covered.resize((size, size), Image.BOX)  # the same box filter that render() uses
    return np.asarray(covered, dtype=np.float32) / 255.0


def token_share(mask: np.ndarray, down: int, min_cover: float = 0.25) -> float:
    """Share of image tokens (down x down pixel cells) of which the subject covers at least `min_cover`,
    as issue #23 counted a token as the subject's."""
    h, w = mask.shape[-2:]
    cells = mask.reshape(*mask.shape[:-2], h // down, down, w // down, down).mean(axis=(-3, -1))
    return float((cells >= min_cover).mean())


# --- growing a trained tokenizer by one level -------------------------------------------------------------

@torch.no_grad()
def deepen(shallow: VQGAN, cfg: VQGANConfig, pixels: torch.Tensor) -> VQGAN:
    """A VQGAN of `cfg` (one level more than `shallow`'s) that starts as `shallow` with its latent grid halved.

    Every tensor whose name and shape agree is copied. The new encoder level's blocks are identities (their last
    conv zeroed; blocks are residual) behind a down-sampling conv set to a 2 x 2 average; the new decoder level's
    blocks are identities before a nearest up-sampling whose conv is the identity. The codebook is drawn from the
    new latents of `pixels`, so each code starts where latents are."""
    if len(cfg.ch_mult) != len(shallow.config.ch_mult) + 1:
        raise ValueError("deepen adds exactly one level")
    deep = VQGAN(cfg)
    old = shallow.state_dict()
    state = deep.state_dict()
    for name, tensor in state.items():
        if name in old and old[name].shape == tensor.shape:
            tensor.copy_(old[name])
    new_level = len(cfg.ch_mult) - 1
    for block in [*deep.encoder.down[new_level].block, *deep.decoder.up[new_level].block]:
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    down = deep.encoder.down[new_level - 1].downsample.conv  # the shallow net's last level now halves its grid
    up = deep.decoder.up[new_level].upsample.conv
    for conv, taps in ((down, (slice(0, 2), slice(0, 2))), (up, (slice(1, 2), slice(1, 2)))):
        conv.weight.zero_()
        conv.bias.zero_()
        channels = torch.arange(conv.weight.shape[0])
        weight = 1.0 / (taps[0].stop - taps[0].start) ** 2
        conv.weight[channels, channels, taps[0], taps[1]] = weight
    latents = deep.encode_latent(pixels).permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
    picks = torch.randperm(len(latents))[: cfg.n_embed]
    codes = latents[picks]
    if len(codes) < cfg.n_embed:
        codes = codes[torch.randint(len(codes), (cfg.n_embed,))]
    deep.quantize.embedding.weight.copy_(codes + 0.01 * torch.randn_like(codes))
    return deep


# --- data -------------------------------------------------------------------------------------------------

def render_set(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels (N, 64, 64, 3) and uint8 subject coverage (N, 64, 64), 255 = fully covered."""
    pixels = np.stack([np.asarray(render(s, RESOLUTION)) for s in scenes])
    masks = np.stack([(subject_mask(s) * 255).round().astype(np.uint8) for s in scenes])
    return pixels, masks


def held_out_scenes(n: int = NUM_HELD_OUT, split: str = "test") -> list[Scene]:
    """The first n scenes of a split of the held-out stream: the pilot scored on "test" (it came first)."""
    return [pretraining_scene(i, base_seed=HELD_OUT_SEED) for i in HELD_OUT_SPLITS[split][:n]]


def build_data(work: Path, num_train: int = NUM_TRAIN, num_held_out: int = NUM_HELD_OUT) -> None:
    if (work / "train.npz").exists():
        return
    sets = (("held_out", held_out_scenes(num_held_out)), ("train", [pretraining_scene(i) for i in range(num_train)]))
    for name, scenes in sets:
        t0 = time.time()
        pixels, masks = render_set(scenes)
        tmp = work / f".{name}.tmp.npz"
        np.savez(tmp, pixels=pixels, masks=masks)
        tmp.replace(work / f"{name}.npz")  # whole or not at all
        log(f"data: {len(scenes)} {name} scenes rendered with masks in {time.time() - t0:.0f} s")


def load_set(work: Path, name: str, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (N, 3, 64, 64) in [-1, 1] and subject coverage (N, 1, 64, 64) in [0, 1]."""
    data = np.load(work / f"{name}.npz")
    pixels = torch.from_numpy(data["pixels"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    masks = torch.from_numpy(data["masks"]).float()[:, None] / 255.0
    return pixels.to(device), masks.to(device)


# --- training ---------------------------------------------------------------------------------------------

def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, subject_weight: float):
    """v2's L1 + L2, averaged with per-pixel weights 1 + subject_weight * coverage (normalised, so a design
    without weighting gets exactly v2's loss)."""
    err = (recon - target).abs() + (recon - target).pow(2)
    if subject_weight == 0:
        return err.mean()
    w = 1.0 + subject_weight * mask
    return (err * w).sum() / (w.sum() * err.shape[1])


class Trainer:
    """One design's run: setup (model, optimizer, resume), step(), save_checkpoint(), export()."""

    def __init__(self, design: Design, work: Path, total_steps: int, device: str = "cpu"):
        self.design, self.total_steps, self.device = design, total_steps, device
        self.folder = work / design.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.folder / "train.ckpt"
        torch.manual_seed(0)
        self.pixels, self.masks = load_set(work, "train", device)
        self.model = VQGAN(design.vqgan).to(device).train()
        if design.grow_from is not None and not self.ckpt_path.exists():
            # n_embed latents need n_embed / tokens-per-picture pictures (the first ones: no step draws them so)
            per_picture = (RESOLUTION // design.vqgan.downsample) ** 2
            sample = self.pixels[: -(-design.vqgan.n_embed // per_picture)].cpu()
            self.model = deepen(load_vqgan(design.grow_from), design.vqgan, sample).to(device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=design.lr, betas=(0.5, 0.9))
        self.disc = self.disc_opt = None
        if design.adversarial_weight > 0:
            self.disc = PatchDiscriminator().to(device).train()
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=design.lr, betas=(0.5, 0.9))
        self.usage = torch.zeros(design.vqgan.n_embed, device=device)
        # wall-clock and CPU seconds of training steps: on a shared machine CPU time is the fairer measure
        self.step_no, self.seconds, self.cpu_seconds = 0, 0.0, 0.0
        if self.ckpt_path.exists():
            ck = torch.load(self.ckpt_path, weights_only=True, map_location=device)
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["opt"])
            self.usage = ck["usage"].to(device)
            if self.disc is not None:
                self.disc.load_state_dict(ck["disc"])
                self.disc_opt.load_state_dict(ck["disc_opt"])
            self.step_no, self.seconds, self.cpu_seconds = ck["step"], ck["seconds"], ck.get("cpu_seconds", 0.0)
            torch.set_rng_state(ck["rng"])
            if device != "cpu" and "cuda_rng" in ck:
                torch.cuda.set_rng_state(ck["cuda_rng"])
            log(f"{design.name}: resumed at step {self.step_no}")

    @property
    def optimizers(self) -> list:
        return [self.opt] if self.disc_opt is None else [self.opt, self.disc_opt]

    def step(self) -> dict:
        d, step = self.design, self.step_no
        lr = warmup_cosine(d.lr, step, self.total_steps)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr
        # the batch is a function of the step, so a resumed run draws what an uninterrupted one would
        gen = torch.Generator().manual_seed(step)
        idx = torch.randint(len(self.pixels), (d.batch,), generator=gen).to(self.device)
        batch, mask = self.pixels[idx], self.masks[idx]
        recon, q_loss, codes = self.model(batch)
        rec = reconstruction_loss(recon, batch, mask, d.subject_weight)
        loss, out = rec + q_loss, {"rec": rec.item(), "q": q_loss.item()}
        if self.disc is not None and step >= d.adversarial_start:
            fake_logits, fake_features = self.disc(recon)
            with torch.no_grad():
                _, real_features = self.disc(batch)
            sharpen = -fake_logits.mean() + feature_matching_loss(real_features, fake_features)
            weight = d.adversarial_weight * adaptive_weight(rec, sharpen, self.model.decoder.conv_out.weight)
            loss = loss + weight * sharpen
            out.update(sharpen=sharpen.item(), weight=weight.item())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.disc is not None:
            out["disc"] = self.discriminator_step(batch, recon.detach())
        self.usage += torch.bincount(codes.flatten(), minlength=d.vqgan.n_embed)
        self.step_no += 1
        if self.step_no % 50 == 0 and self.device == "cpu":
            for opt in self.optimizers:
                zero_denormals(opt)
        if self.step_no % 100 == 0 and self.step_no < 0.8 * self.total_steps:  # v2's dead-code restarts
            with torch.no_grad():
                out["restarted"] = restart_dead_codes(self.model, self.usage, self.model.encode_latent(batch))
            self.usage.zero_()
        return out

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        real_logits, _ = self.disc(real)
        fake_logits, _ = self.disc(fake)
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        return loss.item()

    def save_checkpoint(self) -> None:
        state = dict(model=self.model.state_dict(), opt=self.opt.state_dict(), step=self.step_no,
                     seconds=self.seconds, cpu_seconds=self.cpu_seconds, usage=self.usage.cpu(),
                     rng=torch.get_rng_state())
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_opt=self.disc_opt.state_dict())
        if self.device != "cpu":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        save_checkpoint(self.ckpt_path, **state)

    def progress(self, last: dict) -> str:
        losses = " ".join(f"{k} {v:.4g}" for k, v in last.items())
        return (f"{self.design.name} step {self.step_no}/{self.total_steps} {losses} ({self.seconds / self.step_no:.3f}"
                f" s/step, {self.cpu_seconds / self.step_no:.3f} CPU s/step)")

    def train(self, max_minutes: float | None = None) -> bool:
        """Runs to total_steps (or until max_minutes pass, checkpointed, to be resumed); True when done."""
        start, last = time.time(), {}
        while self.step_no < self.total_steps:
            t0, c0 = time.time(), time.process_time()
            last = self.step()
            self.seconds += time.time() - t0
            self.cpu_seconds += time.process_time() - c0
            if self.step_no % 100 == 0:
                log(self.progress(last))
            if self.step_no % CHECKPOINT_EVERY == 0 or self.step_no == self.total_steps:
                self.save_checkpoint()
            if max_minutes is not None and time.time() - start > 60 * max_minutes:
                self.save_checkpoint()
                return False
        return True

    def export(self) -> Path:
        out = self.folder / "vqgan"
        save_vqgan(self.model.cpu().eval(), out)
        atomic_write_json(self.folder / "run.json", {
            "design": self.design.name, "note": self.design.note, "steps": self.step_no,
            "train_seconds": round(self.seconds, 1), "s_per_step": round(self.seconds / max(self.step_no, 1), 4),
            "cpu_seconds": round(self.cpu_seconds, 1),
            "cpu_s_per_step": round(self.cpu_seconds / max(self.step_no, 1), 4),
            "batch": self.design.batch, "subject_weight": self.design.subject_weight,
            "threads": torch.get_num_threads(), "device": self.device,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "tokens_per_image": (RESOLUTION // self.design.vqgan.downsample) ** 2})
        return out


def bench(work: Path, steps: int = 20, device: str = "cpu") -> dict:
    """Wall-clock and CPU seconds a training step per design (after 3 warm-up steps), in a throwaway folder."""
    out = {}
    for name, design in DESIGNS.items():
        trainer = Trainer(replace(design, name=f"bench-{name}"), work, total_steps=10**6, device=device)
        for _ in range(3):
            trainer.step()
        t0, c0 = time.time(), time.process_time()
        for _ in range(steps):
            trainer.step()
        out[name] = {"s_per_step": (time.time() - t0) / steps, "cpu_s_per_step": (time.process_time() - c0) / steps}
        log(f"bench {name}: {out[name]} ({torch.get_num_threads()} threads, {device})")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["data", "bench", "train"])
    ap.add_argument("design", nargs="?", choices=sorted(DESIGNS))
    ap.add_argument("--work", type=Path, default=Path("runs/v3pilot"))
    ap.add_argument("--steps", type=int, help="training steps for this design (its compute budget)")
    ap.add_argument("--max-minutes", type=float, help="stop after this long, checkpointed (resume to go on)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)  # denormal floats make CPU kernels many times slower
    build_data(args.work)
    if args.what == "bench":
        atomic_write_json(args.work / "bench.json", bench(args.work, device=args.device))
    elif args.what == "train":
        if args.design is None or args.steps is None:
            ap.error("train needs a design and --steps")
        trainer = Trainer(DESIGNS[args.design], args.work, args.steps, args.device)
        if trainer.train(args.max_minutes):
            log(f"{args.design}: done, exported to {trainer.export()}")


if __name__ == "__main__":
    main()
