"""The two-stage personalization recipe of Sun et al. 2025, for any backbone. Read it top to bottom:

  setup()            the references as VQ codes (once), [V] on a reserved vocabulary row, stage 2's targets
                     picked and frozen, a resumed run's checkpoint loaded
  train()            the stages of the plan in turn (train_stage); the switch from one to the next is at its top
    STAGE1           only [V]'s embedding learns: cross-entropy on the image tokens, Textual-Inversion prompts
    STAGE2           [V] keeps learning and the layers join (Q/K/V of every layer, or LoRA on them)
  save_checkpoint()  checkpoints/step-N along the way make the run resumable; the adapter folder at the end

The pieces live in modules named for what they are: config.py (TrainConfig and the stage names; on disk
STAGE1 is "embedding" and STAGE2 "layers"), placeholder.py ([V]), targets.py (what stage 2 trains), loss.py
(batches and the loss), validation.py (pictures and fidelity), run_folder.py (the run's files), checks.py.

A two-stage run can also start from another run's finished stage 1 (`train(stage1_from=...)`), as if it
had trained that stage itself: toy-bench trains stage 1 once per subject and branches every stage-2
variant from it. Training both at once from the start (`stages="joint"`, JOINT) is the paper's failing
variant, kept for the ablation: the layers absorb the subject and [V] stays undertrained.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..io import DiskFull, is_disk_full
from . import adapter as adapter_files
from . import run_folder
from .checks import check_class_name, check_run, check_training_fits  # noqa: F401 (re-exported)
from .config import (COMPUTE_DTYPES, JOINT, STAGE1, STAGE2, STAGE_PLANS, TrainConfig,  # noqa: F401 (re-exported)
                     check_train_values, sampling_config, stage_plan)
from .lean import make_optimizer
from .loss import (autocast_for, batch_loss, class_tokens, encode_each,  # noqa: F401 (encode_each: re-exported)
                   enable_gradient_checkpointing, make_batch, reference_tokens, runnable_compute_dtype)
from .placeholder import Placeholder
from .run_folder import FIDELITY_LOG, RUN_FILE, RunState, latest_checkpoint, read_run  # noqa: F401 (re-exported)
from .sharded import Sharding, clip_gradients, full, load_optimizer, whole_optimizer_state
from .targets import prepare_layers, select_layer_params, train_layers, trains_layers  # noqa: F401
from .validation import (FidelityScorer, Scorer, announce_validation_base, log_fidelity, render_validation,
                         write_loss_plot)

_autocast_for = autocast_for  # its name where plan/phases.py, tests and benchmarks import it


def stage_params(stage: str, placeholder: Placeholder, layer_params: dict, cfg: TrainConfig) -> list[dict]:
    """What each stage trains, at what learning rate: the optimizer's parameter groups."""
    if stage == STAGE1:
        return [{"params": [placeholder.embedding], "lr": cfg.stage1_lr}]
    if stage == STAGE2:
        return [{"params": [placeholder.embedding], "lr": cfg.stage2_lr},
                {"params": list(layer_params.values()), "lr": cfg.stage2_lr}]
    return [{"params": [placeholder.embedding], "lr": cfg.stage1_lr},  # JOINT: both from step 0
            {"params": list(layer_params.values()), "lr": cfg.stage2_lr}]


@dataclass
class Run:
    """One run as setup() leaves it for the stages."""
    backbone: object
    cfg: TrainConfig
    out: Path
    sharding: Sharding | None  # this process's place in a run over several (sharded.py), or None
    main: bool  # the process that writes files
    generator: torch.Generator  # draws [V]'s start and every batch: the run's one source of randomness
    placeholder: Placeholder
    codes: torch.Tensor  # the references' VQ codes
    prior: torch.Tensor | None  # prior preservation's class images, as codes
    lora_config: object  # peft's LoraConfig with --layers lora, else None
    layer_params: dict  # stage 2's targets by parameter name
    state: RunState
    saved: dict | None  # a resumed checkpoint's optimizer and RNG states, until its stage takes them
    autocast: Callable
    fidelity: Scorer | None


