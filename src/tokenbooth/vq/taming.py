"""Meta's Chameleon VQGAN as released, read into tokenbooth's VQGAN class.

Chameleon's `tokenizer/` folder ships the image tokenizer the way taming-transformers trained it:

    vqgan.yaml   model.params: embed_dim, n_embed, ddconfig {z_channels, ch, ch_mult, num_res_blocks, ...},
                 lossconfig (training only)
    vqgan.ckpt   a PyTorch Lightning checkpoint: {"state_dict": {...}, "epoch": ..., "optimizer_states": ...};
                 the state dict holds encoder.*, decoder.*, quantize.embedding.weight, quant_conv.*,
                 post_quant_conv.* and the training losses' networks under loss.*

Both reference readers (facebookresearch/chameleon `inference/vqgan.py` and Alpha-VLLM/Lumina-mGPT
`model/chameleon_vae_ori/vqgan.py`) take `torch.load(ckpt)["state_dict"]` and load it non-strictly, which
silently keeps random weights for anything the yaml and the checkpoint disagree on. Here every key the
config builds must be in the checkpoint with the same shape, and every checkpoint key outside loss.* must be
one the config builds; otherwise the pair is refused. `tokenbooth convert vqgan` writes the result once as
vqgan.json + vqgan.safetensors (the format `load_vqgan` reads).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import yaml

from ..errors import UserError
from .vqgan import VQGAN, VQGANConfig, save_vqgan

LOSS_PREFIX = "loss."  # the discriminator and perceptual loss of training; not part of the tokenizer


def read_taming_config(path: Path) -> VQGANConfig:
    """vqgan.yaml -> VQGANConfig. Our field names are the ddconfig's, plus embed_dim and n_embed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"VQGAN config missing: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"cannot read {path}: not UTF-8 text") from None
    try:
        params = yaml.safe_load(text)["model"]["params"]
        fields = {**params["ddconfig"], "embed_dim": params["embed_dim"], "n_embed": params["n_embed"]}
    except (yaml.YAMLError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # YAML errors draw the spot over lines
        raise UserError(f"{path} is not a taming VQGAN config (model.params.ddconfig, embed_dim, n_embed): "
                        f"{type(e).__name__} {first}") from None
    if fields.get("attn_resolutions") is None:
        fields["attn_resolutions"] = []
    return VQGANConfig.from_dict(fields)


class _OnlyTensors(pickle.Unpickler):
    """An unpickler that rebuilds tensors and replaces every other class by an inert stand-in, so nothing a
    checkpoint names (hyper-parameter objects, callbacks) is imported or run."""

    ALLOWED = {("torch._utils", n) for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                                              "_rebuild_parameter_with_state")} | {("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        return _Inert


class _Inert:
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):
        return self


class _TensorsOnlyPickle:
    """Stands in for the `pickle` module in torch.load: every pickle it reads goes through _OnlyTensors."""

    Unpickler = _OnlyTensors

    @staticmethod
    def load(file, **kwargs):
        return _OnlyTensors(file, **kwargs).load()


def read_lightning_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint, read with `weights_only=True`; a checkpoint that also
    pickled Python objects (hyper-parameters, callbacks) is read again with those objects left out."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"VQGAN checkpoint missing: {path}")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TensorsOnlyPickle)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot read {path}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_taming_vqgan(config_path: Path, ckpt_path: Path) -> VQGAN:
    """vqgan.yaml + vqgan.ckpt -> VQGAN with encoder and decoder; refuses a pair that does not match."""
    cfg = read_taming_config(config_path)
    state = {k: v for k, v in read_lightning_state_dict(ckpt_path).items() if not k.startswith(LOSS_PREFIX)}
    model = VQGAN(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            detail = f"{k} is {list(state[k].shape)} in the checkpoint, {list(expected[k].shape)} by the config"
        elif missing:
            detail = f"the config needs {missing[0]}, which the checkpoint lacks ({len(missing)} such)"
        else:
            detail = f"the checkpoint has {unexpected[0]}, which the config does not build ({len(unexpected)} such)"
        raise UserError(f"{ckpt_path} does not match {config_path}: {detail}")
    model.load_state_dict({k: state[k].float() for k in expected})
    return model.eval()


def convert_vqgan(config_path: Path, ckpt_path: Path, out: Path) -> Path:
    """`tokenbooth convert vqgan`: vqgan.yaml + vqgan.ckpt -> out/vqgan.json + out/vqgan.safetensors."""
    model = load_taming_vqgan(config_path, ckpt_path)
    out = Path(out)
    try:
        save_vqgan(model, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    cfg = model.config
    print(f"wrote {out / 'vqgan.json'} and {out / 'vqgan.safetensors'} ({cfg.n_embed} codes, {cfg.downsample}x "
          f"downsampling, encoder and decoder)")
    return out
