"""`tokenbooth plan`: fake-tensor peaks against real CPU peaks, the published models' shipped configurations,
the command's table, JSON and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
from helpers import run_cli

from tokenbooth.personalize.recipe import TrainConfig
from tokenbooth.plan import (RunSettings, candidates, describe, estimate, fitting_settings, measure, parse_size,
                             plan_memory, run_phase)
from tokenbooth.plan.blueprints import blueprint
from tokenbooth.plan.phases import quantize_base
from tokenbooth.plan.tracker import ALLOCATOR_RESERVE, fake_run, measured_peak
from tokenbooth.sampling import SamplingConfig


def settings(**train) -> RunSettings:
    return RunSettings(train=TrainConfig.for_family("mini", class_name="dog", **{"batch_size": 2, **train}),
                       sample=SamplingConfig.for_family("mini", cfg_scale=2.0), num_images=2)


@pytest.mark.parametrize("phase,kw", [("stage1", {}), ("stage2", {"layers": "lora", "quantize": "nf4"}),
                                      ("stage2", {"gradient_checkpointing": True}), ("sampling-sjd", {})])
def test_predicted_peak_is_within_15_percent_of_the_real_cpu_peak(tiny_model_dir, phase, kw):
    s = settings(**kw)
    predicted = measure(str(tiny_model_dir), phase, s).peak_bytes

    def setup():
        backbone = blueprint(str(tiny_model_dir))
        quantize_base(backbone, s)
        return backbone

    measured = measured_peak(setup, lambda backbone: run_phase(backbone, phase, s))
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


def test_published_models_build_without_memory_at_their_real_size():
    counts = {"lumina-mgpt-7b-768": 7_043_090_432, "janus-pro-1b": 1_866_921_611, "janus-pro-7b": 6_988_342_923}
    with fake_run() as live:
        for name, params in counts.items():
            backbone = blueprint(name)
            assert sum(p.numel() for p in backbone.model.parameters()) == params
            assert backbone.model.config.get_text_config(decoder=True).num_hidden_layers in (24, 30, 32)
        assert blueprint("lumina-mgpt-7b-1024").layout.rows == 64 and blueprint("janus-pro-7b").layout.rows == 24
    assert live.peak > 14e9  # counted as if allocated, and nothing was


def test_fewer_bytes_with_each_lean_option():
    # Lumina-mGPT narrowed to 1024 wide and 2 layers, at 256 px, on fake tensors: weights that matter, in bf16
    narrow = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=8)

    def peak(**kw):
        return measure("lumina-mgpt-7b-768", "stage2", settings(**kw), resolution=256, overrides=narrow).peak_bytes

    assert peak(layers="lora", quantize="nf4") < peak(layers="lora", quantize="int8") < peak(layers="lora")
    assert peak(batch_size=8, gradient_accumulation_steps=4) < peak(batch_size=8)
    assert peak(optimizer="adamw8bit") < peak()


def test_plan_json_reports_phases_peak_and_fit(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "plan", "--model", tiny_model_dir, "--json", "--gpu-memory", "80GB",
                             "--batch-size", "2", "-n", "1")
    assert code == 0, err
    plan = json.loads(out)
    assert set(plan["phases"]) == {"stage1", "stage2", "validation", "sampling-cfg", "sampling-sjd"}
    assert plan["peak_bytes"] == max(p["peak_bytes"] for p in plan["phases"].values()) and plan["fits"] is True
    assert plan["fitting"] and all(f["peak_bytes"] > 0 for f in plan["fitting"])
    # every fitting entry is a whole run: its training flags, generate's, and every phase's figure
    for entry in plan["fitting"]:
        assert entry["generate_flags"].startswith("--batch-size ") and "--quantize" in entry["generate_flags"]
        assert {"validation", "sampling-cfg", "sampling-sjd"} <= set(entry["phases"])
        assert entry["peak_bytes"] == max(p["peak_bytes"] for p in entry["phases"].values())


def test_plan_table_for_a_janus_config(capsys, tmp_path):
    folder = tmp_path / "janus-tiny"
    folder.mkdir()
    config = json.loads((blueprint_configs() / "janus-pro-1b.json").read_text())
    config["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=512, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config["vision_config"].update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=64,
                                   image_size=64)
    config["vq_config"].update(base_channels=32, num_res_blocks=1, projection_dim=64, image_token_embed_dim=64,
                               num_embeddings=64)
    (folder / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli(capsys, "plan", "--model", folder, "--batch-size", "1", "--stages", "embedding")
    assert code == 0, err
    assert "stage1" in out and "sampling-cfg" in out and "stage2" not in out


def blueprint_configs():
    from tokenbooth.assets import CONFIGS_DIR

    return CONFIGS_DIR


@pytest.mark.parametrize("argv,message", [
    (["--gpu-memory", "24 bananas"], "--gpu-memory must be a size like 24GB"),
    (["--gpu-memory", "24"], "--gpu-memory needs a unit"),
    (["--model", "gpt-7"], "unknown model 'gpt-7'"),
    (["--gpu-memory", "1MB"], "nothing fits 1MB"),
    (["--gpu-memory", "1.001GB"], "nothing fits 1.001GB: the closest whole run, train --layers lora"),
    (["--sample-quantize", "nf4"], "--sample-quantize nf4: the adapter of --layers qkv changes whole layer"),
    (["--validation-prompts", "-1"], "--validation-prompts must be >= 0"),
    (["--quantize", "nf4"], "--layers qkv trains the Q/K/V weights themselves"),
    (["--quantize", "fp3"], "--quantize must be one of none, int8, nf4"),
    (["--gradient-accumulation-steps", "3"], "--gradient-accumulation-steps 3 must divide --batch-size 2"),
])
def test_bad_input_is_one_line(capsys, tiny_model_dir, argv, message):
    code, out, err = run_cli(capsys, "plan", "--model", tiny_model_dir, "--batch-size", "2", *argv)
    assert code != 0 and one_error_line(err).startswith("tokenbooth: error: ") and message in one_error_line(err)


def one_error_line(err: str) -> str:
    """The command's error, one line (libraries' deprecation warnings may precede it on stderr)."""
    lines = [line for line in err.splitlines() if line.startswith("tokenbooth:")]
    assert len(lines) == 1, err
    return lines[0]


def test_quantize_without_its_library_is_one_line(capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # an import that fails, as on a platform without it
    code, out, err = run_cli(capsys, "plan", "--model", tiny_model_dir, "--quantize", "nf4", "--layers", "lora")
    assert code == 1 and "--quantize nf4 needs torchao" in one_error_line(err)


def test_parse_size_units():
    assert parse_size("24GB") == 24e9 and parse_size("80GiB") == 80 * 2**30 and parse_size("16000 MB") == 16e9


def narrow_lumina(folder, layers: int):
    """Lumina-mGPT's configuration narrowed to 256 wide, with `layers` transformer layers: a model folder."""
    config = json.loads((blueprint_configs() / "lumina-mgpt-7b-768.json").read_text())
    config.update(hidden_size=256, intermediate_size=704, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=4)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("phase,kw", [
    ("stage1", {"gradient_checkpointing": True, "gradient_accumulation_steps": 4}),
    ("stage2", {"gradient_accumulation_steps": 4}),
    ("stage2", {"gradient_checkpointing": True, "optimizer": "adamw8bit"}),
    ("stage2", {"layers": "lora", "quantize": "nf4", "gradient_checkpointing": True}),
    ("sampling-cfg", {}),
])
def test_estimate_from_two_and_three_layers_equals_the_full_depth_measurement(tmp_path, phase, kw):
    model = narrow_lumina(tmp_path / "narrow", layers=7)
    s = settings(batch_size=8, **kw)
    estimated = estimate(model, phase, s, resolution=256)
    measured = measure(model, phase, s, resolution=256)
    # 4 micro-batches are estimated as 2: the step's token ids are then 4 rows shorter (a few KB here)
    assert abs(estimated.peak_bytes - measured.peak_bytes) <= 4 * 2 * 8 * 300, (estimated, measured)
    assert estimated.flops == pytest.approx(measured.flops, rel=1e-6)


