"""toy-bench: the paper's experiment asked of mini, here on a CPU.

    tokenbooth eval toybench --output runs/toybench [--subjects N] [--clip PATH] [--sampler sjd]

Subjects are toyworld's reserved instances (never in mini's pretraining; the demo's robot excluded), 4
reference renders each; 10 prompts per subject of DreamBench's three kinds (new contexts, property changes,
accessories). Rows, as in the paper's Table 1 and ablations:
  references   the references scored against each other (the ceiling)
  base         mini with the class word alone ("a robot on the beach"; the floor)
  embedding    stage 1 only ([V]'s embedding)
  joint        [V] and Q/K/V from step 0 (the paper's failing variant)
  two-stage    stage 1 then stage 2 on Q/K/V (the paper's method)
  two-stage-lora  the same with LoRA on Q/K/V
Metrics go through exactly the code real CLIP goes through (eval/metrics.py) with toyCLIP, a CLIP trained on
toyworld (assets/toyclip, trained by pretrain/toyclip.py): toyCLIP-I (fidelity) and toyCLIP-T (prompt following); and, independent of any
learned encoder, the toyworld checker: identity = the subject's own body color read back where the prompt
keeps it; prompt = the asked background (and asked color) read back.
Images are drawn once, with mini's sampling settings (backbones/families.py), and kept: an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..io import atomic_save_image, atomic_write_json, atomic_write_text, check_can_create
from ..toyworld import COLORS, Scene, render, reserved_instances
from ..toyworld.checker import read_scene
from ..toyworld.world import BACKGROUND_PHRASES, WEARS_ACCESSORIES

VARIANTS = {
    "base": None,
    "embedding": dict(stages="embedding"),
    "joint": dict(stages="joint"),
    "two-stage": dict(stages="two-stage", layers="qkv"),
    "two-stage-lora": dict(stages="two-stage", layers="lora"),
}
REFERENCE_SHOTS = (("white", "center"), ("wood", "left"), ("grass", "center"), ("brick", "right"))
CONTEXTS = ("beach", "snow", "night", "water", "forest")
MODEL = "mini"


def subjects(n: int):
    from ..toyworld.demo_subject import SUBJECT as DEMO

    picked, seen = [], set()
    for inst in reserved_instances():  # one per class first, then second siblings
        if inst != DEMO and inst.cls not in seen:
            picked.append(inst)
            seen.add(inst.cls)
    for inst in reserved_instances():
        if inst != DEMO and inst not in picked:
            picked.append(inst)
    return picked[:n]


def references(inst, size: int) -> list[Image.Image]:
    return [render(Scene(inst, bg, pos, "large", None, seed=2000 + i), size) for i, (bg, pos) in enumerate(REFERENCE_SHOTS)]


def prompts(inst) -> list[dict]:
    """10 prompts: 5 contexts, 3 property changes, 2 accessories (other contexts for classes without them).
    Each says what the checker should read back."""
    subject = f"[V] {inst.cls}"
    out = [dict(text=f"a {subject} {BACKGROUND_PHRASES[bg][0]}", background=bg, color=inst.color, keeps_identity=True)
           for bg in CONTEXTS]
    for color in [c for c in ("red", "blue", "yellow", "green") if c != inst.color][:3]:
        out.append(dict(text=f"a {color} {subject} on a white background", background="white", color=color,
                        keeps_identity=False))
    if inst.cls in WEARS_ACCESSORIES:
        extra = [f"a {subject} wearing a hat on the grass", f"a {subject} with a scarf on the grass"]
        out += [dict(text=t, background="grass", color=inst.color, keeps_identity=True) for t in extra]
    else:
        out += [dict(text=f"a {subject} on the grass", background="grass", color=inst.color, keeps_identity=True),
                dict(text=f"a {subject} on a pink background", background="pink", color=inst.color, keeps_identity=True)]
    return out


def without_placeholder(text: str) -> str:
    return text.replace("[V] ", "")


# --- drawing ------------------------------------------------------------------------------------------

def draw_subject(out: Path, inst, variant: str, sampling) -> list[Image.Image]:
    """Personalizes mini for this variant (unless done) and draws the subject's prompts once."""
    from ..backbones import load_backbone
    from ..personalize import TrainConfig, load_adapter, train
    from ..sampling import draw

    folder = out / "images" / inst.key / variant
    asked = prompts(inst)
    files = [folder / f"{i:02d}.png" for i in range(len(asked))]
    if all(f.exists() for f in files):
        return [Image.open(f).convert("RGB") for f in files]
    base = load_backbone(MODEL)
    if VARIANTS[variant] is None:
        model, texts = base, [without_placeholder(p["text"]) for p in asked]
    else:
        adapter = out / "adapters" / inst.key / variant
        if not (adapter / "adapter_config.json").exists():
            import shutil

            shutil.rmtree(adapter, ignore_errors=True)  # an interrupted training restarts from scratch
            cfg = TrainConfig.for_family(base.family, class_name=inst.cls, seed=sampling.seed, **VARIANTS[variant])
            train(base, references(inst, base.resolution), cfg, adapter, progress=False)
        model, texts = load_adapter(load_backbone(MODEL), adapter), [p["text"] for p in asked]
    images = draw(model, texts, sampling).images
    folder.mkdir(parents=True, exist_ok=True)
    for image, f in zip(images, files):
        atomic_save_image(image, f)
    return images


