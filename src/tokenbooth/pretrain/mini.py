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
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.chameleon import PROMPT_TEMPLATE, ChameleonBackbone, ChameleonSpec
from ..backbones.chameleon_build import BPE_MERGES, chameleon_config, train_bpe_tokenizer
from ..assets import MINI_DIR
from ..errors import UserError
from ..io import atomic_path
from ..toyworld import Scene, caption, pretraining_scene, render
from ..vq import VQGAN, VQGANConfig, save_vqgan
from .loop import load_checkpoint, log, resume, save_checkpoint, zero_denormals  # noqa: F401 (resume: re-exported)

RESOLUTION = 64
MODEL_DIR = MINI_DIR  # the shipped model folder `--recipe v2` writes


@dataclass(frozen=True)
class Recipe:
    """Everything that makes one version of mini: its tokenizer, transformer and their training budgets."""

    name: str
    vqgan: VQGANConfig
    size_unit: int  # pixels a size token counts: two VQ latents a side, as in Lumina-mGPT
    context: int  # positions: a prompt of about 40 tokens + the image block (rows of latents and a row end)
    # Cosine cycles with warm restarts (steps, peak learning rate), each with its own warm-up
    transformer_cycles: tuple[tuple[int, float], ...]
    hidden: int = 256
    layers: int = 6
    heads: int = 8
    transformer_batch: int = 48
    num_scenes: int = 60_000
    vqgan_steps: int = 8000  # 0: trained elsewhere, given with --vqgan
    vqgan_batch: int = 8
    vqgan_lr: float = 4e-4
    decoder_steps: int = 1200
    decoder_lr: float = 2e-4
    model_dir: Path | None = None  # where `export` writes; None: <work>/model

    @property
    def transformer_steps(self) -> int:
        return sum(steps for steps, _ in self.transformer_cycles)

    @property
    def spec(self) -> ChameleonSpec:
        return ChameleonSpec(resolution=RESOLUTION, size_unit=self.size_unit, family="mini")


# mini v2, what ships. Its VQGAN: the same class as Chameleon's (ch 128, ch_mult 1,1,2,2,4, 8192 codes), 4x
# down-sampling so that 64 px images become 16 x 16 = 256 tokens. 8x (64 tokens) was tried first from scratch:
# its codes smeared the patterns, accents and parts away (21.5 dB), the identity stage 2 exists to learn.
# Its transformer's cycles: the first 1200-step cycle left the loss still falling (1.80) and prompts
# half-followed; a second, gentler cycle continued from it (a stopped run is extended by resuming, not
# retrained). The second ended at 1.53 with objects still smudged (backgrounds right 96%, colors and positions
# about 71%): a third, gentler still, followed.
V2 = Recipe(
    name="v2",
    vqgan=VQGANConfig(embed_dim=32, n_embed=1024, z_channels=64, ch=32, ch_mult=(1, 2, 4), num_res_blocks=1,
                      resolution=RESOLUTION),
    size_unit=8, context=384, transformer_cycles=((1200, 1e-3), (1800, 5e-4), (1800, 3e-4)), model_dir=MODEL_DIR)
# mini v3 (issue #23): 8x down-sampling, 8 x 8 = 64 tokens a picture and 4096 codes. Its VQGAN is not trained
# here: it is the tokenizer pilot's design D (v2's grown by one level, subject-weighted; mini_v3_pilot.py),
# passed with --vqgan. A 64-token picture makes a sequence of at most about 115 positions instead of 315, so
# at v2's steps and batch a transformer of v2's size costs 0.26x v2's step and one of 384 x 8 layers (3.2x
# v2's parameters) 0.60x (benchmarks/mini_step.py, 2 cores): v3 takes the larger one.
V3 = Recipe(
    name="v3",
    vqgan=VQGANConfig(embed_dim=32, n_embed=4096, z_channels=64, ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1,
                      resolution=RESOLUTION),
    size_unit=16, context=160, transformer_cycles=((1200, 1e-3), (1800, 5e-4), (1800, 3e-4)), hidden=384,
    layers=8, vqgan_steps=0, decoder_steps=0)