def train(backbone, images, cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, source: dict | None = None, sharding: Sharding | None = None,
          stage1_from: Path | None = None, fidelity_scorer: FidelityScorer | None = None) -> Path:
    """Personalizes `backbone` on `images`; writes the adapter to `out` and returns it.

    stop_after: end the run (checkpoint written) after this many steps in all, as an interruption would.
    source: what the caller wants recorded about where the run came from (the command: model, image folder).
    sharding: this process's place in a run over several processes (`Sharding.from_environment()` under
    `accelerate launch`; sharded.py); None trains alone, as each of DreamBench's processes does.
    stage1_from: the folder of a run (an embedding-only one, say) whose finished stage 1 this two-stage run
    takes instead of training its own; the adapter is then the one the uninterrupted run would give. Not
    used when resuming: `out` already holds a copy.
    fidelity_scorer: (backbone, references) -> score(pictures), for the validation pictures' fidelity.jsonl
    (eval.fidelity.fidelity_scorer, the family's DINO-role encoder); None: the pictures are drawn, not scored."""
    run = None
    try:
        run = setup(backbone, images, cfg, Path(out), resume, source, sharding, stage1_from, fidelity_scorer)
        for stage_index, (stage, steps) in enumerate(cfg.plan):
            if stage_index < run.state.stage_index:
                continue  # trained before this run was resumed
            if not train_stage(run, stage_index, stage, steps, progress, stop_after):
                return run.out  # stopped at stop_after, as an interruption would
        finish(run)
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise disk_full(Path(out), cfg, run, e) from None
    return run.out


def setup(backbone, images, cfg: TrainConfig, out: Path, resume: bool, source: dict | None,
          sharding: Sharding | None, stage1_from: Path | None, fidelity_scorer: FidelityScorer | None) -> Run:
    """Everything before the first step. The order is the run's RNG order: keep it (resume is bitwise)."""
    check_run(backbone, cfg, out, resume, sharding, stage1_from)  # every refusal comes before anything is written
    main = sharding is None or sharding.main
    generator = torch.Generator().manual_seed(cfg.seed)
    placeholder = Placeholder(backbone, cfg, generator)
    codes = reference_tokens(backbone, images, cfg.flip)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and main:
        run_folder.write_run(out, cfg, source)
    prior = class_tokens(backbone, cfg, out) if cfg.prior_preservation else None
    lora_config, layer_params = prepare_layers(backbone, cfg)
    if stage1_from is not None and not resume:
        if main:
            run_folder.start_from_stage1(run_folder.stage1_checkpoint(backbone, cfg, Path(stage1_from)), out)
        if sharding is not None:
            sharding.barrier()  # the copy is whole before any process reads it
        resume = True  # from here on, the run is one resumed at the end of its stage 1
    checkpoint = latest_checkpoint(out) if resume else None
    saved, state = load_checkpoint(checkpoint, placeholder, layer_params, generator) if checkpoint else (None, RunState())
    device = next(backbone.model.parameters()).device.type
    autocast = autocast_for(backbone, runnable_compute_dtype(cfg.compute_dtype, device))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    if main:  # an interrupted run may have logged past its last checkpoint
        run_folder.truncate_log(out / run_folder.LOG, state.global_step)
        run_folder.truncate_log(out / run_folder.FIDELITY_LOG, state.global_step)
    # only the process that writes files scores (log_fidelity does nothing without a scorer)
    fidelity = fidelity_scorer(backbone, images) if fidelity_scorer and cfg.validation_prompts and main else None
    if main:
        announce_validation_base(cfg)
    return Run(backbone, cfg, out, sharding, main, generator, placeholder, codes, prior, lora_config, layer_params,
               state, saved, autocast, fidelity)


