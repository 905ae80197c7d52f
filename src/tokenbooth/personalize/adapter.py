"""The adapter folder: what personalization learned, small and self-describing, loadable onto the base.

    adapter_config.json          version, backbone + base fingerprint, placeholder, class word, settings
    learned_embeds.safetensors   {placeholder string: [V]'s embedding} (Textual Inversion's convention)
    layers.safetensors           stage 2's trained tensors by parameter name (full Q/K/V or named targets)
    lora/                        or a peft LoRA folder (adapter_config.json + adapter_model.safetensors)

adapter_config.json is written last: a folder without it is not an adapter, so an interrupted save never
looks like a finished one.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError

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

    def __init__(self, base, placeholder: str, token: str):
        self._base, self.placeholder, self.placeholder_token = base, placeholder, token

    def __getattr__(self, name):
        return getattr(self._base, name)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._base.prompt_ids(substitute_placeholder(prompt, self.placeholder, self.placeholder_token))


# --- saving -----------------------------------------------------------------------------------------

def save_adapter(out: Path, config: dict, embedding: torch.Tensor, layer_tensors: dict | None,
                 lora: tuple | None) -> None:
    """lora: (peft LoraConfig, {parameter name: tensor}) or None."""
    from safetensors.torch import save_file

    from ..io import atomic_path, atomic_write_json

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

def read_adapter_config(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"not an adapter folder (no {CONFIG}): {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"cannot read {path}: {e}") from None


def load_adapter(backbone, folder: Path) -> PersonalizedBackbone:
    """Applies the adapter to `backbone` in memory (the files on disk are never touched)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    if cfg.get("base_fingerprint") != base_fingerprint(backbone.folder):
        raise UserError(f"adapter {folder} was trained on another base model ({cfg.get('backbone')}, fingerprint "
                        f"{cfg.get('base_fingerprint')}) than {backbone.name} ({base_fingerprint(backbone.folder)})")
    try:
        embeds = load_file(str(folder / EMBEDS))
        layers = load_file(str(folder / LAYERS)) if (folder / LAYERS).exists() else {}
        lora = load_file(str(folder / LORA_DIR / "adapter_model.safetensors")) if (folder / LORA_DIR).exists() else {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read adapter weights in {folder}: {e}") from None
    if backbone.tokenizer.token_to_id(cfg["placeholder_token"]) != cfg["placeholder_token_id"]:
        raise UserError(f"adapter {folder}: {cfg['placeholder_token']} is not token {cfg['placeholder_token_id']} "
                        f"in {backbone.name}'s tokenizer")
    with torch.no_grad():
        table = backbone.input_embeddings().weight
        table[cfg["placeholder_token_id"]] = embeds[cfg["placeholder"]].to(table.device, table.dtype)
        params = dict(backbone.model.named_parameters())
        for name, tensor in layers.items():
            if name not in params or params[name].shape != tensor.shape:
                raise UserError(f"adapter tensor {name} does not fit {backbone.name}")
            params[name].copy_(tensor.to(params[name].dtype))
        if lora:
            _merge_lora(params, lora, json.loads((folder / LORA_DIR / "adapter_config.json").read_text()))
    return PersonalizedBackbone(backbone, cfg["placeholder"], cfg["placeholder_token"])


def _merge_lora(params: dict, tensors: dict, lora_cfg: dict) -> None:
    """W += (alpha / r) * B @ A for every adapted projection: sampling then runs at base-model speed."""
    scale = lora_cfg["lora_alpha"] / lora_cfg["r"]
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key[len(LORA_PREFIX):].split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        weight = params.get(module + ".weight")
        if weight is None:
            raise UserError(f"LoRA target {module} does not exist in this model")
        weight += (scale * (b.float() @ a.float())).to(weight.device, weight.dtype)


def warn_if_no_placeholder(prompt: str, placeholder: str) -> None:
    if placeholder not in prompt:
        print(f"tokenbooth: warning: the prompt does not mention {placeholder}, so the learned subject will not "
              f"appear", file=sys.stderr)
