"""mini's image tokenizer, the `vqgan` and `decoder` steps of `python -m tokenbooth.pretrain.mini`: the VQGAN
trained from scratch (v2) or taken from the tokenizer pilot (v3, --vqgan), then its decoder sharpened."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..vq import VQGAN, save_vqgan
from .loop import load_checkpoint, log, save_checkpoint, warmup_cosine, zero_denormals
from .mini_recipes import V2, Recipe, load_pixels

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
        lr = warmup_cosine(recipe.vqgan_lr, step, recipe.vqgan_steps)
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
            g["lr"] = warmup_cosine(recipe.decoder_lr, step, recipe.decoder_steps)
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
