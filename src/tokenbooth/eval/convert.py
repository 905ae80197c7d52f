"""The metric encoders' original files, read safely and renamed to transformers' layout at load time.

    dino_deitsmall16_pretrain.pth   DINO's release: a plain state dict of its ViT (`cls_token`, `pos_embed`,
                                    `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
                                    `norm.*`), read with torch.load(weights_only=True)
    ViT-B-32.pt                     OpenAI CLIP's release: a TorchScript archive whose module attributes carry
                                    the weights under OpenAI's names (`visual.conv1.weight`, `visual.transformer.
                                    resblocks.N.attn.in_proj_weight`, `token_embedding.weight`, ...) in fp16

A TorchScript archive cannot go through torch.load(weights_only=True) (torch refuses), and torch.jit.load
would compile and run the archive's own TorchScript code. So `read_torchscript_tensors` opens the zip and
unpickles only `data.pkl` with an unpickler that admits a fixed list of names: the archive's module classes
become inert attribute bags, tensors are rebuilt from the raw storage files, and any other global makes it
stop. Nothing from the file is executed.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError

# --- reading files ------------------------------------------------------------------------------------

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptModule:
    """Stands in for a class defined by the archive (`__torch__...`): keeps the attributes, runs nothing."""

    attributes: dict = {}

    def __setstate__(self, state):
        self.attributes = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *_):
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _identity(x, *_):
    return x


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _identity,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch.jit._pickle", name): _identity
       for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")},
}


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str, data: bytes):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptModule
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid  # the location (often 'cuda:0') is ignored: all goes to the CPU
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} values, expected {numel}")
            self.storages[key] = flat
        return self.storages[key]


def is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """{dotted name: tensor} of every tensor attribute of a TorchScript archive's module tree, without running
    any of its code."""
    with zipfile.ZipFile(path) as z:
        pickles = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            raise UserError(f"{path} is a zip file but not a TorchScript archive (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            root = _WeightsUnpickler(z, prefix, z.read(pickles[0])).load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, RuntimeError, EOFError) as e:
            raise UserError(f"cannot read the weights in {path}: {e}") from None
    tensors = {}

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            tensors[name] = obj.clone()  # own memory: the archive's buffers are shared between views
        elif isinstance(obj, _ScriptModule):
            for key, value in obj.attributes.items():
                walk(value, f"{name}.{key}" if name else key)

    walk(root, "")
    return tensors


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors: safetensors, a TorchScript archive, or a torch.save file (weights only)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if is_torchscript_archive(path):
            return read_torchscript_tensors(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # torch.load reports a refused or broken pickle in several exception types
        raise UserError(f"cannot read weights from {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state


def _missing(state: dict, keys: list[str], path: Path, what: str) -> None:
    absent = [k for k in keys if k not in state]
    if absent:
        raise UserError(f"{path} does not hold {what} weights (no {', '.join(absent[:3])}); "
                        f"is it the right file?")


def _count_layers(state: dict, prefix: str, suffix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix) and k.endswith(suffix)})


# --- DINO ---------------------------------------------------------------------------------------------

def dino_state_dict(state: dict) -> dict:
    """DINO's training checkpoints hold {'teacher': ...} with 'module.'/'backbone.' prefixes; the released
    backbone files are the bare state dict. Either way: the bare ViT state dict without the projection head."""
    if "teacher" in state and isinstance(state["teacher"], dict):
        state = state["teacher"]
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.startswith("head."):
            out[key] = value
    return out


def dino_to_vit(path: Path):
    """DINO's ViT state dict -> transformers' ViTModel (no pooler), the config read off the tensor shapes.
    Names as in transformers' convert_dino_to_pytorch.py, which made facebook/dino-vits16."""
    from transformers import ViTConfig, ViTModel  # here, not at the top: importing transformers takes seconds

    state = dino_state_dict(read_state_dict(path))
    _missing(state, ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"],
             path, "DINO ViT")
    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    layers = _count_layers(state, "blocks.", ".attn.qkv.weight")
    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),  # DINO's ViTs have 64 dimensions per head
        intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0], image_size=patch * grid, patch_size=patch,
        qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu")  # DINO's vit_small: LayerNorm(eps=1e-6), nn.GELU
    renamed = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"],
    }
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for a, b in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                     ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                     ("mlp.fc2", "output.dense")):
            for p in ("weight", "bias"):
                renamed[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):  # one fused qkv projection -> query, key, value (in that order)
            for part, chunk in zip(("query", "key", "value"), state[f"{src}attn.qkv.{p}"].chunk(3, dim=0)):
                renamed[f"{dst}attention.attention.{part}.{p}"] = chunk
    return _from_state_dict(ViTModel, config, renamed, path, add_pooling_layer=False)


