"""toyCLIP: a tiny CLIP trained from scratch on toyworld, on a CPU: python -m tokenbooth.pretrain.toyclip

It is saved in transformers' CLIPModel format (config.json + weights + CLIP's vocab.json/merges.txt), so the
metric code that reads real CLIP ViT-B/32 (tokenbooth.eval.metrics.load_clip) reads it unchanged and
CLIP-I / CLIP-T can be computed on toyworld images, which real CLIP was never trained on.

  tokenizer  CLIP-style BPE ("</w>" ends a word, lowercase, <|startoftext|> / <|endoftext|>) on captions
  model      ViT 64 px / patch 8 and a text transformer, both 128 wide and 4 deep, projected to 128
  train      the symmetric contrastive loss on (render, caption) pairs of the pretraining stream
Budget on 2 cores: about 8 minutes. `discrimination_report()` checks that the metrics tell subjects apart.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..assets import TOYCLIP_DIR
from ..eval.metrics import CLIP_MEAN, CLIP_STD, clip_pixels, load_clip
from ..toyworld import BACKGROUNDS, COLORS, POSITIONS, Scene, caption, describe, pretraining_scene, render
from ..toyworld import reserved_instances
from .loop import zero_denormals

MODEL_DIR = TOYCLIP_DIR  # the shipped model folder this script writes
RESOLUTION = 64
NUM_SCENES = 40_000
TOKENIZER_CAPTIONS = 20_000  # captions the BPE is trained on (the vocabulary is small: every word gets merged)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

BATCH = 256
STEPS = 200  # 1.4 s a step on one thread (OMP_NUM_THREADS=1: 2 threads on a shared 2-core CPU ran 10x slower)
LR = 1e-3
WARMUP = 20
WEIGHT_DECAY = 0.1  # matrices only; norms, biases, embeddings of size 1 and the logit scale are not decayed


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# --- tokenizer ----------------------------------------------------------------------------------------

def train_tokenizer(captions: list[str], out: Path):
    """CLIP's BPE format: vocab.json + merges.txt that transformers.CLIPTokenizer loads."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs, as CLIP's regex splits them
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=[BOS, EOS], end_of_word_suffix="</w>",
                                  show_progress=False)
    tok.train_from_iterator(captions, trainer)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / stale).unlink(missing_ok=True)  # an earlier toyCLIP's fast tokenizer would shadow the new vocabulary
    tok.model.save(str(out))
    clip_tok = CLIPTokenizer.from_pretrained(out, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    clip_tok.save_pretrained(out)  # tokenizer_config.json + special_tokens_map.json: pad = <|endoftext|>, as CLIP
    return CLIPTokenizer.from_pretrained(out)


def check_tokenizer(tokenizer, captions: list[str]) -> None:
    """Every word of the captions is one token (CLIP's tokens for common words are whole words too)."""
    for text in captions:
        ids = tokenizer(text)["input_ids"]
        words = text.replace(",", " ,").split()
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id, (text, ids)
        assert len(ids) == len(words) + 2, (text, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.unk_token_id not in ids[1:-1], text


# --- model --------------------------------------------------------------------------------------------

def build_model(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=512, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=RESOLUTION, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=512)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=128))


# --- data ---------------------------------------------------------------------------------------------

def render_scenes(n: int) -> tuple[list[Scene], torch.Tensor]:
    """Scenes and their pixels, preprocessed as metrics.clip_pixels does (at 64 px: CLIP's mean/std only)."""
    scenes = [pretraining_scene(i) for i in range(n)]
    rgb = torch.from_numpy(np.stack([np.asarray(render(s, RESOLUTION).convert("RGB")) for s in scenes]))
    pixels = rgb.permute(0, 3, 1, 2).float() / 255.0
    pixels = (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert torch.allclose(pixels[0], clip_pixels(render(scenes[0], RESOLUTION), RESOLUTION), atol=1e-6)
    return scenes, pixels


# --- training -----------------------------------------------------------------------------------------

def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))


