"""DreamBench's numbers (Ruiz et al. 2023; Sun et al. 2025 report the same three):

  DINO     subject fidelity: cosine similarity of DINO ViT-S/16 CLS features, generated image vs reference
  CLIP-I   subject fidelity: the same with CLIP ViT-B/32 image features
  CLIP-T   prompt following: cosine similarity of a generated image and its prompt in CLIP ViT-B/32 space.
           The placeholder is removed from the prompt first ("a [V] dog on the beach" -> "a dog on the
           beach"): CLIP has never seen [V]. Implementations differ here; this is ours.

Aggregation (the paper's): each generated image gets its mean similarity over all of the subject's
references; a subject gets the mean over its images; the benchmark the mean over subjects. DreamBooth's
protocol ("all-pairs") instead averages every (generated, reference) pair of the whole benchmark at once,
so subjects with more references or images weigh more. The "real images" row scores each reference
against the subject's other references (the paper: DINO 0.774, CLIP-I 0.885): check your set-up with it.

Preprocessing is written with Pillow and torch to match the originals' torchvision pipelines:
  DINO (eval_knn.py)  Resize(256, bicubic) on the short side, CenterCrop(224), ImageNet mean/std
  CLIP (clip.py)      Resize(224, bicubic) on the short side, CenterCrop(224), CLIP's mean/std
Weights load from a local Hugging Face folder, the Hugging Face cache (offline), or the original release
files, converted at load time (convert.py); nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import UserError, warn
from ..images import to_rgb
from ..io import read_json_object
from ..personalize.placeholder import remove_placeholder  # noqa: F401 (CLIP-T's text; the name tests and callers know)
from . import stats
from .convert import dino_to_vit, openai_bpe_tokenizer, openai_clip_to_hf

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
BATCH = 16  # images per encoder forward pass

DINO_HUB_ID = "facebook/dino-vits16"
CLIP_HUB_ID = "openai/clip-vit-base-patch32"
DINO_FILE_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
CLIP_FILE_URL = ("https://openaipublic.azureedge.net/clip/models/"
                 "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI's tokenizer file (clip/ in github.com/openai/CLIP)


# --- preprocessing ------------------------------------------------------------------------------------

def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(int, BICUBIC) on a PIL image: the short side becomes `size`, the long side
    int(size * long / short)."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return image if new == (w, h) else image.resize(new, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop: the offset rounds half to even, as Python's round does."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(image: Image.Image, mean, std) -> torch.Tensor:
    """ToTensor + Normalize: (3, H, W) float."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def dino_pixels(image: Image.Image, crop: int = 224) -> torch.Tensor:
    resize = round(crop * 256 / 224)  # 256 for the real 224 model
    return normalize(center_crop(resize_short_side(image.convert("RGB"), resize), crop), IMAGENET_MEAN, IMAGENET_STD)


def clip_pixels(image: Image.Image, crop: int = 224) -> torch.Tensor:
    return normalize(center_crop(resize_short_side(image.convert("RGB"), crop), crop), CLIP_MEAN, CLIP_STD)


# --- encoders -----------------------------------------------------------------------------------------

class DinoEncoder:
    """DINO ViT CLS features (after the final LayerNorm, as DINO's own forward returns them), L2-normalized."""

    def __init__(self, model, source: str, device="cpu"):
        self.model, self.source, self.device = model.eval().to(device), source, device
        self.crop = model.config.image_size

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), BATCH):
            pixels = torch.stack([dino_pixels(im, self.crop) for im in images[i: i + BATCH]]).to(self.device)
            feats.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float())
        return F.normalize(torch.cat(feats), dim=-1).cpu()


class ClipEncoder:
    """CLIP's projected image and text features, L2-normalized."""

    def __init__(self, model, tokenizer, source: str, device="cpu", tokenizer_hint: str = ""):
        self.model, self.tokenizer, self.source, self.device = model.eval().to(device), tokenizer, source, device
        self.crop = model.config.vision_config.image_size
        self.tokenizer_hint = tokenizer_hint

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), BATCH):
            pixels = torch.stack([clip_pixels(im, self.crop) for im in images[i: i + BATCH]]).to(self.device)
            feats.append(self.model.get_image_features(pixel_values=pixels).pooler_output.float())
        return F.normalize(torch.cat(feats), dim=-1).cpu()

    def require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise UserError(f"CLIP-T needs CLIP's tokenizer and {self.source} has none: {self.tokenizer_hint}")

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        self.require_tokenizer()
        feats = []
        for i in range(0, len(texts), BATCH):
            tokens = self.tokenizer(texts[i: i + BATCH], padding=True, truncation=True, return_tensors="pt",
                                    max_length=self.model.config.text_config.max_position_embeddings)
            out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                               attention_mask=tokens["attention_mask"].to(self.device))
            feats.append(out.pooler_output.float())
        return F.normalize(torch.cat(feats), dim=-1).cpu()


