"""`tokenbooth score`: DINO, CLIP-I and CLIP-T of any folder of images against a folder of references.

Which images: every image file of the folder, except that a folder `tokenbooth generate` wrote (it has a
`generate.json`) contributes exactly the images that file lists, so its `grid.png` is never scored.
Prompts for CLIP-T, in this order of preference: `prompt` (one for every image), a prompts file (a .txt with
one line per scored image in file-name order, or a .json {file name: prompt}), or the prompt in
`generate.json`. Without any, CLIP-T is skipped.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, warn
from ..images import list_images
from ..io import atomic_write_json, check_can_create, read_json_object
from ..personalize.placeholder import PLACEHOLDER, remove_placeholder
from . import metrics
from .tables import markdown_table

SIDECAR = "generate.json"  # what `tokenbooth generate` writes beside its images


def parse_metrics(text: str) -> set[str]:
    """"dino,clip-i,clip-t" -> {"dino", "clip_i", "clip_t"}."""
    wanted = {m.strip().replace("-", "_") for m in text.split(",") if m.strip()}
    if not wanted or wanted - set(metrics.METRICS):
        raise UserError(f"--metrics takes a comma-separated list of dino, clip-i, clip-t (got {text!r})")
    return wanted


def images_to_score(folder: Path) -> tuple[list[Path], dict | None]:
    """(image files, generate.json's contents or None)."""
    files = list_images(folder, "--images folder")
    sidecar = Path(folder) / SIDECAR
    if not sidecar.is_file():
        return files, None
    meta = read_json_object(sidecar, "generate sidecar")
    names = meta.get("images")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{sidecar} has no list of image names under 'images'; is it from tokenbooth generate?")
    listed = [Path(folder) / n for n in names]
    missing = [p for p in listed if p not in files]
    if missing:
        raise UserError(f"{sidecar} lists {missing[0].name}, which is not an image in {folder}")
    return listed, meta


def prompts_for(files: list[Path], prompt: str | None, prompts_file: Path | None, meta: dict | None) -> list[str] | None:
    if prompt is not None:
        return [prompt] * len(files)
    if prompts_file is not None:
        return read_prompts_file(Path(prompts_file), files)
    if meta is not None and isinstance(meta.get("prompt"), str):
        return [meta["prompt"]] * len(files)
    return None


def read_prompts_file(path: Path, files: list[Path]) -> list[str]:
    if not path.is_file():
        raise UserError(f"--prompts file not found: {path}")
    if path.suffix.lower() == ".json":
        table = read_json_object(path, "--prompts file")
        missing = [f.name for f in files if not isinstance(table.get(f.name), str)]
        if missing:
            raise UserError(f"{path} must map every scored image's file name to its prompt (no text for {missing[0]})")
        return [table[f.name] for f in files]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"cannot read --prompts file {path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read --prompts file {path}: {e.strerror}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != len(files):
        raise UserError(f"{path} has {len(lines)} prompt line(s) for {len(files)} image(s); give one per image "
                        f"in file-name order")
    return lines


def score_folder(images: Path, references: Path, wanted: set[str], prompt: str | None = None,
                 prompts_file: Path | None = None, dino: str | None = None, clip: str | None = None,
                 placeholder: str = PLACEHOLDER, output: Path | None = None) -> list[dict]:
    """Scores the images of one folder against the references of another, prints the summary table and
    (optionally) writes every number to `output`; returns the table. Every input is checked before an
    encoder loads."""
    files, meta = images_to_score(images)
    ref_files = list_images(references, "--references folder")
    prompts = prompts_for(files, prompt, prompts_file, meta) if "clip_t" in wanted else None
    if output is not None:
        check_can_create(output, "--output file", folder=False)
    pictures, refs = metrics.read_images(files), metrics.read_images(ref_files)
    dino_encoder = metrics.load_dino(dino) if "dino" in wanted else None
    clip_encoder = metrics.load_clip(clip) if {"clip_i", "clip_t"} & wanted else None
    if clip_encoder is not None and prompts is not None:
        clip_encoder.require_tokenizer()
    scorer = metrics.Scorer(dino_encoder, clip_encoder, clip_i="clip_i" in wanted)
    texts = [remove_placeholder(p, placeholder) for p in prompts] if prompts else None
    if "clip_t" in wanted and prompts is None:
        warn("no prompts (--prompt, --prompts or a generate.json beside the images): CLIP-T skipped")
    scores = scorer.score(pictures, refs, texts)
    for row, f in zip(scores["images"], files):
        row["file"] = f.name
    for row, f in zip(scores["real"], ref_files):
        row["file"] = f.name
    if texts:
        for row, p, t in zip(scores["images"], prompts, texts):
            row.update(prompt=p, clip_t_text=t)
    means = metrics.aggregate([{**scores, "references": len(refs)}])
    table = [
        {"row": "real images (references vs each other)", "images": len(refs), "dino": means["real_dino"],
         "clip_i": means["real_clip_i"], "clip_t": None},
        {"row": str(images), "images": len(pictures), "dino": means["dino"], "clip_i": means["clip_i"],
         "clip_t": means["clip_t"]},
    ]
    print(markdown_table(table, ["row", "images", "dino", "clip_i", "clip_t"]), end="")
    if output is not None:
        atomic_write_json(Path(output), {
            "images": str(images), "references": str(references), "placeholder": placeholder,
            "dino": dino_encoder.source if dino_encoder else None, "clip": clip_encoder.source if clip_encoder else None,
            "summary": table, **scores})
        print(f"wrote {output}")
    return table