def train(out: Path, steps: int) -> None:
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    t0 = time.time()
    scenes, pixels = render_scenes(NUM_SCENES)
    log(f"rendered {len(scenes)} scenes in {time.time() - t0:.0f} s")

    rng = random.Random(0)
    tokenizer = train_tokenizer([caption(scenes[i % len(scenes)], rng) for i in range(TOKENIZER_CAPTIONS)], out)
    check_tokenizer(tokenizer, [caption(s, rng) for s in scenes[:500]])
    log(f"tokenizer: {len(tokenizer)} tokens; {tokenizer.tokenize('a red striped robot on the beach, on the left')}")

    model = build_model(tokenizer)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.98), eps=1e-6)

    max_len = model.config.text_config.max_position_embeddings
    t0, smooth = time.time(), None
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        idx = torch.randint(len(scenes), (BATCH,))
        texts = [caption(scenes[i], rng) for i in idx.tolist()]
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out_ = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels[idx])
        # CLIP's symmetric cross-entropy; captions that coincide in a batch ("a robot") are rare enough to ignore
        labels = torch.arange(BATCH)
        loss = (F.cross_entropy(out_.logits_per_image, labels) + F.cross_entropy(out_.logits_per_text, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp
        if step % 50 == 0:
            zero_denormals(opt)
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}/{steps} loss {loss.item():.3f} (smoothed {smooth:.3f}) "
                f"scale {model.logit_scale.exp().item():.1f} {(time.time() - t0) / (step + 1):.2f} s/step")
    log(f"trained {steps} steps in {time.time() - t0:.0f} s, final smoothed loss {smooth:.3f}")

    model.save_pretrained(out)
    encoder = load_clip(str(out))
    assert encoder.crop == RESOLUTION and encoder.tokenizer is not None
    log(f"saved to {out}; load_clip reads it")


# --- does it discriminate? ------------------------------------------------------------------------------

def reference_scenes(inst, n: int = 4, seed: int = 0) -> list[Scene]:
    """n views of one subject in different backgrounds and positions, as a user's reference photos."""
    rng = random.Random(f"{seed}:{inst.key}")
    backgrounds = rng.sample(BACKGROUNDS, n)
    return [Scene(inst, bg, POSITIONS[k % len(POSITIONS)], "large", None, rng.randrange(2**31))
            for k, bg in enumerate(backgrounds)]


def discrimination_report(model_dir: Path | str = MODEL_DIR, verbose: bool = True) -> dict:
    """(a) CLIP-I: a reserved subject's references against each other vs against its same-class siblings';
    (b) CLIP-T: a render with its own caption vs the caption with another background / another color."""
    clip = load_clip(str(model_dir))
    subjects = reserved_instances()
    views = [reference_scenes(inst) for inst in subjects]
    feats = clip.embed_images([render(s, RESOLUTION) for v in views for s in v]).view(len(subjects), len(views[0]), -1)

    same, other = [], []
    for i, inst in enumerate(subjects):
        f = feats[i]
        sim = f @ f.T
        n = len(f)
        same.append(((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item())
        siblings = [j for j, o in enumerate(subjects) if o.cls == inst.cls and j != i]
        other.append(np.mean([(f @ feats[j].T).mean().item() for j in siblings]))
    same, other = np.array(same), np.array(other)

    rng = random.Random(1)
    scenes = [s for v in views for s in v]
    texts_own, texts_bg, texts_color = [], [], []
    for s in scenes:
        texts_own.append(describe(s.instance, s.background, s.position))
        texts_bg.append(describe(s.instance, rng.choice([b for b in BACKGROUNDS if b != s.background]), s.position))
        texts_color.append(describe(s.instance, s.background, s.position,
                                    color=rng.choice([c for c in COLORS if c != s.instance.color])))
    img = feats.reshape(len(scenes), -1)
    t_own, t_bg, t_color = ((img * clip.embed_texts(t)).sum(-1).numpy() for t in (texts_own, texts_bg, texts_color))

    report = {
        "clip_i_same_subject": float(same.mean()), "clip_i_sibling": float(other.mean()),
        "clip_i_frac_subjects_same_gt_sibling": float((same > other).mean()),
        "clip_t_own": float(t_own.mean()), "clip_t_other_background": float(t_bg.mean()),
        "clip_t_other_color": float(t_color.mean()),
        "clip_t_frac_own_gt_other_background": float((t_own > t_bg).mean()),
        "clip_t_frac_own_gt_other_color": float((t_own > t_color).mean()),
    }
    if verbose:
        print(json.dumps(report, indent=2))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--report-only", action="store_true", help="skip training, print the discrimination report")
    args = ap.parse_args()
    if not args.report_only:
        train(args.out, args.steps)
    discrimination_report(args.out)


if __name__ == "__main__":
    main()