def train_stage(run: Run, stage_index: int, stage: str, steps: int, progress: bool, stop_after: int | None) -> bool:
    """One stage of the plan, from where the run is. False where it stopped at `stop_after`. Over 60 lines:
    it is the loop, kept whole so it reads in one go."""
    cfg, state = run.cfg, run.state
    # The stage 1 -> stage 2 switch: from STAGE2 (or JOINT) on, the layers train as fp32 masters and a new
    # optimizer takes [V] and the layers at stage 2's learning rate (stage_params).
    with_layers = stage != STAGE1
    train_layers(run.layer_params, with_layers)
    if run.sharding is not None and with_layers:
        run.layer_params = run.sharding.shard(run.backbone, run.layer_params)
    trainable = [run.placeholder.embedding] + (list(run.layer_params.values()) if with_layers else [])
    optimizer = make_optimizer(cfg.optimizer, stage_params(stage, run.placeholder, run.layer_params, cfg),
                               cfg.weight_decay)
    if run.saved is not None and stage_index == state.stage_index and run.saved.get("optimizer"):
        load_optimizer(optimizer, run.saved["optimizer"])
    run.saved = None
    if stage_index > state.stage_index:
        state.stage_index, state.step = stage_index, 0
    bar = tqdm(total=steps, initial=state.step, desc=f"stage {stage_index + 1}/{len(cfg.plan)} ({stage})",
               unit="step", disable=not progress)
    t0 = time.time()
    while state.step < steps:
        batches = [(*make_batch(run.backbone, run.placeholder, cfg, run.codes, run.generator, subject=True), 1.0)]
        if run.prior is not None:
            batches.append((*make_batch(run.backbone, run.placeholder, cfg, run.prior, run.generator, subject=False),
                            cfg.prior_loss_weight))
        if run.sharding is not None:  # every process drew the same pairs; each trains on its share
            batches = [(*run.sharding.local(ids, labels), weight) for ids, labels, weight in batches]

        def check_loss(loss, step=state.global_step + 1):
            if not math.isfinite(loss.item()):
                last = latest_checkpoint(run.out)
                raise UserError(f"loss became {loss.item()} at step {step}; stopped"
                                + (f" (last good checkpoint: {last})" if last else "") + "; try a lower learning rate")

        loss = train_step(run.backbone, run.placeholder, batches, cfg, optimizer, trainable, run.autocast, check_loss,
                          run.sharding)
        if run.sharding is not None:
            run.sharding.average(loss)  # the whole batch's loss, as one process would log it
        state.step += 1
        state.global_step += 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
        if run.main:
            run_folder.append_record(run.out / run_folder.LOG, {"step": state.global_step, "stage": stage,
                                                                "loss": round(loss.item(), 5),
                                                                "seconds": round(time.time() - t0, 3)})
        t0 = time.time()
        finished = state.step == steps and stage_index == len(cfg.plan) - 1
        # The end of stage 1 is always kept: [V] and its optimizer state alone (layers have not trained
        # yet), a few KB, from which another two-stage run can start (stage1_from).
        stage1_done = stage == STAGE1 and state.step == steps
        if state.global_step % cfg.checkpointing_steps == 0 or state.global_step == stop_after or stage1_done:
            save_checkpoint(run, optimizer)
        if cfg.validation_prompts and state.global_step % cfg.validation_steps == 0 and not finished:
            validate(run, state.global_step, stage)
        if state.global_step == stop_after and not finished:
            bar.close()
            run.backbone.model.eval()
            return False
    bar.close()
    return True