# --- CLIP ---------------------------------------------------------------------------------------------

def openai_clip_to_hf(path: Path):
    """OpenAI's CLIP (ViT image tower) -> transformers' CLIPModel in fp32, the config read off the shapes.
    Names as in transformers' convert_clip_original_pytorch_to_hf.py, which made openai/clip-vit-base-patch32."""
    from transformers import CLIPConfig, CLIPModel  # here, not at the top: importing transformers takes seconds

    state = read_state_dict(path)
    _missing(state, ["visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection"], path,
             "OpenAI CLIP (ViT)")
    state = {k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    vocab = state["token_embedding.weight"].shape[0]
    vision_layers = _count_layers(state, "visual.transformer.resblocks.", ".attn.in_proj_weight")
    text_layers = _count_layers(state, "transformer.resblocks.", ".attn.in_proj_weight")
    config = CLIPConfig(
        projection_dim=state["text_projection"].shape[1],
        vision_config=dict(hidden_size=width, num_hidden_layers=vision_layers, num_attention_heads=width // 64,
                           intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                           image_size=patch * grid, patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text_config=dict(hidden_size=text_width, num_hidden_layers=text_layers, num_attention_heads=text_width // 64,
                         intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         vocab_size=vocab, max_position_embeddings=state["positional_embedding"].shape[0],
                         hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         # OpenAI's vocabulary ends with <|startoftext|>, <|endoftext|>
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    renamed = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),  # OpenAI multiplies x @ proj; Linear does x @ W.T
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"],
    }
    towers = (("visual.transformer.resblocks.", "vision_model.encoder.layers.", vision_layers),
              ("transformer.resblocks.", "text_model.encoder.layers.", text_layers))
    for src_prefix, dst_prefix, layers in towers:
        for i in range(layers):
            src, dst = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                for p in ("weight", "bias"):
                    renamed[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"]
            for p, hf_p in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), state[f"{src}attn.{p}"].chunk(3, dim=0)):
                    renamed[f"{dst}self_attn.{part}.{hf_p}"] = chunk
    return _from_state_dict(CLIPModel, config, renamed, path)


def openai_bpe_tokenizer(bpe_path: Path):
    """transformers' CLIPTokenizer from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, with the vocabulary built the
    way OpenAI's SimpleTokenizer builds it: 256 byte symbols, the same with '</w>', one entry per merge, then
    <|startoftext|> and <|endoftext|>."""
    from transformers import CLIPTokenizer  # here, not at the top: importing transformers takes seconds

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1] if line.strip()]  # OpenAI's slice
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _from_state_dict(cls, config, state: dict, path: Path, **kw):
    """The model from tensors named as in its published Hugging Face checkpoint; transformers' own loading
    maps them onto whatever its classes call them today."""
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True,
                                          dtype=torch.float32, **kw)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot convert {path}: {str(e).splitlines()[0][:200]}") from None
    problems = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"]) + sorted(info["unexpected_keys"])
    if problems:
        raise UserError(f"cannot convert {path}: its tensors do not fill the model ({problems[0]})")
    return model.eval()
