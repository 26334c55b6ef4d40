"""The shape of the code: each module's line count and the functions over 60 lines (as
``tests/test_layers.py::test_no_function_is_over_60_lines`` measures them), for a before/after table.

    python benchmarks/code_shape.py                       # this checkout
    python benchmarks/code_shape.py --root /tmp/old-main  # another checkout (e.g. a git worktree of main)
    python benchmarks/code_shape.py --root /tmp/old-main --markdown --min-lines 300 --top 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_layers import LONG_ALLOWED, LONGEST, function_lengths  # noqa: E402


def module_lines(package: Path) -> dict[str, int]:
    """Lines of each module of ``package``, by its path inside it (``store/reader.py``)."""
    return {str(p.relative_to(package)): len(p.read_text().splitlines()) for p in sorted(package.rglob("*.py"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="a checkout of prefixgen (default: this one)")
    ap.add_argument("--markdown", action="store_true", help="markdown tables instead of plain columns")
    ap.add_argument("--min-lines", type=int, default=0, help="list only modules of at least this many lines")
    ap.add_argument("--top", type=int, default=0, help=f"list the N longest functions (default: those over {LONGEST} lines)")
    args = ap.parse_args()
    package = args.root / "prefixgen"
    lines = module_lines(package)
    ranked = sorted(((n, name) for name, n in function_lengths(package).items()), reverse=True)
    long = ranked[: args.top] if args.top else [(n, name) for n, name in ranked if n > LONGEST]
    row = "| {} | {} |" if args.markdown else "{:<40} {:>6}"
    print(row.format("module", "lines"))
    if args.markdown:
        print("|---|---|")
    for name, n in sorted(lines.items(), key=lambda item: -item[1]):
        if n >= args.min_lines:
            print(row.format(name, f"{n:,}"))
    print(row.format(f"total ({len(lines)} modules)", f"{sum(lines.values()):,}"))
    print()
    print(
        row.format(f"the {args.top} longest functions" if args.top else f"function over {LONGEST} lines", "lines")
        + (" allowed because |" if args.markdown else "")
    )
    if args.markdown:
        print("|---|---|---|")
    for n, name in long:
        reason = LONG_ALLOWED.get(name, "")
        print(row.format(name, n) + (f" {reason} |" if args.markdown else f"  {reason}"))


if __name__ == "__main__":
    main()
