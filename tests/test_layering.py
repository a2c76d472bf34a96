"""The code's layering, read from its source: ovis_data never imports ovis_model or ovis_demo, ovis_model
never imports ovis_demo, ovis_data's subpackages import each other without a cycle (imports inside
functions count; `if TYPE_CHECKING:` ones do not), no `_private` name is imported from another module, and
every name imported from the project's modules exists (what a rename or a merge breaks first)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ovis_data", "ovis_model", "ovis_demo")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every runtime import in `path`, at any depth."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names)
    return found


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py"))


def test_packages_import_downward_only() -> None:
    below = {"ovis_data": ("ovis_model", "ovis_demo"), "ovis_model": ("ovis_demo",)}
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for package, forbidden in below.items()
        for path in _sources(package)
        for line, module, _ in _imports(path)
        if module.split(".")[0] in forbidden
    ]
    assert not wrong, "\n".join(wrong)


def test_ovis_data_subpackages_form_no_cycle() -> None:
    modules = {_module_name(p) for p in _sources("ovis_data")}

    def unit(module: str) -> str:  # ovis_data.pack.stage -> ovis_data.pack; ovis_data.recipes stays
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for path in _sources("ovis_data"):
        source = unit(_module_name(path))
        for _, module, names in _imports(path):
            for target in [f"{module}.{n}" for n in names] or [module]:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and unit(target) != source and target.startswith("ovis_data."):
                    graph.setdefault(source, set()).add(unit(target))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if reaches(b, a, set()))
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_a_module_and_every_imported_name_exists() -> None:
    problems = []
    for path in _sources(*PACKAGES, "tests", "benchmarks"):
        for line, module, names in _imports(path):
            ours = module.split(".")[0] in PACKAGES or module.startswith("test_")
            if not ours or not names:
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            problems += [f"{where}: {module}.{n} is private" for n in private]
            try:
                loaded = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if (e.name or "").split(".")[0] in PACKAGES:
                    problems.append(f"{where}: no module {module}")
                continue  # an optional engine that is not installed
            for name in names:
                if name != "*" and not hasattr(loaded, name):
                    try:
                        importlib.import_module(f"{module}.{name}")
                    except ModuleNotFoundError:
                        problems.append(f"{where}: {module} has no {name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_in_the_wheel(package: str) -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"{package}"' in pyproject.split("[tool.hatch.build.targets.wheel]")[1].split("\n[")[0]
