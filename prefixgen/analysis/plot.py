"""``prefixgen analyze --plot``: held-out hit rate against store bytes, one curve per ``--min-records``.

matplotlib is an optional extra (``pip install 'prefixgen[plot]'``).
"""

from __future__ import annotations

from pathlib import Path

from prefixgen.analysis.analyze import Analysis
from prefixgen.errors import ConfigError


def check_matplotlib() -> None:
    """Raise ConfigError saying how to install matplotlib if it is missing (before any long work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'prefixgen[plot]' (or pip install matplotlib)") from None


def plot_analysis(analysis: Analysis, path: str | Path) -> Path:
    """Write a PNG of held-out hit rate (y) against store bytes (x, log scale), one curve per
    ``min_records``, ending where that choice stores every block it may.

    Example:
        >>> plot_analysis(analyze(cfg, holdout=0.1), "sizes.png")  # doctest: +SKIP
    """
    check_matplotlib()
    if not analysis.curves:
        raise ConfigError("--plot draws the hit rate on held-out records: pass --holdout with a fraction above 0, e.g. 0.1")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for label, (sizes, rates) in analysis.curves.items():  # smallest K first: the longest curve, under the others
        (line,) = ax.plot(sizes, [100 * r for r in rates], label=label, linewidth=1.5)
        ax.plot(sizes[-1:], [100 * rates[-1]], "o", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel(f"store size (bytes of KV, {analysis.kv_dtype})")
    ax.set_ylabel("held-out prompt tokens served from the store (%)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(
        f"{Path(analysis.model).name} on {Path(analysis.dataset).name}: hit rate on {analysis.holdout:.0%} held-out records",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
