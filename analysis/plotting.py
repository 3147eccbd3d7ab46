"""One figure style for every analysis plot: titles, labelled axes with units, legends, and
atomic PNG + PDF saving (a crashed job never leaves a half-written figure behind)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: jobs run on clusters without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from harness import registry  # noqa: E402
from harness.checkpoint import atomic_path  # noqa: E402

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

_FALLBACK = plt.get_cmap("tab10").colors


def label(method: str) -> str:
    """Display name of a method from the registry ('dydiff-td3bc' -> 'DyDiff-TD3BC');
    unknown names pass through."""
    return registry.METHODS[method].label if method in registry.METHODS else method


def color(name: str, index: int = 0) -> str:
    """A method's fixed colour from the registry (the same in every figure)."""
    if name in registry.METHODS:
        return registry.METHODS[name].color
    return _FALLBACK[index % len(_FALLBACK)]


def new_figure(width: float = 6.0, height: float = 4.0, ncols: int = 1, nrows: int = 1):
    """A figure + axes with the shared style applied."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    for ax in axes.flat:
        ax.grid(True, alpha=STYLE["grid.alpha"])
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, (axes[0, 0] if axes.size == 1 else axes)


def check_labelled(fig: Figure) -> None:
    """Raise unless every axes with data has an x label, every row of axes has a y label
    (panels in a row may share the first one's) and the figure has a title: every figure must
    say what it shows and in which units."""
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.has_data()]
    rows: dict[float, list] = {}
    for i, ax in enumerate(shown):
        if not ax.get_xlabel().strip():
            raise ValueError(f"figure axes {i} ({ax.get_title()!r}) has no x label")
        rows.setdefault(round(ax.get_position().y0, 3), []).append(ax)
    for axs in rows.values():
        if not any(ax.get_ylabel().strip() for ax in axs):
            raise ValueError(f"a row of axes ({[ax.get_title() for ax in axs]}) has no y label")
    if not (fig._suptitle is not None and fig._suptitle.get_text()) and not any(
            ax.get_title() for ax in fig.axes):
        raise ValueError("figure has no title")


def save_figure(fig: Figure, out_stem: str | Path, close: bool = True) -> list[Path]:
    """Save `fig` as `<out_stem>.png` and `.pdf` atomically; returns the two paths."""
    check_labelled(fig)
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.rc_context(STYLE):
        fig.tight_layout()
        for ext in ("png", "pdf"):
            path = out_stem.with_suffix(f".{ext}")
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=ext, bbox_inches="tight")
            paths.append(path)
    if close:
        plt.close(fig)
    return paths
