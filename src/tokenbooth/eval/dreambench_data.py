"""DreamBench's dataset as `git clone github.com/google/dreambooth` gives it: one folder of JPEGs per subject and
`prompts_and_classes.txt`, read into subjects, classes and the two prompt lists (dreambench.py runs the bench)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..images import list_images
from ..personalize.placeholder import PLACEHOLDER


PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = {"dog", "cat"}  # DreamBench's live subjects get the "Live Subject Prompts"
PROMPT_LINE = re.compile(r"""(?P<literal>(['"]).*\2)\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?""")


@dataclass
class Subject:
    name: str
    class_name: str
    folder: Path
    images: list[Path]

    @property
    def live(self) -> bool:
        return self.class_name in LIVE_CLASSES


@dataclass
class DreamBench:
    subjects: list[Subject]
    object_prompts: list[str]  # templates: {0} the unique token, {1} the class word
    live_prompts: list[str]

    def prompts(self, subject: Subject, placeholder: str) -> list[str]:
        templates = self.live_prompts if subject.live else self.object_prompts
        return [t.format(placeholder, subject.class_name) for t in templates]


# --- reading the dataset --------------------------------------------------------------------------------

def parse_prompts_and_classes(text: str, path: Path) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(classes as (subject, class), object prompt templates, live prompt templates)."""
    headings = {"classes": "classes", "prompts": None, "object prompts": "object", "live subject prompts": "live"}
    section, seen = None, set()
    classes, prompts = [], {"object": [], "live": []}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.lower() in headings:
            section = headings[line.lower()]
            seen.add(line.lower())
            continue
        where = f"{path}, line {number}"
        if section == "classes":
            if line.replace(" ", "").lower() == "subject_name,class":
                continue
            name, comma, class_name = line.partition(",")
            if not comma or not name.strip() or not class_name.strip():
                raise UserError(f"{where}: expected 'subject_name,class', got {line!r}")
            classes.append((name.strip(), class_name.strip()))
        elif section in prompts:
            if line.startswith("prompt_list") or line in ("[", "]"):
                continue
            match = PROMPT_LINE.fullmatch(line)
            if not match:
                raise UserError(f"{where}: expected a line like 'a {{0}} {{1}} in the jungle'.format(unique_token, "
                                f"class_token), got {line!r}")
            template = ast.literal_eval(match["literal"])  # a string literal, nothing else is evaluated
            if "{0}" not in template or "{1}" not in template:
                raise UserError(f"{where}: the prompt {template!r} lacks {{0}} (unique token) or {{1}} (class)")
            prompts[section].append(template)
        else:
            raise UserError(f"{where}: unexpected line {line!r} outside the Classes and prompt sections")
    for heading in ("classes", "object prompts", "live subject prompts"):
        if heading not in seen:
            raise UserError(f"{path} has no '{heading.title()}' section; is it DreamBench's {PROMPTS_FILE}?")
    if not classes:
        raise UserError(f"{path}: the Classes section lists no subject")
    for key, heading in (("object", "Object Prompts"), ("live", "Live Subject Prompts")):
        if not prompts[key]:
            raise UserError(f"{path}: the {heading} section has no prompt")
    return classes, prompts["object"], prompts["live"]


def read_dreambench(folder: Path, only: list[str] | None = None) -> DreamBench:
    """The dataset folder as DreamBench lays it out; `only` picks subjects. Every image of the picked
    subjects is opened now, so a bad file stops the run before hours of work."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"DreamBench folder not found: {folder}")
    prompts_file = folder / PROMPTS_FILE
    if not prompts_file.is_file():
        raise UserError(f"{folder} is not DreamBench's dataset folder: {PROMPTS_FILE} is missing (clone "
                        f"github.com/google/dreambooth and pass its dataset/ folder)")
    classes, object_prompts, live_prompts = parse_prompts_and_classes(read_text(prompts_file), prompts_file)
    names = [name for name, _ in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"{prompts_file} lists subject {duplicates[0]} twice")
    if only is not None:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UserError(f"unknown subject {unknown[0]!r}: {prompts_file} lists {', '.join(names)}")
        classes = [(n, c) for n, c in classes if n in only]
    subjects = []
    for name, class_name in classes:
        sub = folder / name
        if not sub.is_dir():
            raise UserError(f"subject {name} (listed in {PROMPTS_FILE}) has no folder {sub}")
        images = list_images(sub, f"subject {name}'s folder")
        check_images(images)
        subjects.append(Subject(name, class_name, sub, images))
    return DreamBench(subjects, object_prompts, live_prompts)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"cannot read {path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def describe(bench: DreamBench, placeholder: str = PLACEHOLDER) -> str:
    """What a run on `bench` would do: subjects with their class and image count, then the prompts."""
    lines = [f"{len(bench.subjects)} subject(s):"]
    lines += [f"  {s.name}: class {s.class_name}, {len(s.images)} image(s), "
              f"{'live subject' if s.live else 'object'} prompts" for s in bench.subjects]
    for title, templates in (("object prompts", bench.object_prompts), ("live subject prompts", bench.live_prompts)):
        lines.append(f"{len(templates)} {title}:")
        lines += [f"  {t.format(placeholder, '{class}')}" for t in templates]
    return "\n".join(lines) + "\n"


def check_images(paths: list[Path]) -> None:
    for path in paths:
        try:
            with Image.open(path) as im:
                im.draft("RGB", (64, 64))  # JPEGs decode at 1/8 scale: enough to find a broken file, fast
                im.load()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"cannot read image {path}: {e.__class__.__name__}") from None