def train_step(backbone, placeholder: Placeholder, batches: list, cfg: TrainConfig, optimizer, trainable: list,
               autocast, check_loss=None, sharding=None) -> torch.Tensor:
    """One optimizer step. `batches`: [(ids, labels, weight)], the subject's pairs and (prior preservation) the
    class's; each is split into `cfg.gradient_accumulation_steps` micro-batches whose gradients add up to the
    whole batch's (every pair holds the same number of image tokens, so the micro-batch means weigh equally).
    `check_loss(loss)` sees each micro-batch's loss before its backward pass. Gradients are released after
    the step, so the next forward pass runs without them. In a sharded run (sharded.py) `batches` are this
    process's share and [V]'s gradient is averaged over the processes. Returns the step's loss."""
    total = 0.0
    for ids, labels, weight in batches:
        parts = list(zip(ids.chunk(cfg.gradient_accumulation_steps), labels.chunk(cfg.gradient_accumulation_steps)))
        for part_ids, part_labels in parts:
            loss = weight * batch_loss(backbone, placeholder, part_ids, part_labels, autocast) / len(parts)
            if check_loss is not None:
                check_loss(loss)
            loss.backward()
            total = total + loss.detach()
    if sharding is not None:
        sharding.average(placeholder.embedding.grad)
    clip_gradients(trainable, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def validate(run: Run, step: int | None, stage: str) -> None:
    """validation/step-N.png (final.png for step None) and, where scored, its fidelity.jsonl record."""
    pictures = render_validation(run.backbone, run.placeholder, run.cfg, run_folder.validation_picture(run.out, step),
                                 write=run.main)
    log_fidelity(run.out, run.fidelity, pictures, run.state.global_step, stage)


def finish(run: Run) -> None:
    """The adapter folder, the last validation grid and the loss plot."""
    run.backbone.model.eval()  # checkpointing put layers in training mode; sampling wants them as they were
    save_final_adapter(run)
    if run.cfg.validation_prompts:
        validate(run, None, "final")
    if run.main:
        write_loss_plot(run.out)
    if run.sharding is not None:
        run.sharding.barrier()  # the adapter is whole on disk before any process returns


# --- saving and loading ----------------------------------------------------------------------------------

def save_checkpoint(run: Run, optimizer) -> None:
    """checkpoints/step-N/: trainable tensors, optimizer and RNG state (run_folder.py writes it whole or not at
    all). A sharded run gathers whole tensors (every process takes part) and its first process writes them:
    the same files as a single-process run."""
    tensors = {"placeholder": run.placeholder.embedding.detach().cpu().clone(),  # layers: once they train
               **{f"layer.{k}": full(v.detach()).cpu().clone() for k, v in run.layer_params.items() if v.requires_grad}}
    optimizer_state = whole_optimizer_state(optimizer)
    if run.main:
        run_folder.write_checkpoint(run.out, run.state, tensors, {"optimizer": optimizer_state,
                                                                  "generator": run.generator.get_state(),
                                                                  "torch_rng": torch.get_rng_state()})
    if run.sharding is not None:
        run.sharding.barrier()


def load_checkpoint(folder: Path, placeholder: Placeholder, layer_params: dict, generator
                    ) -> tuple[dict, RunState]:
    """Puts a checkpoint's tensors and RNG states back; returns its saved states and where the run was."""
    tensors, saved, state = run_folder.read_checkpoint(folder)
    with torch.no_grad():
        placeholder.embedding.copy_(tensors["placeholder"])
        for k, v in layer_params.items():
            if f"layer.{k}" in tensors:  # saved while training: fp32 masters, which stay fp32
                train_layers({k: v}, True)
                v.copy_(tensors[f"layer.{k}"])
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return saved, state


def save_final_adapter(run: Run) -> None:
    backbone, placeholder, cfg = run.backbone, run.placeholder, run.cfg
    config = {
        "backbone": backbone.name, "base_fingerprint": adapter_files.base_fingerprint(backbone.folder),
        "placeholder": placeholder.text, "placeholder_token": placeholder.token,
        "placeholder_token_id": placeholder.token_ids[0], "placeholder_tokens": placeholder.tokens,
        "placeholder_token_ids": placeholder.token_ids, "class_name": cfg.class_name,
        **{k: v for k, v in asdict(cfg).items() if k not in ("class_name", "placeholder")},
        "sampling": sampling_config(backbone, cfg).distribution(),
    }
    dtype = backbone.input_embeddings().weight.dtype
    whole = {k: full(v.detach()) for k, v in run.layer_params.items()}  # gathered if sharded (every process)
    trained_layers = trains_layers(cfg)
    layer_tensors = {k: v.to(dtype) for k, v in whole.items()} if trained_layers and run.lora_config is None else None
    lora = (run.lora_config, whole) if trained_layers and run.lora_config is not None else None
    if run.main:
        write_adapter_whole(run.out, lambda folder: adapter_files.save_adapter(folder, config, placeholder.embedding,
                                                                        layer_tensors, lora))


ADAPTER_TMP = ".adapter.tmp"  # in the run folder: the adapter's files while they are written


def write_adapter_whole(out: Path, save: Callable[[Path], None]) -> None:
    """The adapter's files appear in `out` together or not at all: `save` writes them into a folder beside,
    then each is renamed into place, adapter_config.json (what makes the folder an adapter) last. Renaming
    takes no room, so a full disk stops `save`, and leaves nothing of the adapter behind."""
    tmp = out / ADAPTER_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == adapter_files.CONFIG):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


# Validation pictures, the loss plot and the logs of a run: a few MB at most
PICTURES_AND_LOGS = 5_000_000


def room_needed(out: Path, cfg: TrainConfig, run: Run | None) -> int:
    """Roughly what the run still writes from its last complete checkpoint on: its checkpoints (each the
    trained tensors and AdamW's two moments of them, in fp32; or the size of the last one, if larger), the
    adapter, pictures and logs."""
    trained = 0 if run is None else (run.placeholder.embedding.numel()
                                     + sum(p.numel() for p in run.layer_params.values()))
    checkpoint = max(run_folder.checkpoint_bytes(out), 3 * 4 * trained)
    last = latest_checkpoint(out)
    done = int(last.name.split("-")[1]) if last is not None else 0
    left = max(sum(steps for _, steps in cfg.plan) - done, 0)
    checkpoints = left // cfg.checkpointing_steps + 2  # along the way, the end of stage 1, the last one
    return checkpoints * checkpoint + 4 * trained + PICTURES_AND_LOGS


def disk_full(out: Path, cfg: TrainConfig, run: Run | None, error: Exception) -> UserError:
    """One line for a run the disk stopped: what could not be written, about how much room it needs, how to
    go on."""
    what = error.path if isinstance(error, DiskFull) else (getattr(error, "filename", None) or f"a file in {out}")
    shutil.rmtree(out / ADAPTER_TMP, ignore_errors=True)
    last = latest_checkpoint(out)
    start = f"from its last complete checkpoint, {last.relative_to(out)}" if last else "from the start"
    return UserError(f"no space left on the device: could not write {what}; the run needs about "
                     f"{room_needed(out, cfg, run) / 1e6:,.0f} MB free there to finish. Free it and run the same "
                     f"command with --resume: it goes on {start}")
