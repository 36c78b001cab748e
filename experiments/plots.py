"""Matplotlib helpers (Agg backend, files written atomically)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.store import atomic_write_bytes  # noqa: E402


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0), **kw: Any) -> tuple[Any, Any]:
    """A figure with ``nrows x ncols`` axes, ``size`` in inches per axes."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kw)
    return fig, axes


def save(fig: Any, path: Path) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically and close it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


COLORS = {
    "none": "tab:gray",
    "bn": "tab:blue",
    "ln": "tab:orange",
    "gn": "tab:green",
    "in": "tab:red",
    "rms": "tab:purple",
    "zca": "tab:cyan",
    "pca": "tab:brown",
    "cholesky": "tab:olive",
    "iternorm": "tab:pink",
    "dbn": "navy",
    "gw": "darkgoldenrod",
    "brn": "teal",
    "ghost-bn": "lightsteelblue",
    "gn+ws": "darkgreen",
    "frn": "sienna",
    "dyt": "crimson",
}


def color(name: str) -> str | None:
    return COLORS.get(name)


def band(ax: Any, x: Any, mean: Any, se: Any, label: str, color_: str | None = None, **kw: Any) -> None:
    """Plot ``mean`` against ``x`` with a shaded band of +-2 standard errors (the seed spread)."""
    import numpy as np

    x, mean, se = (np.asarray(v, float) for v in (x, mean, se))
    (line,) = ax.plot(x, mean, label=label, color=color_, **kw)
    ax.fill_between(x, mean - 2 * se, mean + 2 * se, color=line.get_color(), alpha=0.18, linewidth=0)


BAND_NOTE = "shaded: mean ± 2 standard errors over seeds"
