"""Layers look down: every `import` in src/tokenbooth (at the top of a file or inside a function, absolute or
relative) is read with `ast`, and the test fails on an import circle between tokenbooth modules or on a lower
layer importing a higher one. The order, lowest first (README, "Layout"):

    base utilities (tokenbooth, io, errors, images, assets, quiet) < toyworld < vq < backbones < sampling
    < personalize < eval < pretrain < plan < commands < cli < ui

pretrain trains eval's instruments, so it sits above eval; ui runs `tokenbooth` commands in child processes, so
it sits above cli. A package's `__main__` (`python -m tokenbooth.eval`) is a command line, in cli's layer.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "tokenbooth"
REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src" / PACKAGE

LAYERS = (
    ("base utilities", ("tokenbooth", "tokenbooth.io", "tokenbooth.errors", "tokenbooth.images",
                        "tokenbooth.assets", "tokenbooth.quiet")),
    ("toyworld", ("tokenbooth.toyworld",)),
    ("vq", ("tokenbooth.vq",)),
    ("backbones", ("tokenbooth.backbones",)),
    ("sampling", ("tokenbooth.sampling",)),
    ("personalize", ("tokenbooth.personalize",)),
    ("eval", ("tokenbooth.eval",)),
    ("pretrain", ("tokenbooth.pretrain",)),
    ("plan", ("tokenbooth.plan",)),
    ("commands", ("tokenbooth.commands",)),
    ("cli", ("tokenbooth.cli", "tokenbooth.__main__")),
    ("ui", ("tokenbooth.ui",)),
)

# Upward imports the layering accepts, each with its reason. Keep this short: an entry is a decision in the
# wrong room unless the reason says why no room is better.
ACCEPTED_UPWARD = {
    # `tokenbooth ui` is the web app's launcher: some command has to start it, and the app in turn runs
    # `tokenbooth train` through the cli in a child process (ui/child.py), so ui cannot sit below commands.
    ("tokenbooth.commands.ui", "tokenbooth.ui.app"),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the tokenbooth module it imports
    path: Path
    line: int
    typing_only: bool = False  # under `if TYPE_CHECKING:`: never executed, so it closes no circle

    def where(self) -> str:
        shown = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{shown}:{self.line}"


def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package folder `root`."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join([package, *parts])] = path
    return files


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]  # a plain module's dots count from its package
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _import_nodes(tree: ast.AST, typing_only: bool = False):
    """(import statement, whether it sits under `if TYPE_CHECKING:`) for every import in the tree."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, typing_only
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), typing_only)
        else:
            yield from _import_nodes(node, typing_only)


