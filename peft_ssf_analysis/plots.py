"""Figures of the invariance report: matrix heatmaps with their noise floor, and per-layer line plots.

Only matplotlib's object API (``matplotlib.figure.Figure``) is used: no pyplot, no global state, no backend
switching, so plotting from a library call never touches the caller's matplotlib session.

A STIR matrix is read against its noise floor (see :func:`~peft_ssf_analysis.stir.noise_baseline`): the floor of
a cell is the floor of the *evaluated* layer. The heatmap draws it as an extra, labelled row (when the evaluated
layer runs along the columns, as in R) or column (when it runs along the rows, as in Q and W), and hatches every
cell that does not rise above the floor of its evaluated layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = ["heatmap", "lines"]

FLOOR_LABEL = "noise floor"


def _with_floor(m: torch.Tensor, floor: Sequence[float] | None, axis: Literal["row", "col"]) -> torch.Tensor:
    """The matrix with a NaN gap and the floor appended as a last row (axis="row") or column (axis="col")."""
    if floor is None:
        return m
    values = torch.tensor([math.nan if v is None else float(v) for v in floor], dtype=torch.float64)
    gap = torch.full_like(values, math.nan)
    if axis == "row":
        return torch.cat([m, gap[None], values[None]], dim=0)
    return torch.cat([m, gap[:, None], values[:, None]], dim=1)


def _below_floor(m: torch.Tensor, floor: Sequence[float] | None, axis: Literal["row", "col"]) -> torch.Tensor:
    """Boolean mask of the cells that do not exceed the floor of their evaluated layer."""
    if floor is None:
        return torch.zeros(m.shape, dtype=torch.bool)
    values = torch.tensor([math.nan if v is None else float(v) for v in floor], dtype=torch.float64)
    limit = values[None, :] if axis == "row" else values[:, None]
    return m <= limit


def heatmap(
    m: torch.Tensor,
    layers: Sequence[str],
    title: str,
    ylabel: str,
    xlabel: str,
    floor: Sequence[float] | None = None,
    floor_axis: Literal["row", "col"] = "row",
) -> Any:
    """A [L, L] matrix in [0, 1] as an annotated heatmap; ``floor`` (one value per layer) adds the noise floor.

    ``floor_axis="row"``: the floor belongs to the column's layer and is drawn as an extra bottom row;
    ``"col"``: it belongs to the row's layer and is drawn as an extra right column.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(layers)
    shown = _with_floor(m.double(), floor, floor_axis)
    rows, cols = shown.shape
    size = min(3.0 + 0.45 * n, 14.0)
    fig = Figure(figsize=(size + 1.2 + 0.45 * (cols - n), size + 0.45 * (rows - n)))
    ax = fig.add_subplot()
    image = ax.imshow(shown.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    ticks = list(range(n)) + ([n + 1] if floor is not None else [])  # no tick on the gap before the floor
    labels = list(layers) + ([FLOOR_LABEL] if floor is not None else [])
    ax.set_xticks(ticks if floor_axis == "col" else range(n), labels=labels if floor_axis == "col" else list(layers))
    ax.set_yticks(ticks if floor_axis == "row" else range(n), labels=labels if floor_axis == "row" else list(layers))
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if floor is not None:
        title += "\nhatched: not above the noise floor of the evaluated layer"
    ax.set_title(title, fontsize=10)
    below = _below_floor(m.double(), floor, floor_axis)
    for i in range(n):
        for j in range(n):
            if bool(below[i, j]):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="white", lw=0))
    if n <= 16:
        _annotate(ax, shown)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def _annotate(ax: Any, shown: torch.Tensor) -> None:
    for i in range(shown.shape[0]):
        for j in range(shown.shape[1]):
            v = float(shown[i, j])
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")


def lines(
    layers: Sequence[str],
    series: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str,
    floors: Mapping[str, Sequence[float]] | None = None,
) -> Any:
    """One line per series over the layers; ``floors[name]`` (if given) is drawn dashed in the series' colour."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.5 * len(layers) + 2.0) + 2.2, 3.8))
    ax = fig.add_subplot()
    floors = floors or {}
    values_shown: list[float] = []
    for name, values in series.items():
        values = [math.nan if v is None else float(v) for v in values]
        (line,) = ax.plot(range(len(layers)), values, marker="o", label=name)
        values_shown += list(values)
        if name in floors:
            floor = [math.nan if v is None else v for v in floors[name]]
            ax.plot(range(len(layers)), floor, ls="--", color=line.get_color(), label=f"{name}: {FLOOR_LABEL}")
            values_shown += floor
    ax.set_xticks(range(len(layers)), labels=list(layers), rotation=45)
    ax.set_ylim(min([0.0, *(v for v in values_shown if not math.isnan(v))]) - 0.02, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig
