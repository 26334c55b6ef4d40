"""The layering of docs/architecture.md: each wing of prefixgen imports only wings below it (lazy imports inside
functions included), so the write side, the read side and the tools over them never reach up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "prefixgen"

# Bottom to top: a wing may import the wings before it in this list, never one after it.
FLOORS = [
    "errors",
    "compat",
    "config",
    "checksum",
    "cache_spec",
    "format",
    "kvcache",
    "model",
    "store",
    "data",
    "analysis",
    "maintain",
    "builder",
    "export",
    "integrations",
    "report",
    "cli",
    "__main__",
    "__init__",  # the public API: `from prefixgen import PrefixStore, build`
]


def _wing(module: str) -> str:
    """``prefixgen.store.reader`` -> ``store``; ``prefixgen`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def wing_imports() -> dict[tuple[str, str], set[str]]:
    """(wing, wing it imports) -> the modules that import it, for every import of prefixgen within prefixgen."""
    edges: dict[tuple[str, str], set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("prefixgen"):
                targets = [f"prefixgen.{a.name}" for a in node.names] if node.module == "prefixgen" else [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("prefixgen.")]
            else:
                continue
            for target in targets:
                a, b = _wing(module), _wing(target)
                if a != b:
                    edges.setdefault((a, b), set()).add(module)
    return edges


def test_every_wing_has_a_floor():
    wings = {_wing(".".join(("prefixgen", p.relative_to(PACKAGE).parts[0].removesuffix(".py")))) for p in PACKAGE.rglob("*.py")}
    assert wings <= set(FLOORS), f"new wings without a floor in FLOORS (and docs/architecture.md): {sorted(wings - set(FLOORS))}"


def test_no_wing_imports_a_wing_above_it():
    edges = wing_imports()
    assert edges, "found no imports: the scan is broken"
    upward = [
        f"{a} imports {b} ({', '.join(sorted(mods))})"
        for (a, b), mods in sorted(edges.items())
        if FLOORS.index(b) > FLOORS.index(a)
    ]
    assert not upward, "imports up a layer:\n" + "\n".join(upward)


# Functions over LONGEST lines: each must read as one straight sequence (a reason here), or be cut into named steps.
LONGEST = 60
LONG_ALLOWED: dict[str, str] = {
    "cli.build": "a typer signature, one option a parameter (62 lines); the body: parse, build, print",
    "cli.export": "a typer signature, one option a parameter (63 lines); the body: parse, export, print",
    "builder.pipeline.build": "TODO: issue 30, branch k30pipe",
    "builder.shares.make_plan": "TODO: issue 30, branch k30pipe",
}


def function_lengths(package: Path = PACKAGE) -> dict[str, int]:
    """Lines of every function and method in ``package`` (prefixgen) (decorators and docstring included; nested functions count
    in their parent and on their own), by qualified name: ``store.reader.PrefixStore.read_locations``."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                lengths[prefix + child.name] = child.end_lineno - first + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        visit(ast.parse(path.read_text()), f"{module}." if module else "")
    return lengths


def test_no_function_is_over_60_lines():
    lengths = function_lengths()
    assert len(lengths) > 100, "found few functions: the scan is broken"
    long = {name: n for name, n in lengths.items() if n > LONGEST and name not in LONG_ALLOWED}
    assert not long, (
        f"functions over {LONGEST} lines (cut them into named steps, or say in LONG_ALLOWED why one reads as one straight sequence):\n"
        + "\n".join(f"{name}: {n}" for name, n in sorted(long.items(), key=lambda item: -item[1]))
    )
    stale = sorted(name for name in LONG_ALLOWED if lengths.get(name, 0) <= LONGEST)
    assert not stale, f"LONG_ALLOWED names functions that are gone or no longer over {LONGEST} lines: {stale}"


if __name__ == "__main__":  # the table in docs/architecture.md
    table: dict[str, set[str]] = {}
    for a, b in wing_imports():
        table.setdefault(a, set()).add(b)
    for wing in reversed(FLOORS):
        below = sorted(table.get(wing, ()), key=FLOORS.index, reverse=True)
        print(f"{wing:<13} -> {', '.join(below) or '(nothing of prefixgen)'}")