RECIPES = {r.name: r for r in (V2, V3)}
# v2's names, read by the tokenizer pilot and the tests
VQGAN_CONFIG, MINI_SPEC = V2.vqgan, V2.spec
WARMUP = 100


# --- data ---------------------------------------------------------------------------------------------

def build_data(work: Path, recipe: Recipe = V2) -> None:
    if (work / "scenes.jsonl").exists():
        return
    log(f"rendering {recipe.num_scenes} scenes")
    scenes = [pretraining_scene(i) for i in range(recipe.num_scenes)]
    pixels = np.stack([np.asarray(render(s, RESOLUTION)) for s in scenes])
    with atomic_path(work / "pixels.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, pixels)
    with atomic_path(work / "scenes.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in scenes))


def load_pixels(work: Path) -> torch.Tensor:
    arr = np.load(work / "pixels.npy")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_scenes(work: Path) -> list[Scene]:
    return [Scene.from_dict(json.loads(line)) for line in (work / "scenes.jsonl").read_text().splitlines()]


# --- VQGAN --------------------------------------------------------------------------------------------

def restart_dead_codes(model: VQGAN, usage: torch.Tensor, latents: torch.Tensor) -> int:
    """Codes nobody picked lately are moved onto random encoder outputs, so the whole codebook gets used."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    picks = flat[torch.randint(len(flat), (len(dead),))]
    model.quantize.embedding.weight.data[dead] = picks + 0.01 * torch.randn_like(picks)
    return len(dead)


def train_vqgan(work: Path, recipe: Recipe = V2, device: str = "cpu", trained: Path | None = None) -> None:
    out = work / "vqgan"
    if (out / "vqgan.safetensors").exists():
        return
    if trained is not None:  # a tokenizer trained elsewhere (v3's: the pilot's design D)
        use_trained_vqgan(trained, recipe, out)
        return
    if recipe.vqgan_steps == 0:
        raise UserError(f"mini {recipe.name}'s VQGAN is trained by the tokenizer pilot: pass --vqgan FOLDER "
                        "(python -m tokenbooth.pretrain.mini_v3_pilot train D --steps 4000 writes <work>/D/vqgan)")
    torch.manual_seed(0)
    pixels = load_pixels(work)
    held_out = pixels[-1000:]  # never trained on: the PSNR in the README is measured on these
    pixels = pixels[:-1000]
    model = VQGAN(recipe.vqgan).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.vqgan_lr, betas=(0.5, 0.9))
    ckpt_path = work / "vqgan.ckpt"
    step = 0
    if (ck := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        torch.set_rng_state(ck["rng"])
        log(f"vqgan: resumed at step {step}")
    usage = torch.zeros(recipe.vqgan.n_embed, device=device)
    t0 = time.time()
    while step < recipe.vqgan_steps:
        lr = recipe.vqgan_lr * 0.5 * (1 + math.cos(math.pi * step / recipe.vqgan_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = pixels[torch.randint(len(pixels), (recipe.vqgan_batch,))].to(device)
        recon, q_loss, idx = model(batch)
        rec_loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        loss = rec_loss + q_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(idx.flatten(), minlength=recipe.vqgan.n_embed)
        step += 1
        if step % 50 == 0:
            zero_denormals(opt)
        if step % 100 == 0 and step < recipe.vqgan_steps * 0.8:
            with torch.no_grad():
                n = restart_dead_codes(model, usage, model.encode_latent(batch))
            usage.zero_()
            log(f"vqgan step {step} loss {rec_loss.item():.4f} q {q_loss.item():.4f} restarted {n} "
                f"({(time.time() - t0) / 100:.2f}s/step)")
            t0 = time.time()
        if step % 1000 == 0:
            model.eval()
            log(f"vqgan step {step}: held-out PSNR {vqgan_psnr(model, held_out[:200]):.2f} dB (200 renders)")
            model.train()
        if step % 200 == 0 or step == recipe.vqgan_steps:
            save_checkpoint(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), step=step,
                            rng=torch.get_rng_state())
    model.eval()
    log(f"vqgan: held-out PSNR {vqgan_psnr(model, held_out):.2f} dB")
    save_vqgan(model.cpu(), out)


def use_trained_vqgan(trained: Path, recipe: Recipe, out: Path) -> None:
    """Copies a VQGAN trained elsewhere into the run, after checking it is the recipe's shape."""
    from ..vq import load_vqgan

    model = load_vqgan(trained)
    if model.config != recipe.vqgan:
        raise UserError(f"--vqgan {trained}: its config is not mini {recipe.name}'s ({model.config} != {recipe.vqgan})")
    save_vqgan(model, out)
    log(f"vqgan: {trained} ({recipe.vqgan.downsample}x, {recipe.vqgan.n_embed} codes)")


def finetune_decoder(work: Path, recipe: Recipe = V2, device: str = "cpu") -> None:
    """More training for the decoder alone, with encoder and codebook frozen: pictures get sharper while
    every image's tokens, and so the transformer trained on them, stay exactly valid."""
    from ..vq import load_vqgan

    done = work / "vqgan" / "decoder_finetuned"
    if done.exists() or recipe.decoder_steps == 0:
        return
    torch.manual_seed(1)
    model = load_vqgan(work / "vqgan").to(device)
    pixels = load_pixels(work)
    held_out, pixels = pixels[-1000:], pixels[:-1000]
    log(f"decoder: held-out PSNR before {vqgan_psnr(model, held_out):.2f} dB")
    params = list(model.decoder.parameters()) + list(model.post_quant_conv.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=recipe.decoder_lr, betas=(0.5, 0.9))
    model.train()
    for step in range(1, recipe.decoder_steps + 1):
        for g in opt.param_groups:
            g["lr"] = recipe.decoder_lr * 0.5 * (1 + math.cos(math.pi * step / recipe.decoder_steps))
        batch = pixels[torch.randint(len(pixels), (recipe.vqgan_batch,))].to(device)
        with torch.no_grad():
            zq = model.quantize.lookup(model.encode(batch))
        recon = model.decode_latent(zq)
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            zero_denormals(opt)
        if step % 200 == 0:
            log(f"decoder step {step} loss {loss.item():.4f}")
    model.eval()
    log(f"decoder: held-out PSNR after {vqgan_psnr(model, held_out):.2f} dB")
    save_vqgan(model.cpu(), work / "vqgan")
    done.write_text("1\n")


@torch.no_grad()
def vqgan_psnr(model: VQGAN, pixels: torch.Tensor) -> float:
    """Mean PSNR (dB) of reconstructions, images in [-1, 1] measured on the 0..255 scale."""
    psnrs = []
    device = next(model.parameters()).device
    for chunk in pixels.split(250):
        chunk = chunk.to(device)
        recon = model.decode(model.encode(chunk))
        to255 = lambda t: ((t + 1) * 127.5).round()  # noqa: E731
        mse = (to255(recon) - to255(chunk)).pow(2).flatten(1).mean(1)
        psnrs.append(10 * torch.log10(255**2 / mse.clamp_min(1e-8)))
    return torch.cat(psnrs).mean().item()


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
        body = backbone.layout.body_from_codes(codes[i : i + 1])[0].tolist() + list(backbone.layout.trailer)
        prefix = backbone.unconditional_ids() if rng.random() < 0.1 else backbone.prompt_ids(caption(scenes[i], rng))
        seqs.append(prefix + body)
        labels.append([-100] * len(prefix) + body)
    return pad_batch(seqs, labels, backbone.model.config.pad_token_id)


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


def next_token_losses(backbone, ids, labels, compute_dtype=torch.bfloat16):
    """Each position's full-vocabulary cross-entropy against the next label, flattened, and where a label is
    known (not -100); matrix products in `compute_dtype` (float32: none under autocast), the loss in fp32."""
    with torch.autocast(backbone.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden, _ = backbone.hidden_states(ids)
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
            return peak * min(1.0, (t + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * t / steps))
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
    backbone.model = ChameleonForConditionalGeneration.from_pretrained(transformer or work / "transformer")
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
