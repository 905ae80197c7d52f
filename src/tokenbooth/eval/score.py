"""`tokenbooth score`: DINO, CLIP-I and CLIP-T of any folder of images against a folder of references.

Prompts for CLIP-T, in this order of preference: --prompt (one for every image), --prompts FILE (a .txt
with one line per image in file-name order, or a .json {file name: prompt}), or the `generate.json` that
`tokenbooth generate` leaves beside its images. Without any, CLIP-T is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_json
from . import metrics
from .tables import markdown_table


def image_folder(folder: Path, flag: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag} folder not found: {folder}")
    files = metrics.image_files(folder)
    if not files:
        raise UserError(f"no images in {folder} ({flag})")
    return files


def prompts_for(files: list[Path], prompt: str | None, prompts_file: Path | None) -> list[str] | None:
    if prompt is not None:
        return [prompt] * len(files)
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts file not found: {path}")
        if path.suffix == ".json":
            try:
                table = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"cannot read {path}: {e}") from None
            missing = [f.name for f in files if f.name not in table]
            if not isinstance(table, dict) or missing:
                raise UserError(f"{path} must map every image file name to its prompt (no entry for {missing[:1]})")
            return [table[f.name] for f in files]
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(lines) != len(files):
            raise UserError(f"{path} has {len(lines)} prompt line(s) for {len(files)} image(s); give one per image "
                            f"in file-name order")
        return lines
    sidecar = files[0].parent / "generate.json"
    if sidecar.is_file():
        try:
            return [json.loads(sidecar.read_text())["prompt"]] * len(files)
        except (json.JSONDecodeError, KeyError):
            return None
    return None


def run_score(args) -> None:
    wanted = {m.strip().replace("-", "_") for m in args.metrics.split(",") if m.strip()}
    unknown = wanted - set(metrics.METRICS)
    if unknown or not wanted:
        raise UserError(f"--metrics takes a comma-separated list of dino, clip-i, clip-t (got {args.metrics!r})")
    files = image_folder(args.images, "--images")
    ref_files = image_folder(args.references, "--references")
    prompts = prompts_for(files, args.prompt, args.prompts) if "clip_t" in wanted else None
    if "clip_t" in wanted and prompts is None:
        from ..personalize.data import warn

        warn("no prompts (--prompt, --prompts or a generate.json beside the images): CLIP-T skipped")
    dino = metrics.load_dino(args.dino) if "dino" in wanted else None
    clip = metrics.load_clip(args.clip) if {"clip_i", "clip_t"} & wanted else None
    if clip is not None and prompts is not None:
        clip.require_tokenizer()
    scorer = metrics.Scorer(dino, clip, clip_i="clip_i" in wanted)
    images, references = metrics.read_images(files), metrics.read_images(ref_files)
    texts = [metrics.remove_placeholder(p, args.placeholder) for p in prompts] if prompts else None
    scores = scorer.score(images, references, texts)
    for row, f in zip(scores["images"], files):
        row["file"] = f.name
    for row, f in zip(scores["real"], ref_files):
        row["file"] = f.name
    if texts:
        for row, p, t in zip(scores["images"], prompts, texts):
            row.update(prompt=p, clip_t_text=t)
    means = metrics.aggregate([{**scores, "references": len(references)}])
    table = [
        {"row": "real images (references vs each other)", "images": len(references), "dino": means["real_dino"],
         "clip_i": means["real_clip_i"], "clip_t": None},
        {"row": str(args.images), "images": len(images), "dino": means["dino"], "clip_i": means["clip_i"],
         "clip_t": means["clip_t"]},
    ]
    print(markdown_table(table, ["row", "images", "dino", "clip_i", "clip_t"]), end="")
    if args.output:
        atomic_write_json(Path(args.output), {
            "images": str(args.images), "references": str(args.references), "placeholder": args.placeholder,
            "dino": dino.source if dino else None, "clip": clip.source if clip else None, "summary": table, **scores})
        print(f"wrote {args.output}")
