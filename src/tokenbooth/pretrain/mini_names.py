"""mini v3's question about the base model: does mini carry *one individual* into a new context once its
pretraining has shown it individuals that recur under names of their own?

    python -m tokenbooth.pretrain.mini_names data                          # renders and v2's codes
    python -m tokenbooth.pretrain.mini_names train NAME [--share S] [--steps N] [--max-minutes M]
    python -m tokenbooth.pretrain.mini_names export NAME                   # a model folder, for --model
    python -m tokenbooth.pretrain.mini_names check NAME                    # the names, where never shown

Why: every picture of mini's pretraining shows a new instance (38,880 are possible, 60,000 scenes are drawn),
and its caption names only what words can (class, color, pattern, now and then the accent). Nothing ever asked
the model to read an instance's parts or proportions from its prompt, so no prompt embedding, [V]'s included,
has learned to steer them: personalization fits the references, and what it fits stays bound to the reference
scenes (docs/mini-v3-pilot.md, session 3: the memorized robot is drawn on its own grass, never on the beach).
Real text-to-image models have seen many named individuals (a landmark, a mascot, a celebrity) in many
settings; that is what Textual Inversion and the paper's [V] lean on. Here NAME_COUNT pretraining instances
(never reserved ones) get a name token each, `<name000>`.., appended to the vocabulary, and recur in
SCENES_PER_NAME scenes captioned as the rest are, the name before the class word as [V] is ("a <name017> robot
on the beach"): the name binds every attribute, those no word names included. Each named instance is never
shown in UNSEEN_BACKGROUNDS of the ten backgrounds, so it can be asked for where it never was.

The run continues v2's shipped transformer on v2's frozen codes (VQGAN and token layout untouched). The names'
rows are trained apart from the table at their own rate, as [V]'s are (personalize/placeholder.py), and written
into it on export; the reserved rows [V] takes stay as they were. `--share 0` is plain continued pretraining on
the same plain scenes, the control. No instrument (reader, toyDINO, toyCLIP) is part of the loss.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..assets import MINI_DIR
from ..io import atomic_write_json
from ..toyworld import (
    BACKGROUNDS, Instance, Scene, caption, pretraining_scene, random_instance, random_scene, render,
)
from ..vq import load_vqgan
from .loop import (
    StepLog, add_run_options, load_checkpoint, log, optimizer_step, resume, run_from_options, save_checkpoint,
    warmup_cosine, zero_denormals,
)
from .mini import next_token_losses, pad_batch, pretraining_sequence
from .mini_decoder import build_split, encode, to_tensor

NAME_COUNT = 256
SCENES_PER_NAME = 32
UNSEEN_BACKGROUNDS = 2
CHECKPOINT_EVERY = 25  # steps: about a minute and a half of 2 CPU cores
WARMUP = 25


# --- the named individuals ------------------------------------------------------------------------------

def name_token(index: int) -> str:
    return f"<name{index:03d}>"


def named_instances(count: int = NAME_COUNT) -> tuple[Instance, ...]:
    """`count` distinct pretraining instances, a pure function of the count's seed; never a reserved subject
    (random_instance's promise)."""
    rng, out = random.Random("named-instances"), []
    while len(out) < count:
        if (inst := random_instance(rng)) not in out:
            out.append(inst)
    return tuple(out)


def unseen_backgrounds(index: int) -> tuple[str, ...]:
    """The backgrounds named instance `index` is never shown in."""
    return tuple(random.Random(f"unseen:{index}").sample(BACKGROUNDS, UNSEEN_BACKGROUNDS))


def named_scene(instance: Instance, index: int, k: int) -> Scene:
    """Scene k of named instance `index`: any setting but its unseen ones (and never a held-out combination)."""
    rng = random.Random(f"named:{index}:{k}")
    while (scene := random_scene(rng, instance)).background in unseen_backgrounds(index):
        pass
    return scene


def named_caption(scene: Scene, index: int, rng: random.Random) -> str:
    return caption(scene, rng, subject_words=f"{name_token(index)} {scene.instance.cls}")


def build_named(work: Path, count: int = NAME_COUNT, per_name: int = SCENES_PER_NAME) -> Path:
    """v2's codes of every named scene, in order (name 0's scenes, then name 1's...): `<work>/named.npz`."""
    path = work / "named.npz"
    if path.exists():
        return path
    t0 = time.time()
    scenes = [named_scene(inst, j, k) for j, inst in enumerate(named_instances(count)) for k in range(per_name)]
    pixels = np.stack([np.asarray(render(s)) for s in scenes])
    codes = encode(load_vqgan(MINI_DIR / "vqgan"), to_tensor(pixels))
    tmp = work / ".named.tmp.npz"
    np.savez(tmp, codes=codes.numpy().astype(np.int16), count=count, per_name=per_name)
    tmp.replace(path)  # whole or not at all
    log(f"data: {len(scenes)} named scenes ({count} names) rendered and encoded in {time.time() - t0:.0f} s")
    return path


# --- the model: names appended to the vocabulary ------------------------------------------------------------

def add_names(backbone, count: int) -> int:
    """Appends `count` name tokens to the tokenizer and rows for them to the model (the vocabulary stays a
    multiple of 64, as chameleon_config makes it); returns the first name's id."""
    backbone.tokenizer.add_special_tokens([name_token(j) for j in range(count)])
    first = backbone.tokenizer.token_to_id(name_token(0))
    size = backbone.tokenizer.get_vocab_size()
    backbone.model.resize_token_embeddings(-(-size // 64) * 64, mean_resizing=False)
    backbone.model.config.vocabulary_map = backbone.tokenizer.get_vocab()
    return first


def initial_name_rows(backbone, first: int, count: int) -> torch.Tensor:
    """Where [V] starts (personalize/placeholder.py): noise at the scale of the table's existing rows."""
    table = backbone.input_embeddings().weight.detach()
    noise = torch.randn(count, table.shape[1], generator=torch.Generator().manual_seed(0))
    return (noise * table[:first].float().std()).to(table.device)


def spliced_embeddings(backbone, ids: torch.Tensor, first: int, names: torch.Tensor) -> torch.Tensor:
    """The table's embeddings, with the name tokens' rows taken from `names` (trained apart, at their rate)."""
    ids = ids.to(backbone.device)
    embeds = backbone.embed(ids)
    is_name = (ids >= first) & (ids < first + len(names))
    rows = names[(ids - first).clamp(0, len(names) - 1)]
    return torch.where(is_name[..., None], rows.to(embeds.dtype), embeds)


# --- training ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NamesRun:
    name: str
    share: float = 0.5  # of each batch: named scenes (0: the control, plain scenes only)
    steps: int = 600
    batch: int = 48  # v2's pretraining batch
    lr: float = 2e-4  # the transformer's peak; v2's last cycle peaked at 3e-4 and decayed to zero
    name_lr: float = 3e-3  # the name rows', new and trained from noise: mini's stage-1 rate for [V]
    compute_dtype: str = "bfloat16"  # mini.py's pretraining matrix products; float32 where bf16 is slow


def names_batch(backbone, plain, named, run: NamesRun, step: int):
    """`run.share` of the batch named scenes, the rest plain pretraining scenes; one in ten without text."""
    gen = torch.Generator().manual_seed(step)
    n_named = round(run.share * run.batch)
    plain_idx = torch.randint(len(plain["codes"]), (run.batch - n_named,), generator=gen).tolist()
    named_idx = torch.randint(len(named["codes"]), (n_named,), generator=gen).tolist() if n_named else []
    seqs, labels = [], []
    for kind, i in [("plain", i) for i in plain_idx] + [("named", i) for i in named_idx]:
        rng = random.Random(f"names:{step}:{kind}:{i}")  # captions vary across epochs yet resume exactly
        if kind == "plain":
            codes, prompt = plain["codes"][i], caption(plain["scene"](i), rng)
        else:
            j, k = divmod(i, named["per_name"])
            codes, prompt = named["codes"][i], named_caption(named_scene(named["instances"][j], j, k), j, rng)
        s, lab = pretraining_sequence(backbone, codes, None if rng.random() < 0.1 else prompt)
        seqs.append(s)
        labels.append(lab)
    return pad_batch(seqs, labels, backbone.model.config.pad_token_id)


def load_data(work: Path) -> tuple[dict, dict]:
    """The plain scenes' codes (mini_decoder's train.npz: v2's stream, scenes 0..19,999) and the named ones'."""
    plain_codes = torch.from_numpy(np.load(build_split(work, "train"))["codes"].astype(np.int64))
    data = np.load(build_named(work))
    count, per_name = int(data["count"]), int(data["per_name"])
    plain = {"codes": plain_codes, "scene": pretraining_scene}
    named = {"codes": torch.from_numpy(data["codes"].astype(np.int64)), "per_name": per_name,
             "instances": named_instances(count)}
    return plain, named


def train(work: Path, run: NamesRun, max_minutes: float | None = None, base: Path = MINI_DIR,
          device: str = "cpu") -> bool:
    """Continues `base`'s transformer with named scenes mixed in; True when the run has reached its last step."""
    from ..backbones import load_backbone

    run_dir = work / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "run.json", asdict(run))
    plain, named = load_data(work)
    backbone = load_backbone(str(base), device=device)
    first = add_names(backbone, len(named["instances"]))
    model = backbone.model
    names = torch.nn.Parameter(initial_name_rows(backbone, first, len(named["instances"])))
    trainable = backbone.trainable_parameters()
    for p in trainable.values():
        p.requires_grad_(True)
    groups = [{"params": [p for p in trainable.values() if p.dim() >= 2], "weight_decay": 0.05, "peak": run.lr},
              {"params": [p for p in trainable.values() if p.dim() < 2], "weight_decay": 0.0, "peak": run.lr},
              {"params": [names], "weight_decay": 0.0, "peak": run.name_lr}]
    opt = torch.optim.AdamW(groups, lr=run.lr, betas=(0.9, 0.95))
    ckpt = run_dir / "names.ckpt"
    holder = torch.nn.ParameterDict({"rows": names})  # resume() loads state dicts
    step = resume(ckpt, run.name, opt, model=model, names=holder)
    model.train()
    started, progress = time.time(), StepLog(run.name)
    while step < run.steps:
        if max_minutes is not None and time.time() - started > max_minutes * 60:
            save_checkpoint(ckpt, model=model.state_dict(), names=holder.state_dict(), opt=opt.state_dict(), step=step)
            log(f"{run.name}: stopped at step {step} (--max-minutes), checkpointed")
            return False
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(g["peak"], step, run.steps, WARMUP)
        ids, labels = names_batch(backbone, plain, named, run, step)
        embeds = spliced_embeddings(backbone, ids, first, names)
        losses, known = next_token_losses(backbone, ids, labels, getattr(torch, run.compute_dtype), embeds)
        loss = optimizer_step(opt, losses[known].mean(), list(model.parameters()) + [names])
        step += 1
        progress.add(step, loss)
        if step % 5 == 0:
            zero_denormals(opt)
        if step % CHECKPOINT_EVERY == 0 or step == run.steps:
            save_checkpoint(ckpt, model=model.state_dict(), names=holder.state_dict(), opt=opt.state_dict(), step=step)
    return True


def export(work: Path, name: str, base: Path = MINI_DIR) -> Path:
    """A model folder `<work>/<name>/model`: the base folder with the run's transformer and the names' rows."""
    from ..backbones import load_backbone
    from ..backbones.chameleon import save_chameleon

    ck = load_checkpoint(work / name / "names.ckpt")
    if ck is None:
        raise SystemExit(f"no checkpoint for run {name!r} in {work}")
    backbone = load_backbone(str(base), device="cpu")
    rows = ck["names"]["rows"]
    first = add_names(backbone, len(rows))
    backbone.model.load_state_dict(ck["model"])
    with torch.no_grad():
        backbone.input_embeddings().weight[first:first + len(rows)] = rows.to(backbone.input_embeddings().weight.dtype)
    out, tmp = work / name / "model", work / name / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_chameleon(backbone, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    log(f"{name}: step {ck['step']} exported to {out}")
    return out


# --- the run's own check: is a name drawn where its individual was never shown? -------------------------------

def check(work: Path, name: str, names: int = 24, seeds: int = 2) -> dict:
    """The first `names` named individuals asked for by name in their unseen and in seen backgrounds, and by
    words alone (class and color: all a caption can say) in the unseen ones; the reader's identity figures on
    each set (it reads, it never trained anything here). `<work>/<name>/check.json` and `check.png`."""
    from ..backbones import load_backbone
    from ..eval.reader import IDENTITY, load_reader
    from ..eval.mini_quality import generate
    from ..images import make_grid
    from ..io import atomic_save_image
    from ..sampling import SamplingConfig
    from ..toyworld import describe
    from ..toyworld.world import BACKGROUND_PHRASES

    backbone = load_backbone(str(work / name / "model"), device="cpu")
    reader = load_reader()
    instances = named_instances()[:names]
    sets = {"name, unseen background": [], "name, seen background": [], "words, unseen background": []}
    truth = []
    for j, inst in enumerate(instances):
        unseen = unseen_backgrounds(j)
        seen = [b for b in BACKGROUNDS if b not in unseen][: len(unseen)]
        for b_unseen, b_seen in zip(unseen, seen):
            for _ in range(seeds):
                sets["name, unseen background"].append(f"a {name_token(j)} {inst.cls} {BACKGROUND_PHRASES[b_unseen][0]}")
                sets["name, seen background"].append(f"a {name_token(j)} {inst.cls} {BACKGROUND_PHRASES[b_seen][0]}")
                sets["words, unseen background"].append(describe(inst, b_unseen))
                truth.append(asdict(inst))
    result, images_shown = {}, []
    for label, prompts in sets.items():
        images = generate(backbone, prompts, SamplingConfig.for_family(backbone.family, seed=0))
        readings = reader.read(images)
        right = [[r[a] == t[a] for a in IDENTITY] for r, t in zip(readings, truth)]
        result[label] = {"identity": sum(map(sum, right)) / (len(right) * len(IDENTITY)),
                         "identity, all": sum(map(all, right)) / len(right),
                         **{a: sum(r[i] for r in right) / len(right) for i, a in enumerate(IDENTITY)}}
        images_shown += images[:16]
        log(f"check {name}: {label}: {result[label]}")
    atomic_write_json(work / name / "check.json", result)
    atomic_save_image(make_grid(images_shown, columns=16), work / name / "check.png")
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["data", "train", "export", "check"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--work", type=Path, default=Path("runs/mini-names"))
    add_run_options(ap, NamesRun)  # --share, --steps, ...
    ap.add_argument("--names", type=int, default=NAME_COUNT, help="data: how many named individuals")
    ap.add_argument("--scenes-per-name", type=int, default=SCENES_PER_NAME, help="data: scenes of each")
    ap.add_argument("--max-minutes", type=float)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    if args.what != "data" and not args.name:
        ap.error(f"{args.what} needs a run name")
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)  # denormal floats make CPU kernels many times slower
    if args.what == "data":
        build_split(args.work, "train")
        build_named(args.work, args.names, args.scenes_per_name)
    elif args.what == "train":
        run = run_from_options(NamesRun, args.name, args)
        if train(args.work, run, args.max_minutes, device=args.device):
            log(f"{args.name}: done")
    elif args.what == "export":
        export(args.work, args.name)
    else:
        check(args.work, args.name)


if __name__ == "__main__":
    main()