def imports_in(module: str, path: Path, known: set[str], package: str = PACKAGE) -> list[Import]:
    """Every import of a `package` module in one file, wherever it sits (top level, in a function, under
    `if __name__ == "__main__"` or `if TYPE_CHECKING:`). `from X import Y` counts as importing X.Y where X.Y is
    a module, else X."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node, typing_only in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node.level, node.module)
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            while target not in known and "." in target:  # `import tokenbooth.x.Name` style leftovers
                target = target.rsplit(".", 1)[0]
            if target in known and (target == package or target.startswith(package + ".")) and target != module:
                found.append(Import(module, target, path, node.lineno, typing_only))
    return found


def import_graph(root: Path = SOURCE, package: str = PACKAGE) -> list[Import]:
    files = module_files(root, package)
    return [imp for module, path in files.items() for imp in imports_in(module, path, set(files), package)]


def layer_of(module: str) -> int:
    if module.endswith(".__main__"):  # `python -m tokenbooth.x` entry points are the command line
        return [name for name, _ in LAYERS].index("cli")
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")
    return rank


def upward_imports(imports: list[Import], accepted=ACCEPTED_UPWARD) -> list[str]:
    """One line per import of a higher layer: file:line, both modules and both layers."""
    problems = []
    for imp in imports:
        low, high = layer_of(imp.module), layer_of(imp.target)
        if high > low and (imp.module, imp.target) not in accepted:
            problems.append(f"{imp.where()}: {imp.module} ({LAYERS[low][0]}) imports {imp.target} "
                            f"({LAYERS[high][0]}), a higher layer")
    return problems


def import_circles(imports: list[Import]) -> list[str]:
    """One line per circle (a strongly connected group of modules, found with Tarjan's algorithm), spelled out
    as the imports that close it, each with its file:line. Imports for type checkers only are left out: they
    never run. (They still count as layer crossings: `upward_imports` sees them.)"""
    edges: dict[str, dict[str, Import]] = {}
    for imp in (i for i in imports if not i.typing_only):
        edges.setdefault(imp.module, {}).setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth stays below the number of modules (about 100)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [" -> ".join(_one_circle(group, edges)) for group in groups]


def _one_circle(group: list[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """A shortest path from the group's first module back to itself, as 'module (file:line)' steps."""
    members, start = set(group), group[0]
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt, imp in edges.get(node, {}).items():
                if nxt in members and nxt not in came_from:
                    came_from[nxt] = imp
                    following.append(nxt)
        if start in came_from:
            break
        frontier = following
    steps, node = [], start
    while True:
        imp = came_from[node]
        steps.append(f"{imp.module} ({imp.where()})")
        node = imp.module
        if node == start:
            break
    return [*reversed(steps), start]


def test_every_module_belongs_to_a_layer():
    for module in module_files(SOURCE):
        layer_of(module)


def test_no_lower_layer_imports_a_higher_one():
    problems = upward_imports(import_graph())
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_circles():
    circles = import_circles(import_graph())
    assert not circles, "import circles:\n" + "\n".join(circles)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / PACKAGE


def test_the_checks_catch_an_upward_import_and_a_circle_inside_functions(tmp_path):
    # backbones/hf.py as it was: a function-local import of personalize, which imports hf back
    root = _write(tmp_path, {
        "__init__.py": "",
        "backbones/__init__.py": "",
        "backbones/hf.py": "import json\n\n\ndef load():\n    from ..personalize.lean import quantize_layers\n",
        "personalize/__init__.py": "",
        "personalize/lean.py": "def require():\n    from tokenbooth.backbones import hf\n",
        "sampling/__init__.py": "from .draw import draw\n",
        "sampling/draw.py": "from ..backbones.hf import load\n",  # downward: fine
    })
    imports = import_graph(root)
    assert upward_imports(imports) == [
        f"{root / 'backbones/hf.py'}:5: tokenbooth.backbones.hf (backbones) imports tokenbooth.personalize.lean "
        f"(personalize), a higher layer"]
    [circle] = import_circles(imports)
    assert circle == (f"tokenbooth.backbones.hf ({root / 'backbones/hf.py'}:5) -> "
                      f"tokenbooth.personalize.lean ({root / 'personalize/lean.py'}:2) -> tokenbooth.backbones.hf")


def test_relative_imports_resolve_from_the_importing_package(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "vq/__init__.py": "from .. import errors\nfrom . import taming\n",
        "vq/taming.py": "from ..errors import UserError\nimport tokenbooth.vq.vqgan as v\n",
        "vq/vqgan.py": "",
    })
    pairs = {(i.module, i.target) for i in import_graph(root)}
    assert pairs == {("tokenbooth.vq", "tokenbooth.errors"), ("tokenbooth.vq", "tokenbooth.vq.taming"),
                     ("tokenbooth.vq.taming", "tokenbooth.errors"), ("tokenbooth.vq.taming", "tokenbooth.vq.vqgan")}


def test_imports_for_type_checkers_close_no_circle_but_still_cross_layers(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": "",
        "personalize/__init__.py": "",
        "personalize/config.py": "from .placeholder import PLACEHOLDER\n",
        "personalize/placeholder.py": ("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                       "    from .config import TrainConfig\n    from ..eval import metrics\n"),
        "eval/__init__.py": "",
        "eval/metrics.py": "",
    })
    imports = import_graph(root)
    assert import_circles(imports) == []
    [upward] = upward_imports(imports)
    assert upward.startswith(f"{root / 'personalize/placeholder.py'}:5: tokenbooth.personalize.placeholder "
                             f"(personalize) imports tokenbooth.eval.metrics (eval)")