# --- loading ------------------------------------------------------------------------------------------

def _resolve(value: str | None, hub_id: str, missing: str) -> tuple[str, Path | None]:
    """(what to load, local path or None for the Hugging Face cache)."""
    if value is None:
        return hub_id, None
    path = Path(value).expanduser()
    if path.exists():
        return str(path), path
    weights_file = path.suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not value.startswith((".", "/")) and not weights_file:
        return value, None  # a Hub id: looked up in the local cache only
    raise UserError(f"{value} not found. {missing}")


def _hf_model_type(folder: Path, flag: str) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{folder} is a folder without config.json, not a Hugging Face model folder (for {flag})")
    return str(read_json_object(config, "model config").get("model_type", ""))


def _from_cache(cls, hub_id: str, missing: str, **kw):
    try:
        return cls.from_pretrained(hub_id, local_files_only=True, **kw)
    except OSError:
        raise UserError(missing) from None


def load_dino(value: str | None = None, device="cpu") -> DinoEncoder:
    """--dino: a Hugging Face ViT folder, a Hub id in the local cache, or DINO's original .pth file."""
    from transformers import ViTModel  # here, not at the top: importing transformers takes seconds

    download = (f"Download DINO ViT-S/16 with `hf download {DINO_HUB_ID} --local-dir weights/dino-vits16` and pass "
                f"--dino weights/dino-vits16, or get {DINO_FILE_URL} and pass "
                f"--dino path/to/dino_deitsmall16_pretrain.pth")
    source, path = _resolve(value, DINO_HUB_ID, download)
    if path is None:
        missing = f"DINO weights not found ({source} is not in the Hugging Face cache). {download}"
        model = _from_cache(ViTModel, source, missing, add_pooling_layer=False, dtype=torch.float32)
    elif path.is_dir():
        kind = _hf_model_type(path, "--dino")
        if kind != "vit":
            raise UserError(f"--dino {path} holds a {kind or 'unknown'} model; DINO is a ViT "
                            f"(model_type vit, e.g. {DINO_HUB_ID})")
        model = ViTModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
    else:
        model = dino_to_vit(path)
    _warn_if_not(model.config.hidden_size == 384 and model.config.patch_size == 16, "DINO", "ViT-S/16", source)
    return DinoEncoder(model, source, device)


def load_clip(value: str | None = None, device="cpu") -> ClipEncoder:
    """--clip: a Hugging Face CLIP folder, a Hub id in the local cache, or OpenAI's original .pt file (with
    bpe_simple_vocab_16e6.txt.gz beside it for CLIP-T)."""
    from transformers import CLIPModel, CLIPTokenizer  # here, not at the top: importing transformers takes seconds

    download = (f"Download CLIP ViT-B/32 with `hf download {CLIP_HUB_ID} --local-dir weights/clip-vit-base-patch32` "
                f"and pass --clip weights/clip-vit-base-patch32, or get {CLIP_FILE_URL} and pass --clip "
                f"path/to/ViT-B-32.pt (with {CLIP_BPE} from github.com/openai/CLIP beside it)")
    hint = f"put {CLIP_BPE} (clip/ in github.com/openai/CLIP) or the Hugging Face tokenizer files beside it"
    source, path = _resolve(value, CLIP_HUB_ID, download)
    if path is None:
        missing = f"CLIP weights not found ({source} is not in the Hugging Face cache). {download}"
        model = _from_cache(CLIPModel, source, missing, dtype=torch.float32)
        tokenizer = _from_cache(CLIPTokenizer, source, missing)
    elif path.is_dir():
        kind = _hf_model_type(path, "--clip")
        if kind != "clip":
            raise UserError(f"--clip {path} holds a {kind or 'unknown'} model; CLIP-I/CLIP-T need a CLIPModel "
                            f"(model_type clip, e.g. {CLIP_HUB_ID})")
        model = CLIPModel.from_pretrained(path, dtype=torch.float32)
        tokenizer = _tokenizer_in(path)
    else:
        model = openai_clip_to_hf(path)
        tokenizer = _tokenizer_in(path.parent)
    if tokenizer is not None and len(tokenizer) != model.config.text_config.vocab_size:
        raise UserError(f"the CLIP tokenizer beside {source} has {len(tokenizer)} tokens but the model "
                        f"{model.config.text_config.vocab_size}: they do not belong together")
    vision = model.config.vision_config
    _warn_if_not(vision.hidden_size == 768 and vision.patch_size == 32, "CLIP", "ViT-B/32", source)
    return ClipEncoder(model, tokenizer, source, device, tokenizer_hint=hint)


