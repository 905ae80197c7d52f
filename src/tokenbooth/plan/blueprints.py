"""A backbone without weights: the published models' configurations (assets/configs/) built into the real
backbone classes with fake tensors, so that planning goes through the very code training and sampling run.

The published checkpoints' tokenizers are not shipped (Lumina-mGPT's is 2 MB); a word-level stand-in holds
the tokens the layouts need, at the ids the real vocabularies give them where that matters (Chameleon's image
tokens are ids 4..8195). Prompts are then counted in words, a few tokens short of the real BPE count on a
2,400-token Lumina-mGPT sequence (under 1%).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from ..assets import CONFIGS_DIR
from ..backbones import BUILTIN, chameleon, emu3, janus
from ..errors import UserError
from ..quiet import quiet_imports
from ..vq import VQGAN, VQGANConfig


def known_models() -> dict[str, Path]:
    """Names `tokenbooth plan --model` takes: the five published models and the bundled ones (mini)."""
    bundled = {name: folder / "config.json" for name, folder in BUILTIN.items()}
    return {**bundled, **{p.stem: p for p in sorted(CONFIGS_DIR.glob("*.json"))}}


def num_layers(name: str) -> int:
    """How many transformer layers the model `name` has, from its configuration."""
    path = known_models().get(name) or Path(name).expanduser() / "config.json"
    config = json.loads(path.read_text())
    return (config.get("text_config") or config)["num_hidden_layers"]


def blueprint(name: str, resolution: int | None = None, layers: int | None = None, overrides: dict | None = None):
    """The backbone `name` (a known model, or a model folder with a config.json), with weights that are fake
    inside `tracker.fake_run()` and random outside it. layers: keep only this many transformer layers (the
    validation benchmark's 2-layer Lumina-mGPT); overrides: config entries to change (nested dicts merge)."""
    models = known_models()
    if name in models:
        config_path, folder = models[name], (models[name].parent if name in BUILTIN else None)
    else:
        folder = Path(name).expanduser()
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise UserError(f"unknown model {name!r}: not one of {', '.join(models)} and no {config_path}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {config_path}: {e}") from None
    kind = config.get("model_type")
    config = _merged(config, overrides or {})
    if layers is not None:
        text = config["text_config"] if kind in ("janus", "emu3") else config
        text["num_hidden_layers"] = layers
    if kind == "chameleon":
        return _chameleon(name, config, folder, resolution)
    if kind == "janus":
        return _janus(name, config, resolution)
    if kind == "emu3":
        return _emu3(name, config, folder, resolution)
    raise UserError(f"{config_path} describes a {kind!r} model; tokenbooth plans chameleon, janus and emu3 models")


def _merged(config: dict, overrides: dict) -> dict:
    out = dict(config)
    for key, value in overrides.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _build(cls, config_class, config: dict):
    """The transformers model, built in the checkpoint's dtype as from_pretrained would load it."""
    cfg = config_class.from_dict(config)
    cfg._attn_implementation = "sdpa"  # what backbones/hf.py loads with
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return cls(cfg).eval()
    finally:
        torch.set_default_dtype(previous)


def _word_tokenizer(vocab: list[str]):
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _chameleon(name: str, config: dict, folder: Path | None, resolution: int | None):
    with quiet_imports():  # here, not at the top: the model classes take seconds to import, `--help` none
        from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    if folder is not None and (folder / "tokenizer.json").is_file():  # mini, or a folder of tokenbooth's
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        vq_json = folder / "vqgan" / "vqgan.json"
        vq_config = VQGANConfig.from_dict(json.loads(vq_json.read_text())) if vq_json.is_file() else VQGANConfig()
        has_spec = (folder / "tokenbooth.json").is_file()
        spec = chameleon.ChameleonSpec.read(folder) if has_spec else chameleon.ChameleonSpec()
    else:  # Lumina-mGPT: Meta's VQGAN (VQGANConfig's defaults), the vocabulary's order
        vq_config = VQGANConfig()
        vocab = (["<s>", "<pad>", "</s>", "<unk>"]
                 + [chameleon.image_token_name(c) for c in range(vq_config.n_embed)]
                 + [chameleon.IMAGE_END, chameleon.IMAGE_START, chameleon.TURN_END, chameleon.ROW_END]
                 + [chameleon.size_token(n) for n in range(1, 65)]
                 + [f"<reserved{n:05d}>" for n in range(32)])
        tokenizer = _word_tokenizer(vocab)
        spec = chameleon.ChameleonSpec(resolution=chameleon.PRESETS.get(name, (None, 768))[1], size_unit=32,
                                       family="lumina-mgpt")
    if resolution is not None:
        spec.resolution = resolution
    model = _build(ChameleonForConditionalGeneration, ChameleonConfig,
                   {**config, "vocabulary_map": tokenizer.get_vocab()})
    return chameleon.ChameleonBackbone(name, model, tokenizer, VQGAN(vq_config).eval(), spec)


def _janus(name: str, config: dict, resolution: int | None):
    with quiet_imports():  # start-up time, as in _chameleon
        from transformers import JanusConfig, JanusForConditionalGeneration

    native = config.get("vision_config", {}).get("image_size", 384)
    if resolution is not None and resolution != native:
        raise UserError(f"Janus-Pro draws {native}x{native} images only (got --resolution {resolution})")
    model = _build(JanusForConditionalGeneration, JanusConfig, config)
    model.model.vqmodel.float()  # as load_janus keeps it
    tokenizer = _word_tokenizer(["<unk>", janus.BOS, janus.PAD, janus.IMAGE_START, janus.IMAGE_END])
    text = model.config.text_config
    special = {"bos": tokenizer.token_to_id(janus.BOS), "pad": tokenizer.token_to_id(janus.PAD),
               "boi": tokenizer.token_to_id(janus.IMAGE_START)}
    text.bos_token_id = special["bos"]
    return janus.JanusBackbone(name, model, tokenizer, None, special)


def _emu3(name: str, config: dict, folder: Path | None, resolution: int | None):
    with quiet_imports():  # start-up time, as in _chameleon
        from transformers import Emu3Config, Emu3ForConditionalGeneration

    if folder is not None and (folder / "tokenizer.json").is_file():  # an Emu3 folder: its own vocabulary
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:  # emu3-gen: the real ids (its config's vocabulary_map, 6.5 MB, is not shipped)
        tokenizer = emu3.blueprint_tokenizer(config.get("vq_config", {}).get("codebook_size", 32768))
    model = _build(Emu3ForConditionalGeneration, Emu3Config, {**config, "vocabulary_map": tokenizer.get_vocab()})
    return emu3.blueprint_backbone(name, model, tokenizer, resolution)
