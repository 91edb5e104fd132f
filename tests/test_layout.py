"""The code's shape, checked: no import circles, one name per setting, methods and presets
defined once, every package installed, comments that cite only files in the repo."""
import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"backend": "fit_implicit.backend", "shared": "fit_implicit.shared",
            "blender_addon": "fit_implicit.blender_addon"}


def modules() -> dict[str, Path]:
    """Import name -> file, for every module of the three packages."""
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((name, *parts))] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (annotations only: never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (inside functions too)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    found.add(target)
                elif base in known:
                    found.add(base)
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    """Not even through an import inside a function (only ``if TYPE_CHECKING:`` imports, which
    never run, may point back, for annotations)."""
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert sum(len(v) for v in graph.values()) > 100       # the walk sees the imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_setting_has_one_name_and_every_preset_builds():
    from fit_implicit.backend.fitting.config import METHOD_CONFIGS, FitConfig, make_config
    from fit_implicit.shared.methods import METHOD_INFO, METHODS, PRESET_INFO, PRESETS

    assert set(METHOD_CONFIGS) == set(METHODS) == set(METHOD_INFO) and set(PRESET_INFO) == set(PRESETS)
    for method in METHODS:
        names = FitConfig.for_method(method).settings()       # raises if a name is defined twice
        assert {"steps", "levels", "march_steps", "occupancy_resolution", "mesh_opacity", "grid_lr"} <= set(names)
        for preset in PRESETS:
            cfg = make_config(method, preset, device="cpu")   # a preset naming an unknown setting raises
            assert FitConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_every_package_folder_is_installed():
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(doc["tool"]["setuptools"]["packages"])
    folders = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert folders == listed
    assert doc["tool"]["setuptools"]["package-dir"] == {v: k for k, v in PACKAGES.items()}


CITED = re.compile(r"(?<![\w./-])((?:backend|shared|blender_addon|tests|benchmarks|scripts|docs)/[\w./-]*\w\.(?:py|md|toml|sh))")


@pytest.mark.parametrize("folder", ["backend", "shared", "blender_addon", "tests", "benchmarks", "scripts", "docs",
                                    "README.md"])
def test_cited_files_exist(folder):
    """Every repo path a comment, docstring or document names (``backend/fitting/loop.py``) exists."""
    missing = []
    root = REPO / folder
    for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
        if path.suffix not in (".py", ".md") or "__pycache__" in path.parts:
            continue
        for m in CITED.finditer(path.read_text()):
            if not (REPO / m.group(1)).exists():
                missing.append(f"{path.relative_to(REPO)}: {m.group(1)}")
    assert missing == []