def _tokenizer_in(folder: Path):
    from transformers import CLIPTokenizer  # here, not at the top: importing transformers takes seconds

    if (folder / CLIP_BPE).is_file():
        return openai_bpe_tokenizer(folder / CLIP_BPE)
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(folder)
    return None


def _warn_if_not(ok: bool, what: str, paper: str, source: str) -> None:
    if not ok:
        warn(f"{source} is not the paper's {what} {paper}: its numbers are not comparable to published ones")


# --- scoring ------------------------------------------------------------------------------------------

def read_images(paths: list[Path]) -> list[Image.Image]:
    """Images as files hold them (no EXIF rotation: the original metric code does not apply it either)."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(to_rgb(im))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"cannot read image {path}: {e.__class__.__name__}") from None
    return images


class Scorer:
    """The encoders of a run; either may be None to skip its metrics."""

    def __init__(self, dino: DinoEncoder | None, clip: ClipEncoder | None, clip_i: bool = True):
        self.dino, self.clip, self.clip_i = dino, clip, clip_i

    def score(self, images, references, texts: list[str] | None = None) -> dict:
        """{"images": [per generated image: dino, clip_i (mean over references), clip_t],
            "real": [per reference: dino, clip_i (mean over the other references)]}.

        texts: CLIP-T's text per image (placeholder already removed), or None to skip CLIP-T."""
        rows, real = [{} for _ in images], [{} for _ in references]
        clip_images = self.clip.embed_images(list(images)) if self.clip and (self.clip_i or texts) else None
        fidelity = []
        if self.dino is not None:
            fidelity.append(("dino", self.dino.embed_images(list(images)), self.dino.embed_images(list(references))))
        if self.clip is not None and self.clip_i:
            fidelity.append(("clip_i", clip_images, self.clip.embed_images(list(references))))
        for name, gen, ref in fidelity:
            for row, value in zip(rows, mean_similarity(gen, ref)):
                row[name] = value
            for row, value in zip(real, mean_similarity_to_others(ref)):
                row[name] = value
        if texts is not None and self.clip is not None:
            for row, value in zip(rows, (clip_images * self.clip.embed_texts(list(texts))).sum(-1).tolist()):
                row["clip_t"] = value
        return {"images": rows, "real": real}


def mean_similarity(gen: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """For each generated feature: its mean cosine similarity over all references (features normalized)."""
    return (gen @ ref.T).mean(dim=1).tolist()


def mean_similarity_to_others(ref: torch.Tensor) -> list[float | None]:
    """For each reference: its mean similarity to the other references (None with a single reference)."""
    n = len(ref)
    if n < 2:
        return [None] * n
    sims = ref @ ref.T
    return ((sims.sum(dim=1) - sims.diagonal()) / (n - 1)).tolist()


METRICS = ("dino", "clip_i", "clip_t")
PROTOCOLS = ("paper", "all-pairs")


def aggregate(subjects: list[dict], protocol: str = "paper") -> dict:
    """The benchmark's numbers from per-subject score dicts (as `Scorer.score` returns, plus "references":
    the subject's reference count).

    paper      mean over subjects of (mean over the subject's images of (mean over its references))
    all-pairs  DreamBooth's: mean over every (generated image, reference) pair of the benchmark at once

    Returns {"dino", "clip_i", "clip_t", "real_dino", "real_clip_i"}, None where nothing was measured."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol must be paper or all-pairs (got {protocol!r})")
    out = {}
    for key, rows_key, metric in [(m, "images", m) for m in METRICS] + [("real_dino", "real", "dino"),
                                                                         ("real_clip_i", "real", "clip_i")]:
        per_subject, pairs, weighted = [], 0, 0.0
        for s in subjects:
            values = stats.measured(s.get(rows_key, []), metric)
            if not values:
                continue
            per_subject.append(values)
            # pairs each row's mean stands for: its references (the others, for a reference); one prompt for CLIP-T
            n = 1 if metric == "clip_t" else s["references"] - (1 if rows_key == "real" else 0)
            pairs += n * len(values)
            weighted += n * sum(values)
        if not per_subject:
            out[key] = None
        elif protocol == "paper":
            out[key] = stats.bench_mean(per_subject)  # toy-bench's aggregation, the same code
        else:
            out[key] = weighted / pairs
    return out

