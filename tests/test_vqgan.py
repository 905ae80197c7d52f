import pytest
import torch

from tokenbooth.errors import UserError
from tokenbooth.vq import VQGAN, VQGANConfig, load_vqgan, save_vqgan

TINY = VQGANConfig(embed_dim=8, n_embed=32, z_channels=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                   attn_resolutions=(8,), resolution=32)


def test_round_trip_shapes_follow_the_downsampling():
    model = VQGAN(TINY).eval()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(pixels)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < TINY.n_embed
    assert model.decode(codes).shape == (2, 3, 32, 32)


def test_parameter_names_are_those_of_the_taming_checkpoint_chameleon_ships():
    keys = set(VQGAN(TINY).state_dict())
    for key in [
        "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.2.attn.0.q.weight", "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.proj_out.weight", "encoder.norm_out.weight", "encoder.conv_out.weight",
        "decoder.conv_in.weight", "decoder.up.2.block.1.conv2.weight", "decoder.up.1.upsample.conv.weight",
        "decoder.mid.block_2.norm2.bias", "quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.bias",
    ]:
        assert key in keys, key
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)


def test_chameleon_sized_config_has_the_real_shapes():
    cfg = VQGANConfig()  # Chameleon's: 8192 codes, 16x downsampling
    assert cfg.downsample == 16 and cfg.n_embed == 8192
    model = VQGAN(VQGANConfig(ch=32, ch_mult=cfg.ch_mult, z_channels=32, embed_dim=32, n_embed=64, num_res_blocks=1))
    assert model.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 4)


def test_save_and_load_round_trip(tmp_path):
    model = VQGAN(TINY).eval()
    save_vqgan(model, tmp_path)
    loaded = load_vqgan(tmp_path)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(model.encode(x), loaded.encode(x))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    save_vqgan(VQGAN(TINY), tmp_path)
    (tmp_path / "vqgan.json").write_text(VQGANConfig(**{**TINY.__dict__, "n_embed": 64}).to_json())
    with pytest.raises(UserError, match="do not match"):
        load_vqgan(tmp_path)


def test_truncated_weights_are_refused(tmp_path):
    save_vqgan(VQGAN(TINY), tmp_path)
    data = (tmp_path / "vqgan.safetensors").read_bytes()
    (tmp_path / "vqgan.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read"):
        load_vqgan(tmp_path)
