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


# The distributed build's modules: the pipeline hands a distributed build over to them, it does not thread through them.
DISTRIBUTED = ("prefixgen.builder.distributed", "prefixgen.builder.shares", "prefixgen.builder.claims")
PIPELINE = ("builder/pipeline.py", "builder/steps.py")  # build, and the steps it chains


def entries_into_distributed(source: str) -> list[str]:
    """Where code enters the distributed modules: each call of a name imported from them (or of a method of an
    object such a call returned, e.g. ``ranks = Ranks.from_config(cfg)``), and each attribute of such an object
    read (a property runs their code too), as ``line: expression``."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in DISTRIBUTED:
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "prefixgen.builder":
            names.update(a.asname or a.name for a in node.names if f"prefixgen.builder.{a.name}" in DISTRIBUTED)
        elif isinstance(node, ast.Import):
            names.update(a.asname or a.name for a in node.names if a.name in DISTRIBUTED)

    def root(node: ast.AST) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Call)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return node.id if isinstance(node, ast.Name) else None

    found = []
    funcs = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    tops = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    tops = [f for f in tops if not any(f is not g and f in ast.walk(g) for g in tops)]  # outermost functions
    for top in tops:
        held = set(names)  # and, within this function (its closures too), what such a call returned
        for node in ast.walk(top):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and root(node.value) in names:
                held.update(t.id for t in node.targets if isinstance(t, ast.Name))
        for node in ast.walk(top):
            call = isinstance(node, ast.Call) and not isinstance(node.func, ast.Call) and root(node.func) in held
            read = isinstance(node, ast.Attribute) and id(node) not in funcs and isinstance(node.value, ast.Name)
            if call or (read and node.value.id in held):
                found.append(f"{node.lineno}: {ast.unparse(node)[:60]}")
    return sorted(found, key=lambda s: int(s.split(":")[0]))


def test_the_pipeline_enters_the_distributed_code_at_most_twice():
    # One process's build reads top to bottom in builder/pipeline.py: ranks wrap the chain (count in shares -> plan ->
    # the same chain on a rank's share -> merge) instead of threading through it.
    found = {path: entries_into_distributed((PACKAGE / path).read_text()) for path in PIPELINE if (PACKAGE / path).exists()}
    total = sum(len(v) for v in found.values())
    assert total <= 2, f"the pipeline enters the distributed code {total} times: {found}"
    assert not found.get("builder/steps.py"), "the steps of the chain must know nothing of ranks"