# --- scoring ------------------------------------------------------------------------------------------

def checker_scores(images, asked) -> dict:
    readings = [read_scene(im) for im in images]
    kept = [(r, p) for r, p in zip(readings, asked) if p["keeps_identity"]]
    return {
        "identity": sum(r.color == p["color"] for r, p in kept) / len(kept),
        "prompt": sum(r.background == p["background"] and (p["keeps_identity"] or r.color == p["color"])
                      for r, p in zip(readings, asked)) / len(asked),
    }


def score_all(out: Path, insts, clip) -> dict:
    from .metrics import mean_similarity, mean_similarity_to_others

    rows = {name: [] for name in ("references", *VARIANTS)}
    for inst in insts:
        refs = references(inst, 32)
        ref_feats = clip.embed_images(refs)
        asked = prompts(inst)
        ref_ident = sum(read_scene(r).color == inst.color for r in refs) / len(refs)
        real = mean_similarity_to_others(ref_feats)
        rows["references"].append(dict(subject=inst.key, clip_i=sum(real) / len(real), clip_t=None,
                                       identity=ref_ident, prompt=None))
        for variant in VARIANTS:
            folder = out / "images" / inst.key / variant
            images = [Image.open(folder / f"{i:02d}.png").convert("RGB") for i in range(len(asked))]
            feats = clip.embed_images(images)
            text = clip.embed_texts([without_placeholder(p["text"]) for p in asked])
            sims = mean_similarity(feats, ref_feats)
            rows[variant].append(dict(subject=inst.key, clip_i=sum(sims) / len(sims),
                                      clip_t=(feats * text).sum(-1).mean().item(), **checker_scores(images, asked)))
    return rows


def summarize(rows: dict) -> list[dict]:
    table = []
    for name, per_subject in rows.items():
        entry = {"row": name}
        for metric in ("clip_i", "clip_t", "identity", "prompt"):
            values = [r[metric] for r in per_subject if r[metric] is not None]
            entry[metric] = sum(values) / len(values) if values else None
        table.append(entry)
    return table


# --- report -------------------------------------------------------------------------------------------

LABELS = {"references": "real references (ceiling)", "base": "base model, class word (floor)",
          "embedding": "embedding only (stage 1)", "joint": "joint from step 0", "two-stage": "two-stage, Q/K/V",
          "two-stage-lora": "two-stage, LoRA r=4"}


def markdown(table: list[dict], n_subjects: int, seconds: float, command: str, sampling) -> str:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "# toy-bench: the paper's experiment on mini", "",
        f"{n_subjects} reserved toyworld subjects (never in pretraining), 4 references and 10 prompts each, one image "
        f"per prompt, CFG {sampling.cfg_scale}, image top-k {sampling.image_top_k}, seed {sampling.seed}, "
        f"{sampling.sampler} sampler. `{command}` took {seconds / 60:.1f} min on 2 CPU cores "
        f"in its last invocation (images and adapters of earlier invocations are reused).", "",
        "| row | toyCLIP-I (fidelity) | toyCLIP-T (prompt) | checker identity | checker prompt |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {LABELS[r['row']]} | {f(r['clip_i'])} | {f(r['clip_t'])} | {f(r['identity'])} | {f(r['prompt'])} |")
    lines += ["", "toyCLIP-I: mean cosine similarity of a generated image to the subject's references (references: to "
              "each other). toyCLIP-T: image against its prompt with [V] removed. Checker identity: share of images "
              "where the subject's own body color is read back (prompts that keep it). Checker prompt: share where "
              "the asked background (and, for property prompts, the asked color) is read back.", ""]
    return "\n".join(lines)


