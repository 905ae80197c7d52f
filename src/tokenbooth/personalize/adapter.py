"""The adapter folder: what personalization learned, small and self-describing, loadable onto the base.

    adapter_config.json          version, backbone + base fingerprint, placeholder, class word, training
                                 settings, and "sampling": the settings it was validated with, which
                                 `generate --adapter` uses unless told otherwise
    learned_embeds.safetensors   {placeholder string: [V]'s embedding} (Textual Inversion's convention: a
                                 vector, or one row per token where [V] is several, --num-vectors)
    layers.safetensors           stage 2's trained tensors by parameter name (full Q/K/V or named targets)
    lora/                        or a peft LoRA folder (adapter_config.json + adapter_model.safetensors)

adapter_config.json is written last: a folder without it is not an adapter, so an interrupted save never
looks like a finished one.

Loaded onto a full-precision base, LoRA is merged into the weights; onto a quantized one (`--quantize`, and by
default for an adapter trained on one: `sampling_quantization`) it stays unmerged, as QLoRA trained it. Full
layer tensors are refused on a quantized base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..backbones.quantize import QUANTIZE, is_quantized
from ..errors import UserError, warn
from ..io import atomic_path, atomic_write_json, read_json_object
from ..quiet import require_optional
from ..sampling.processors import DISTRIBUTION, check_sampling_values

CONFIG = "adapter_config.json"
EMBEDS = "learned_embeds.safetensors"
LAYERS = "layers.safetensors"
LORA_DIR = "lora"
LORA_PREFIX = "base_model.model."  # how peft names the wrapped model's parameters on disk


def base_fingerprint(folder: Path | None) -> str:
    """Identifies base weights without reading gigabytes: config.json, plus size, head and tail of every
    weights file."""
    if folder is None:
        return "unknown"
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted([folder / "config.json", *folder.glob("*.safetensors")]):
        if not path.is_file():
            continue
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def substitute_placeholder(prompt: str, placeholder: str, token: str) -> str:
    return prompt.replace(placeholder, token)


class PersonalizedBackbone:
    """A backbone that knows [V]: prompts mention the placeholder, the tokenizer sees its reserved token.
    Everything else is the (adapted) base backbone."""

    def __init__(self, base, placeholder: str, token: str, sampling: dict | None = None):
        self._base, self.placeholder, self.placeholder_token = base, placeholder, token
        self.sampling = sampling or {}  # what the adapter was trained and validated with (SamplingConfig fields)

    def __getattr__(self, name):
        return getattr(self._base, name)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._base.prompt_ids(substitute_placeholder(prompt, self.placeholder, self.placeholder_token))


# --- saving -----------------------------------------------------------------------------------------

def save_adapter(out: Path, config: dict, embedding: torch.Tensor, layer_tensors: dict | None,
                 lora: tuple | None) -> None:
    """lora: (peft LoraConfig, {parameter name: tensor}) or None."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / EMBEDS) as tmp:
        save_file({config["placeholder"]: embedding.detach().float().contiguous().cpu()}, str(tmp))
    if layer_tensors:
        with atomic_path(out / LAYERS) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in layer_tensors.items()}, str(tmp))
    if lora is not None:
        lora_config, tensors = lora
        (out / LORA_DIR).mkdir(exist_ok=True)
        with atomic_path(out / LORA_DIR / "adapter_model.safetensors") as tmp:
            save_file({LORA_PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        atomic_write_json(out / LORA_DIR / "adapter_config.json", _jsonable(lora_config.to_dict()))
    atomic_write_json(out / CONFIG, {"tokenbooth_version": __version__, **config})


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


# --- loading ----------------------------------------------------------------------------------------

# What adapter_config.json must hold, and of which type; the rest (training settings) is for people to read.
REQUIRED = {"placeholder": str, "placeholder_token": str, "placeholder_token_id": int, "base_fingerprint": str}


def read_adapter_config(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"not an adapter folder (no {CONFIG}): {folder}")
    cfg = read_json_object(path, "adapter config")
    for key, kind in REQUIRED.items():
        if key not in cfg:
            raise UserError(f"{path} lacks {key!r}; is it a tokenbooth adapter?")
        if not isinstance(cfg[key], kind) or isinstance(cfg[key], bool):
            raise UserError(f"{path}: {key!r} must be a {kind.__name__} (got {cfg[key]!r})")
    placeholder_rows(cfg, path)
    recorded_sampling(cfg, path)
    return cfg


def placeholder_rows(cfg: dict, path: Path | None = None) -> list[tuple[str, int]]:
    """(token, vocabulary id) of each token [V] stands for; adapters from before --num-vectors name one."""
    tokens = cfg.get("placeholder_tokens", [cfg["placeholder_token"]])
    ids = cfg.get("placeholder_token_ids", [cfg["placeholder_token_id"]])
    if (not isinstance(tokens, list) or not isinstance(ids, list) or not tokens or len(tokens) != len(ids)
            or not all(isinstance(t, str) for t in tokens)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            or "".join(tokens) != cfg["placeholder_token"] or ids[0] != cfg["placeholder_token_id"]):
        raise UserError(f"{path or CONFIG}: 'placeholder_tokens' and 'placeholder_token_ids' must list the tokens "
                        f"of 'placeholder_token' and their ids, one each")
    return list(zip(tokens, ids))


def recorded_sampling(cfg: dict, path: Path | None = None) -> dict:
    """The sampling settings an adapter was trained and validated with ({} for an adapter that predates them)."""
    sampling = cfg.get("sampling") or {}
    if not isinstance(sampling, dict) or set(sampling) - set(DISTRIBUTION):
        raise UserError(f"{path or CONFIG}: 'sampling' must map {', '.join(DISTRIBUTION)} to numbers")
    try:
        check_sampling_values(sampling)
    except UserError as e:
        raise UserError(f"{path or CONFIG}: sampling: {e}") from None
    return dict(sampling)


def load_adapter(backbone, folder: Path) -> PersonalizedBackbone:
    """Applies the adapter to `backbone` in memory (the files on disk are never touched). Everything is read
    and checked against the model before the first weight changes."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    if cfg["base_fingerprint"] != base_fingerprint(backbone.folder):
        raise UserError(f"adapter {folder} was trained on another base model ({cfg.get('backbone')}, fingerprint "
                        f"{cfg['base_fingerprint']}) than {backbone.name} ({base_fingerprint(backbone.folder)})")
    embeds, layers, lora, lora_cfg = _read_weights(folder)
    rows = placeholder_rows(cfg)
    for token, token_id in rows:
        if backbone.tokenizer.token_to_id(token) != token_id:
            raise UserError(f"adapter {folder}: {token} is not token {token_id} in {backbone.name}'s tokenizer")
    table = backbone.input_embeddings().weight
    embedding = embeds.get(cfg["placeholder"])
    wanted = table.shape[1:] if len(rows) == 1 else (len(rows), *table.shape[1:])
    if embedding is None or embedding.shape != wanted:
        found = "no entry" if embedding is None else f"shape {tuple(embedding.shape)}"
        raise UserError(f"adapter {folder}: {EMBEDS} has {found} for {cfg['placeholder']!r}; {backbone.name} wants "
                        f"an embedding of shape {tuple(wanted)}")
    params = dict(backbone.model.named_parameters())
    for name, tensor in layers.items():
        if name not in params or params[name].shape != tensor.shape:
            raise UserError(f"adapter tensor {name} does not fit {backbone.name}")
    quantized = [name for name in layers if is_quantized(params[name])]
    if quantized:
        raise UserError(f"adapter {folder} replaces {quantized[0]}, which this base holds quantized: "
                        + FULL_LAYERS_ON_QUANTIZED)
    pairs = _lora_pairs(params, lora, lora_cfg, folder) if lora else {}
    with torch.no_grad():
        table[[token_id for _, token_id in rows]] = embedding.reshape(len(rows), -1).to(table.device, table.dtype)
        for name, tensor in layers.items():
            params[name].copy_(tensor.to(params[name].dtype))
        for name, (scale, a, b) in pairs.items():
            if is_quantized(params[name]):  # kept apart, as QLoRA trained it (a merge would round it away)
                _add_low_rank(backbone.model, name.removesuffix(".weight"), scale, a, b)
            else:  # merged into W: sampling then runs at base-model speed
                params[name] += (scale * (b.float() @ a.float())).to(params[name].device, params[name].dtype)
    return PersonalizedBackbone(backbone, cfg["placeholder"], cfg["placeholder_token"], recorded_sampling(cfg))


def _read_weights(folder: Path) -> tuple[dict, dict, dict, dict]:
    """(embeddings, full layer tensors, LoRA tensors, LoRA config) as the files hold them."""
    try:
        embeds = load_file(str(folder / EMBEDS))
        layers = load_file(str(folder / LAYERS)) if (folder / LAYERS).exists() else {}
        lora_dir = folder / LORA_DIR
        lora = load_file(str(lora_dir / "adapter_model.safetensors")) if lora_dir.exists() else {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read adapter weights in {folder}: {e}") from None
    lora_cfg = read_json_object(lora_dir / "adapter_config.json", "LoRA config") if lora else {}
    return embeds, layers, lora, lora_cfg


def _lora_pairs(params: dict, tensors: dict, lora_cfg: dict, folder: Path) -> dict:
    """{adapted weight's name: (alpha / r, A, B)}: W + (alpha / r) * B @ A for every adapted projection."""
    try:
        scale = float(lora_cfg["lora_alpha"]) / float(lora_cfg["r"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise UserError(f"adapter {folder}: the LoRA config lacks a usable lora_alpha and r") from None
    pairs = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key[len(LORA_PREFIX):].split(".lora_A.")[0]
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        weight = params.get(module + ".weight")
        if weight is None:
            raise UserError(f"LoRA target {module} does not exist in this model")
        if b is None or a.dim() != 2 or b.dim() != 2 or (b.shape[0], a.shape[1]) != weight.shape or b.shape[1] != a.shape[0]:
            raise UserError(f"adapter {folder}: the LoRA tensors of {module} do not fit {tuple(weight.shape)}")
        pairs[module + ".weight"] = (scale, a, b)
    return pairs


class LowRankAdded(torch.nn.Module):
    """A frozen (quantized) Linear plus an unmerged low-rank update: base(x) + scale * (x @ A.T) @ B.T, the
    forward pass QLoRA trained the update in."""

    def __init__(self, base: torch.nn.Module, scale: float, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base, self.scale = base, scale
        dtype = base.bias.dtype if getattr(base, "bias", None) is not None else torch.get_default_dtype()
        device = base.weight.device
        self.lora_A = torch.nn.Parameter(a.to(device, dtype), requires_grad=False)
        self.lora_B = torch.nn.Parameter(b.to(device, dtype), requires_grad=False)

    def forward(self, x):
        low = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + self.scale * low


def _add_low_rank(model: torch.nn.Module, module: str, scale: float, a: torch.Tensor, b: torch.Tensor) -> None:
    parent, _, child = module.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, child, LowRankAdded(getattr(owner, child), scale, a, b))


# Why full layer tensors (Q/K/V, or named weights) do not go onto a quantized base: stage 2 moves them by far less
# than a 4- or 8-bit step (lr 5e-6 for 70 steps), so quantizing the trained tensors gives back the base's.
FULL_LAYERS_ON_QUANTIZED = ("stage 2 moved those weights by less than a quantization step, so quantizing them "
                            "would undo it; sample it with --quantize none (LoRA and [V] adapters can be drawn on a "
                            "quantized base)")


def sampling_quantization(asked: str | None, folder: Path | None) -> str:
    """The base's bits for sampling with the adapter in `folder` (None: none): `asked` (a --quantize flag),
    checked against the adapter; without it, the bits the adapter trained on, said in one stderr line, where
    the adapter can be drawn on them ([V], LoRA kept unmerged); full layer tensors: the full-precision base."""
    full_layers = folder is not None and (Path(folder) / LAYERS).exists()
    if asked is None:
        trained = read_adapter_config(folder).get("quantize", "none") if folder is not None else "none"
        if trained not in QUANTIZE or trained == "none" or full_layers:
            return "none"
        warn(f"sampling on a base quantized to {trained}, as adapter {folder} was trained (--quantize none: full "
             f"precision)")
        return trained
    if asked != "none" and full_layers:
        raise UserError(f"--quantize {asked}: adapter {folder} replaces whole layer weights ({LAYERS}); "
                        + FULL_LAYERS_ON_QUANTIZED)
    return asked


def load_for_sampling(model: str, adapter: Path | None = None, quantize: str | None = None, **load):
    """What a command that only draws (the demo, DreamBench, the web app) samples from: the base in the bits
    `sampling_quantization` picks for the adapter (quantized on the CPU through backbones/quantize.py, as
    `generate --quantize` and `train --quantize` load it), the adapter on it. load: load_backbone's options.
    Returns (backbone, bits)."""
    from ..backbones import load_backbone  # the loaders import transformers: only where a model is loaded

    bits = sampling_quantization(quantize, adapter)
    if bits != "none":
        require_optional("torchao", f"--quantize {bits}")
    backbone = load_backbone(model, quantize=bits, **load)
    return (load_adapter(backbone, adapter) if adapter is not None else backbone), bits


def warn_if_no_placeholder(prompt: str, placeholder: str) -> None:
    if placeholder not in prompt:
        warn(f"the prompt does not mention {placeholder}, so the learned subject will not appear")
