"""The package's layers: every module imports only its own layer and those below it, and no modules
import each other in a circle, counting imports inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import free_cli

PACKAGE = Path(free_cli.__file__).parent
# Bottom to top. The base modules (errors, paths, metrics) import nothing of the package but errors.
LAYERS = ["base", "decoding", "thresholds", "records", "evaluation", "training", "cli"]
BASE = {"errors", "paths", "metrics"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    head = module.split(".")[0]
    if head in BASE:
        return "base"
    return head if head in LAYERS else None


def imports_of(path: Path) -> set[str]:
    """The package's modules `path` imports (anywhere in it), by dotted name under free_cli."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("free_cli"):
                target = node.module[len("free_cli.") :] if node.module != "free_cli" else ""
            else:
                continue
            found.add(target)
            for alias in node.names:  # `from . import x`: x may be a module
                candidate = f"{target}.{alias.name}" if target else alias.name
                if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists() or (PACKAGE / Path(*candidate.split("."))).is_dir():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {a.name[len("free_cli.") :] for a in node.names if a.name.startswith("free_cli.")}
    return {t for t in found if t and t != name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules.pop("", None)  # the package's own __init__ re-exports the library's names
    modules.pop("__main__", None)
    return {m: {t for t in imports_of(p) if t in modules} for m, p in modules.items()}


def test_every_module_belongs_to_a_layer():
    assert sorted(m for m in graph() if layer_of(m) is None) == []


def test_imports_flow_downward_only():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module)):
                upward.append(f"{module} -> {target}")
            if layer_of(module) == "base" and layer_of(target) == "base" and target != "errors":
                upward.append(f"{module} -> {target} (base modules import errors only)")
    assert upward == []


def test_no_import_circle():
    edges, circles = graph(), []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(edges[module]):
            if target in path:
                circles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    assert circles == []


def test_the_test_sees_imports():
    """The walker itself: a known downward import and a known function-level one are found."""
    edges = graph()
    assert "decoding.engine" in edges["records.stream"]
    assert "decoding.strategies" in edges["decoding.engine"]  # imported inside Engine.stream