def bar_plot(table: list[dict]) -> Image.Image:
    from PIL import ImageDraw

    metrics = ("clip_i", "clip_t", "identity", "prompt")
    colors = [(60, 110, 200), (230, 140, 40), (70, 160, 80), (200, 70, 70)]
    w, h, left, bottom = 900, 380, 40, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    group = (w - left - 20) / len(table)
    for g, row in enumerate(table):
        for m, metric in enumerate(metrics):
            v = row[metric]
            if v is None:
                continue
            x0 = left + g * group + 10 + m * (group - 20) / len(metrics)
            y0 = h - bottom - v * (h - bottom - 30)
            d.rectangle([x0, y0, x0 + (group - 20) / len(metrics) - 3, h - bottom], fill=colors[m])
        d.text((left + g * group + 8, h - bottom + 8), LABELS[row["row"]][:26], fill="black")
    for m, metric in enumerate(metrics):
        d.rectangle([left + m * 150, 8, left + m * 150 + 12, 20], fill=colors[m])
        d.text((left + m * 150 + 16, 8), metric, fill="black")
    d.line([left, h - bottom, w - 10, h - bottom], fill="black")
    return img


def subject_grid(out: Path, inst) -> Image.Image:
    from ..images import labeled_rows

    rows = [("references", references(inst, 32))]
    for variant in VARIANTS:
        folder = out / "images" / inst.key / variant
        rows.append((LABELS[variant], [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]))
    return labeled_rows(rows, min_cell=64)


def run_toybench(output: Path, n_subjects: int = 10, clip: Path | None = None, seed: int = 0, **sampling) -> list[dict]:
    """The whole toy-bench into `output`; returns the summary table. sampling: SamplingConfig fields over
    mini's defaults (e.g. sampler="sjd")."""
    from tqdm.auto import tqdm

    from ..backbones import load_backbone
    from ..sampling import SamplingConfig, check_sampler
    from .metrics import load_clip

    if n_subjects < 1:
        raise UserError(f"--subjects must be >= 1 (got {n_subjects})")
    mini = load_backbone(MODEL)
    sampling = SamplingConfig.for_family(mini.family, **{"seed": seed, **sampling})
    sampling.validate()
    check_sampler(sampling, mini.layout.body_length)
    del mini
    out = Path(output)
    check_can_create(out, "output folder", folder=True)
    clip = load_clip(str(clip)) if clip else load_clip(str(_bundled_toyclip()))
    insts = subjects(n_subjects)
    t0 = time.time()
    (out / "grids").mkdir(parents=True, exist_ok=True)
    for inst in tqdm(insts, desc="subjects"):
        for variant in VARIANTS:
            draw_subject(out, inst, variant, sampling)
        atomic_save_image(subject_grid(out, inst), out / "grids" / f"{inst.key}.png")
    rows = score_all(out, insts, clip)
    table = summarize(rows)
    seconds = time.time() - t0  # this invocation; images drawn by an earlier, interrupted one are reused
    report = markdown(table, len(insts), seconds, "tokenbooth eval toybench", sampling)
    atomic_write_json(out / "results.json", {"table": table, "per_subject": rows, "subjects": [i.key for i in insts],
                                             "sampling": sampling.to_dict(), "seconds": round(seconds, 1)})
    atomic_write_text(out / "report.md", report)
    atomic_save_image(bar_plot(table), out / "report.png")
    print(report)
    print(f"report: {out / 'report.md'}, plot {out / 'report.png'}, grids {out / 'grids'}")
    return table


def _bundled_toyclip() -> Path:
    from ..assets import TOYCLIP_DIR as MODEL_DIR

    if not (MODEL_DIR / "config.json").exists():
        raise UserError(f"toyCLIP is missing from {MODEL_DIR}; train it with python -m tokenbooth.pretrain.toyclip")
    return MODEL_DIR
