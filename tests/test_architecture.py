"""The import graph docs/architecture.md describes: no cycle, no upward import, no stage importing another."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "specialize"

# Lower layers never import higher ones; the three stages sit side by side and never import each other.
LAYERS = {
    "core": 0,  # specialize/*.py: io, hashing, config, records, prompts, models
    "data": 1,
    "generation": 2,
    "synth": 3,
    "train": 3,
    "eval": 3,
    "experiment": 4,
    "serve": 4,
    "cli": 5,
}
STAGES = {"synth", "train", "eval"}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    if parts[1] == "cli":
        return "cli"
    return parts[1] if parts[1] in LAYERS else "core"


def _imports(path: Path, module: str) -> set[str]:
    """Every specialize module this file imports, lazily (inside functions) too; TYPE_CHECKING blocks excepted."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    package = (module if path.name == "__init__.py" else module.rpartition(".")[0]).split(".")
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("specialize")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("specialize"):
                # `from pkg import mod` imports a submodule, `from pkg import name` the package itself
                out |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
    return out - {module}


def _is_module(name: str) -> bool:
    path = SRC.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    return {m: {i for i in _imports(p, m) if i in files} for m, p in files.items()}


def test_graph_is_read():
    g = graph()
    assert "specialize.eval.harness" in g and "specialize.models" in g["specialize.eval.harness"]


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n) :], n]
                # a package importing its own submodules (re-exports) is how Python packages work, not a cycle
                if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in itertools.pairwise(cycle)):
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_no_upward_import_and_stages_independent():
    bad = []
    for m, deps in graph().items():
        for d in deps:
            lm, ld = _layer(m), _layer(d)
            if LAYERS[ld] > LAYERS[lm] or (lm in STAGES and ld in STAGES and lm != ld):
                bad.append(f"{m} ({lm}) imports {d} ({ld})")
    assert not bad, "\n".join(sorted(bad))