def test_the_fitting_search_finds_what_trying_every_candidate_finds(tiny_model_dir):
    # One phase per candidate (joint training) with LoRA: 12 candidates, each estimated once, the search's
    # pruning then decides from the same figures.
    s = settings(batch_size=2, stages="joint", layers="lora")
    cache: dict = {}
    every = {describe(o): plan_memory(str(tiny_model_dir), o, sampling=False, cache=cache).peak_bytes
             for o in candidates(s)}  # in their expected speed order
    budget = int(sorted(every.values())[len(every) // 2] + ALLOCATOR_RESERVE)  # about half of them fit
    found = fitting_settings(str(tiny_model_dir), s, budget, limit=3, cache=cache)
    first_three_that_fit = [flags for flags, peak in every.items() if peak + ALLOCATOR_RESERVE <= budget][:3]
    assert len(every) == 12 and len(first_three_that_fit) == 3
    assert sorted(describe(p.settings) for p in found) == sorted(first_three_that_fit)


def test_plan_prints_nothing_but_the_plan():
    # A QLoRA plan imports torchao and bitsandbytes and injects LoRA over quantized layers: none of their notes
    # about optional kernels or merging may reach the user (a fresh process: they come once per process).
    done = subprocess.run([sys.executable, "-m", "tokenbooth", "plan", "--model", "mini", "--layers", "lora",
                           "--quantize", "nf4", "--optimizer", "adamw8bit", "--batch-size", "2", "-n", "1"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "stage2" in done.stdout


PRETEND_AVX512_BF16 = """
import importlib, sys

class PretendAVX512BF16:  # bitsandbytes then fetches its CPU kernel through `kernels`, as on such a CPU
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes.backends.cpu.ops":
            importlib.import_module("bitsandbytes.functional").has_avx512bf16 = lambda: True
        return None

sys.meta_path.insert(0, PretendAVX512BF16())
from tokenbooth.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["--model", "lumina-mgpt-7b-768", "--json"],
                                  ["--model", "mini", "--layers", "lora", "-n", "1", "--json"]])
def test_plan_is_silent_offline_on_a_cpu_whose_bitsandbytes_fetches_kernels(tmp_path, argv):
    """With HF_HUB_OFFLINE=1, peft's import of bitsandbytes made `kernels` log "Skipping publisher trust check
    for 'kernels-community/quantization-bitsandbytes'" on CPUs with AVX512-BF16; pretended here, so the test
    means the same on any CPU."""
    script = tmp_path / "plan_on_avx512_bf16.py"
    script.write_text(PRETEND_AVX512_BF16)
    done = subprocess.run([sys.executable, str(script), "plan", *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "peak_bytes" in done.stdout


def test_a_lean_choice_whose_library_is_missing_is_not_offered(monkeypatch, tiny_model_dir, capsys):
    """A base install (no torchao, no bitsandbytes) still plans: the search leaves those choices out and says
    so, instead of refusing the whole plan because one candidate could not run."""
    import tokenbooth.personalize.lean as lean
    from helpers import run_cli

    monkeypatch.setattr(lean, "can_import", lambda module: module != "bitsandbytes")
    s = settings(batch_size=2, layers="qkv")
    offered = candidates(s)
    assert offered and not any(o.train.optimizer == "adamw8bit" for o in offered)
    assert any(o.train.quantize == "nf4" for o in offered)  # torchao's choices stay
    own = settings(batch_size=2, layers="qkv", optimizer="adamw8bit")
    assert candidates(own)[0].train.optimizer == "adamw8bit"  # the user's own is kept (and refused when run)
    code, out, err = run_cli(capsys, "plan", "--model", str(tiny_model_dir), "--layers", "qkv", "--batch-size", "2",
                             "-n", "1", "--gpu-memory", "80GB")
    assert code == 0, err
    assert "not tried, their library is not installed here: --optimizer adamw8bit" in out


# --- the whole run: validation pictures and generate's sampling, quantized or not ------------------------------

# The tiny model widened so that its decoder layers' weights (which quantization shrinks) weigh as much as the
# sampler's KV cache, with room in its context for a 32-px image block (16 x 16 codes).
WIDE_TINY = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4,
                 max_position_embeddings=1024)


@pytest.mark.parametrize("bits,resolution,images", [
    ("none", 16, 8),  # a short image block: the first pass over the prompts is the peak
    ("none", 32, 4), ("int8", 32, 4), ("nf4", 32, 4),  # the KV cache at the last token is
])
def test_the_sampling_phase_is_what_generate_allocates(tiny_model_dir, bits, resolution, images):
    """The planner's sampling phase (the prompts' first pass, then a pass over the KV cache as it stands at
    the last token, then the VQ decoder) against the real sampler: `draw` on real weights, token by token with
    its growing DynamicCache, measured by the CPU allocator; on a base quantized as `generate --quantize`
    loads it. Within 15% (here within 1%)."""
    from tokenbooth.backbones.quantize import quantize_layers
    from tokenbooth.plan.phases import PROMPT
    from tokenbooth.sampling import draw

    s = replace(settings(), num_images=images, sample_quantize=bits)
    predicted = measure(str(tiny_model_dir), "sampling-cfg", s, resolution=resolution, overrides=WIDE_TINY).peak_bytes

    def setup():
        backbone = blueprint(str(tiny_model_dir), resolution=resolution, overrides=WIDE_TINY)
        quantize_layers(backbone.decoder_layers(), bits)
        return backbone

    measured = measured_peak(setup, lambda backbone: draw(backbone, [PROMPT] * images, s.sample))
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


def test_a_quantized_base_plans_less_sampling_memory_by_its_weights():
    """Lumina-mGPT 7B 768 at batch 4 with guidance: nf4 saves what 6.5 B decoder weights lose going from 2
    bytes to ~0.52 (9.6 GB), int8 from 2 bytes to ~1 (6.5 GB); the KV cache and the rest stay."""
    from tokenbooth.personalize.config import TrainConfig as Train

    def peak(bits):
        s = RunSettings(train=Train.for_family("lumina-mgpt", class_name="dog", layers="lora"),
                        sample=SamplingConfig.for_family("lumina-mgpt"), num_images=4, sample_quantize=bits)
        return estimate("lumina-mgpt-7b-768", "sampling-cfg", s).peak_bytes / 1e9

    full, int8, nf4 = peak("none"), peak("int8"), peak("nf4")
    assert 9.0 < full - nf4 < 10.2 and 6.0 < full - int8 < 7.0, (full, int8, nf4)


def test_copied_quantized_weights_are_counted_like_quantized_ones():
    """The planner gives every weight of a shape the quantized tensors of the first (copy_layouts); those
    copies must weigh what quantizing each weight would: the QLoRA plans once missed 3 GB of Lumina-mGPT's
    4-bit layers that way."""
    from tokenbooth.backbones.quantize import quantize_layers

    def resident(kind, copy):
        with fake_run() as live:
            backbone = blueprint("lumina-mgpt-7b-768", layers=2)
            quantize_layers(backbone.decoder_layers(), kind, copy_layouts=copy)
            return live.now

    for kind in ("int8", "nf4"):
        assert resident(kind, True) == pytest.approx(resident(kind, False), rel=1e-3)


def test_validation_pictures_are_planned_on_the_training_model_with_its_state():
    """The validation phase keeps the last stage's optimizer state and trained tensors alive while it draws:
    more than sampling the same batch from the bare base, and it grows with the prompts drawn at once."""
    train = dict(batch_size=2, layers="qkv")
    bare = measure("mini", "sampling-cfg", replace(settings(**train), num_images=2)).peak_bytes
    one = measure("mini", "validation", replace(settings(**train), validation_prompts=1)).peak_bytes
    two = measure("mini", "validation", replace(settings(**train), validation_prompts=2)).peak_bytes
    assert bare < two and one < two


def test_generate_settings_that_fit_are_the_first_candidate_under_the_budget(tiny_model_dir):
    """The sampling search tries generate's choices in order (the adapter's own bits, then full precision,
    int8, nf4; each from the largest batch down) and takes the first that fits."""
    from tokenbooth.plan import SAMPLING_PHASES, phase_key, sampling_candidates, sampling_fit

    s = replace(settings(layers="lora", quantize="int8"), num_images=4)
    order = sampling_candidates(s)
    assert [(o.sampling_quantize, o.num_images) for o in order][:4] == [("int8", 4), ("int8", 2), ("int8", 1),
                                                                        ("none", 4)]
    cache: dict = {}
    peaks = [max(estimate(str(tiny_model_dir), ph, o).peak_bytes for ph in SAMPLING_PHASES) for o in order]
    budget = int(peaks[1] + ALLOCATOR_RESERVE)  # the first candidate's batch does not fit, the second's does
    assume_smaller = peaks[0] > peaks[1]
    found = sampling_fit(str(tiny_model_dir), s, budget, cache=cache)
    assert assume_smaller and (found.settings.sampling_quantize, found.settings.num_images) == ("int8", 2)
    assert phase_key("sampling-cfg", found.settings) in cache
    qkv = settings(layers="qkv", quantize="none")
    assert {o.sampling_quantize for o in sampling_candidates(qkv)} == {"none"}  # full Q/K/V: generate refuses bits


def test_the_default_sampling_bits_are_those_generate_picks_for_the_adapter():
    assert settings(layers="lora", quantize="nf4").sampling_quantize == "nf4"  # QLoRA: LoRA on its 4-bit base
    assert settings(stages="embedding", quantize="int8").sampling_quantize == "int8"
    assert settings(layers="qkv").sampling_quantize == "none"
    assert replace(settings(layers="lora", quantize="nf4"), sample_quantize="none").sampling_quantize == "none"
