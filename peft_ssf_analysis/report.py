"""Compare a pretrained model with one or more fine-tuned versions of it: invariance retention and similarity.

For layers i, j of the shared architecture (``layers``, default every block plus ``"final"``) and clean images X:

- ``R[f][i, j] = STIR(F_j | P_i)``: X' inverted from pretrained layer i, evaluated at fine-tuned layer j.
  Rows: pretrained layer, columns: fine-tuned layer. ``diag R`` is the *retention* of pretrained invariance.
- ``Q[f][i, j] = STIR(P_i | F_j)``: X' inverted from fine-tuned layer j, evaluated at pretrained layer i (same
  axes as R): did the pretrained layer already have the invariances fine-tuning created?
- ``C[f][i, j] = CKA(P_i(X), F_j(X))``: plain representational similarity (same axes).
- ``W[m][i, j] = STIR(M_i | M_j)`` within one model m (pretrained and every fine-tuned one): rows are the evaluated
  layer, columns the source layer; the diagonal is computed, not assumed.
- ``similarity[l, a, b] = CKA(M_a,l(X), M_b,l(X))`` between all models (pretrained first) at each layer l: the SSF
  paper's "which method stays closest to full fine-tuning" comparison (see :meth:`InvarianceReport.closeness`).
- ``noise_baseline[m][l] = CKA(M_l(X), M_l(N))`` with N pure noise images (the inversion's starting noise clamped
  to [0, 1]): the value STIR takes at evaluated layer l when X' carries no information about X. A STIR cell is
  read against the floor of its evaluated layer (R: the column's, Q and W: the row's).

Compression summary (our names; the paper gives no closed formula): for pretrained layer i, ``best`` =
argmax_j R[i, j] (the fine-tuned layer that holds its invariance best; ties go to the shallowest) and
``shallowest_above_tau`` = the smallest j with R[i, j] >= tau (None if no layer reaches tau). ``shift = i - best``
> 0 means the invariance moved to a shallower layer.

Estimators: by default ("cached") X' is generated once per (model, source layer) and reused for every evaluated
layer and matrix: with L layers and m fine-tuned models, ``L * (1 + m)`` inversions instead of
``L^2 * (1 + 3m)``; with the same seed the values are identical to a cell-by-cell computation.
``fresh_noise_per_cell=True`` draws new starting noise for every cell (the authors' protocol) and pays the full
cost.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_write
from .cka import cka_from_grams
from .features import Normalization, TokenMode, _view, layer_names, resolve_normalization, unwrap_model
from .stir import (
    InversionCache,
    InversionResult,
    _check_images,
    _progress,
    invert,
    noise_images,
    representation_grams,
)

__all__ = [
    "MIN_IMAGES",
    "InvarianceReport",
    "check_file_stems",
    "check_settings",
    "compare",
    "identical_models",
    "planned_inversions",
    "strict_json",
]

_PLOT_HINT = "plotting the invariance report needs matplotlib: pip install peft-ssf[plot] (or pip install matplotlib)"
NOISE_BASELINE_DEFINITION = (
    "CKA(M_l(X), M_l(N)) per model M and layer l; N = the inversion's starting noise (standard normal, one seed per "
    "image) clamped to [0, 1]: the STIR value of an X' that carries no information about X"
)
NULL_MEANING = (
    "null marks a value that is not defined (NaN in the computation), e.g. the CKA of a representation that is "
    "constant over the images; report.json is strict JSON and holds no NaN or Infinity tokens"
)
MIN_IMAGES = 4  # centred Grams of n images have rank n - 1: n = 2 makes every CKA 1; the unbiased HSIC needs n > 3
_ESTIMATORS = {
    False: "cached: one X' per (model, source layer), reused for every evaluated layer",
    True: "fresh noise per cell: a new inversion, from new starting noise, for every STIR cell",
}


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _matrix_to_list(m: torch.Tensor) -> list[list[float | None]]:
    return [[_nan_to_none(float(v)) for v in row] for row in m]


def _num(value: float | None, width: int = 0) -> str:
    """A number for the text summary, "nan" for a missing or NaN value."""
    text = "nan" if value is None or math.isnan(value) else f"{value:.3f}"
    return f"{text:>{width}}"


@dataclass
class InvarianceReport:
    """Everything :func:`compare` measured. Matrices are float64 [L, L] tensors indexed like ``layers``.

    ``noise_baseline[model]`` holds one noise floor per layer (see the module docstring); it is empty for reports
    built by hand without one.
    """

    layers: list[str]
    pretrained: str
    finetuned: list[str]
    R: dict[str, torch.Tensor]
    Q: dict[str, torch.Tensor]
    C: dict[str, torch.Tensor]
    W: dict[str, torch.Tensor]
    similarity: torch.Tensor  # [L, M, M] over models = [pretrained] + finetuned
    tau: float
    reference: str
    inversions_performed: int
    inversions_without_cache: int
    inversion_loss: dict[str, dict[str, dict[str, float]]]  # model -> source layer -> {mean, max, start_mean}
    settings: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    noise_baseline: dict[str, list[float]] = field(default_factory=dict)  # model -> one floor per layer

    @property
    def models(self) -> list[str]:
        """All model names, pretrained first (the order of ``similarity``'s model axes)."""
        return [self.pretrained, *self.finetuned]

    def retention(self) -> dict[str, list[float]]:
        """Per fine-tuned model, ``R[i, i]`` for every layer i (1 - retention = forgotten invariance)."""
        return {name: [float(v) for v in torch.diagonal(r)] for name, r in self.R.items()}

    def compression(self) -> dict[str, list[dict[str, Any]]]:
        """Per fine-tuned model and pretrained layer i: where its invariance is held best in the fine-tuned model.

        A row of R with no finite value gives ``best_layer``, ``best_value`` and ``shift`` = None.
        """
        out: dict[str, list[dict[str, Any]]] = {}
        for name, r in self.R.items():
            rows = []
            for i, layer in enumerate(self.layers):
                finite = bool(torch.isfinite(r[i]).any())
                best = int(torch.argmax(torch.nan_to_num(r[i], nan=-math.inf))) if finite else None
                above = [j for j in range(len(self.layers)) if float(r[i, j]) >= self.tau]
                first = above[0] if above else None
                rows.append(
                    {
                        "pretrained_layer": layer,
                        "retention": _nan_to_none(float(r[i, i])),
                        "best_layer": None if best is None else self.layers[best],
                        "best_value": None if best is None else _nan_to_none(float(r[i, best])),
                        "shift": None if best is None else i - best,
                        "shallowest_above_tau": None if first is None else self.layers[first],
                        "shallowest_above_tau_value": None if first is None else float(r[i, first]),
                    }
                )
            out[name] = rows
        return out

    def closeness(self, reference: str | None = None) -> dict[str, list[float]]:
        """Per model, CKA with ``reference`` (default ``self.reference``) at every layer on the clean images."""
        ref = self.reference if reference is None else reference
        b = self.models.index(ref)
        return {name: [float(v) for v in self.similarity[:, a, b]] for a, name in enumerate(self.models)}

    def floor(self, kind: str, name: str) -> tuple[list[float] | None, str]:
        """Noise floor of matrix ``kind`` ("R", "Q", "W") of model ``name`` and the axis of its evaluated layer.

        R is evaluated in the fine-tuned model along its columns ("row": draw the floor as an extra row), Q in the
        pretrained model along its rows, W in the model itself along its rows ("col"). C has no floor (None).
        """
        evaluated = {"R": (name, "row"), "Q": (self.pretrained, "col"), "W": (name, "col")}.get(kind)
        if evaluated is None or evaluated[0] not in self.noise_baseline:
            return None, "row"
        return self.noise_baseline[evaluated[0]], evaluated[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (NaN becomes None, written as null; see ``NULL_MEANING``)."""
        return {
            "layers": self.layers,
            "pretrained": self.pretrained,
            "finetuned": self.finetuned,
            "tau": self.tau,
            "reference": self.reference,
            "R": {k: _matrix_to_list(v) for k, v in self.R.items()},
            "Q": {k: _matrix_to_list(v) for k, v in self.Q.items()},
            "C": {k: _matrix_to_list(v) for k, v in self.C.items()},
            "W": {k: _matrix_to_list(v) for k, v in self.W.items()},
            "similarity": {
                "models": self.models,
                "per_layer": {layer: _matrix_to_list(self.similarity[k]) for k, layer in enumerate(self.layers)},
            },
            "retention": self.retention(),
            "compression": self.compression(),
            "closeness": {"reference": self.reference, "cka": self.closeness()},
            "noise_baseline": {k: [_nan_to_none(float(v)) for v in vs] for k, vs in self.noise_baseline.items()},
            "inversions": {
                "performed": self.inversions_performed,
                "without_cache": self.inversions_without_cache,
                "rel_loss": self.inversion_loss,
            },
            "settings": self.settings,
            "elapsed_s": self.elapsed_s,
            "null": NULL_MEANING,
        }

    def summary(self) -> str:
        """Short text table per fine-tuned model and layer: retention, its noise floor, the pretrained layer's
        best-holding fine-tuned layer, and CKA to the reference. Missing or NaN values print as "nan"."""
        lines = [
            (
                f"invariance report: {self.pretrained} vs {', '.join(self.finetuned)} "
                f"({self.inversions_performed} inversions; {self.inversions_without_cache} without the cache)"
            )
        ]
        retention, compression, close = self.retention(), self.compression(), self.closeness()
        for name in self.finetuned:
            floor = self.noise_baseline.get(name, [math.nan] * len(self.layers))
            lines.append(f"[{name}] layer: retention R[i,i] (noise floor) | best j (R) | CKA to {self.reference}")
            for i, layer in enumerate(self.layers):
                c = compression[name][i]
                best = c["best_layer"] if c["best_layer"] is not None else "-"
                lines.append(
                    f"  {layer:>8}: {_num(retention[name][i])} ({_num(floor[i])}) | {best:>8} "
                    f"({_num(c['best_value'])}) | {_num(close[name][i])}"
                )
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike, plots: bool | None = None) -> list[Path]:
        """Write report.json, one CSV per matrix / summary and (if matplotlib is there) PNG heatmaps to ``out_dir``.

        Every file is written to a temporary file in ``out_dir`` first and then moved into place with
        ``os.replace``, so a reader never sees a half-written file. ``plots=None`` plots when matplotlib is
        installed, ``True`` requires it (ImportError naming ``pip install peft-ssf[plot]``), ``False`` skips plots.
        Model names whose file stems collide (``ssf/x`` and ``ssf_x``) are refused before anything is written.
        After the new files are in place, the files of a previous report in ``out_dir`` that the new one does not
        write (its ``report.json`` lists them under ``files``) are removed, so nothing stale stays beside the new
        report; other files are left alone. Returns the written paths (one per file, no duplicates).
        """
        check_file_stems(self.models)
        if plots is None:
            plots = _has_matplotlib()
        if plots:
            _require_matplotlib()
        out = Path(out_dir)
        names = [*self._text_names(), *(self._plot_names() if plots else [])]
        previous = _previous_report_files(out)
        out.mkdir(parents=True, exist_ok=True)
        written = [atomic_write(out / name, text) for name, text in self._text_files(names).items()]
        if plots:
            written.extend(self._plot(out))
        for name in sorted(previous - set(names)):
            stale = out / name
            if stale.is_file() and not stale.is_symlink():
                stale.unlink()
        return written

    def _matrix_files(self) -> list[tuple[str, str, dict[str, torch.Tensor], str]]:
        """(kind, model name, matrices, CSV corner label) per matrix file."""
        kinds = (
            ("R", self.R, "pretrained_source\\finetuned_eval"),
            ("Q", self.Q, "pretrained_eval\\finetuned_source"),
            ("C", self.C, "pretrained\\finetuned"),
            ("W", self.W, "eval\\source"),
        )
        return [(kind, name, mats, corner) for kind, mats, corner in kinds for name in mats]

    def _text_names(self) -> list[str]:
        names = ["report.json", *(f"{kind}_{_safe(name)}.csv" for kind, name, _, _ in self._matrix_files())]
        names += ["retention.csv", f"compression_tau{self.tau:g}.csv", "closeness.csv"]
        names += ["noise_baseline.csv"] if self.noise_baseline else []
        return [*names, "similarity.csv", "inversions.csv"]

    def _plot_names(self) -> list[str]:
        names = [f"{kind}_{_safe(name)}.png" for kind, name, _, _ in self._matrix_files()]
        return [*names, *(["retention.png"] if self.finetuned else []), "closeness.png"]

    def _text_files(self, names: Sequence[str] = ()) -> dict[str, str]:
        """File name -> content of report.json (listing ``names``, every file of the report) and every CSV."""
        data = {**self.to_dict(), "files": list(names)}
        files = {"report.json": json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n"}
        for kind, name, mats, corner in self._matrix_files():
            files[f"{kind}_{_safe(name)}.csv"] = _matrix_csv(mats[name], self.layers, corner)
        files["retention.csv"] = _per_layer_csv("layer", self.layers, self.retention(), self.finetuned)
        comp = self.compression()
        comp_header = ["model", *comp[self.finetuned[0]][0].keys()] if self.finetuned else ["model"]
        comp_rows = [[name, *(_fmt(v) for v in row.values())] for name, rows in comp.items() for row in rows]
        files[f"compression_tau{self.tau:g}.csv"] = _table_csv(comp_header, comp_rows)
        files["closeness.csv"] = _per_layer_csv(
            f"layer (CKA to {self.reference})", self.layers, self.closeness(), self.models
        )
        if self.noise_baseline:
            files["noise_baseline.csv"] = _per_layer_csv(
                "layer (noise floor)", self.layers, self.noise_baseline, list(self.noise_baseline)
            )
        sim_rows = [
            [layer, ma, mb, _fmt(float(self.similarity[k, a, b]))]
            for k, layer in enumerate(self.layers)
            for a, ma in enumerate(self.models)
            for b, mb in enumerate(self.models)
            if a < b
        ]
        files["similarity.csv"] = _table_csv(["layer", "model_a", "model_b", "cka"], sim_rows)
        inv_rows = [
            [model, layer, _fmt(v["mean"]), _fmt(v["max"]), _fmt(v["start_mean"])]
            for model, per_layer in self.inversion_loss.items()
            for layer, v in per_layer.items()
        ]
        header = ["model", "source_layer", "rel_loss_mean", "rel_loss_max", "start_rel_loss_mean"]
        files["inversions.csv"] = _table_csv(header, inv_rows)
        return files

    def figure(self, kind: str, name: str) -> Any:
        """The heatmap of matrix ``kind`` ("R", "Q", "C", "W") of model ``name``, with its noise floor drawn."""
        from .plots import heatmap

        p = self.pretrained
        ylabel, xlabel, title = {
            "R": ("pretrained layer i (X' source)", f"{name} layer j (evaluated)", f"R = STIR({name}_j | {p}_i)"),
            "Q": ("pretrained layer i (evaluated)", f"{name} layer j (X' source)", f"Q = STIR({p}_i | {name}_j)"),
            "C": ("pretrained layer i", f"{name} layer j", f"C = CKA({p}_i, {name}_j)"),
            "W": (f"{name} layer i (evaluated)", f"{name} layer j (X' source)", f"W = STIR({name}_i | {name}_j)"),
        }[kind]
        matrix = {"R": self.R, "Q": self.Q, "C": self.C, "W": self.W}[kind][name]
        floor, axis = self.floor(kind, name)
        return heatmap(matrix, self.layers, title, ylabel, xlabel, floor=floor, floor_axis=axis)

    def closeness_figure(self) -> Any:
        """Per-layer CKA of every model to the reference on clean images (the reference itself, 1.0, is left out)."""
        from .plots import lines

        others = {name: v for name, v in self.closeness().items() if name != self.reference}
        return lines(self.layers, others, f"CKA to {self.reference} per layer (clean images)", "linear CKA")

    def _plot(self, out: Path) -> list[Path]:
        from .plots import lines

        written = []
        for kind, name, _, _ in self._matrix_files():
            written.append(_save_figure(self.figure(kind, name), out / f"{kind}_{_safe(name)}.png"))
        if self.finetuned:
            floors = {f: self.noise_baseline[f] for f in self.finetuned if f in self.noise_baseline}
            title = "retention of pretrained invariance: R[i, i] (dashed: noise floor)"
            fig = lines(self.layers, self.retention(), title, "retention", floors=floors)
            written.append(_save_figure(fig, out / "retention.png"))
        written.append(_save_figure(self.closeness_figure(), out / "closeness.png"))
        return written


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return "" if value is None else value


def _safe(name: str) -> str:
    """The file stem of a model name in the report's file names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def check_file_stems(names: Sequence[str]) -> None:
    """Refuse model names that would share report files (same stem after sanitising, ignoring case).

    Raises:
        ValueError: naming the colliding names and their common stem.
    """
    seen: dict[str, str] = {}
    for name in names:
        stem = _safe(name).casefold()
        if stem in seen:
            raise ValueError(
                f"model names {seen[stem]!r} and {name!r} would write the same report files ({_safe(name)}.csv, "
                "ignoring case); give them names that differ in letters, digits, '_', '.' or '-'"
            )
        seen[stem] = name


_REPORT_FILE = re.compile(
    r"^(report\.json|[RQCW]_[A-Za-z0-9_.-]+\.(csv|png)|(retention|closeness)\.(csv|png)|compression_tau[^/]*\.csv"
    r"|noise_baseline\.csv|similarity\.csv|inversions\.csv)$"
)


def _previous_report_files(out: Path) -> set[str]:
    """Names of the files a previous report in ``out`` wrote: its report.json's ``files`` list, or (for a report
    written before that list existed) the files whose names only a report writes."""
    try:
        listed = json.loads((out / "report.json").read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    if isinstance(listed, list) and all(isinstance(v, str) for v in listed):
        names = set(listed)
    else:
        names = {p.name for p in out.iterdir() if p.is_file()}
    return {name for name in names if _REPORT_FILE.match(name) and name == Path(name).name}


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, so that it is valid strict JSON (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _table_csv(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _matrix_csv(m: torch.Tensor, layers: Sequence[str], corner: str) -> str:
    return _table_csv([corner, *layers], [[layer, *(_fmt(float(v)) for v in m[i])] for i, layer in enumerate(layers)])


def _per_layer_csv(corner: str, layers: Sequence[str], series: Mapping[str, Sequence[float]], names: list[str]) -> str:
    rows = [[layer, *(_fmt(float(series[m][i])) for m in names)] for i, layer in enumerate(layers)]
    return _table_csv([corner, *names], rows)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(_PLOT_HINT) from exc


def _save_figure(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))


# --------------------------------------------------------------------------------------------------------------------
# compare()
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cell:
    matrix: str  # "R" | "Q" | "W"
    key: str  # fine-tuned model (R, Q) or model (W) the matrix belongs to
    row: int
    col: int
    source: tuple[str, int]  # (model name, layer index) X' is inverted from
    target: tuple[str, int]  # (model name, layer index) evaluated


def _cells(pretrained: str, finetuned: Sequence[str], n_layers: int, reverse: bool, within: bool) -> list[_Cell]:
    cells = []
    grid = [(i, j) for i in range(n_layers) for j in range(n_layers)]
    for f in finetuned:
        cells += [_Cell("R", f, i, j, (pretrained, i), (f, j)) for i, j in grid]
        if reverse:
            cells += [_Cell("Q", f, i, j, (f, j), (pretrained, i)) for i, j in grid]
    if within:
        for m in [pretrained, *finetuned]:
            cells += [_Cell("W", m, i, j, (m, j), (m, i)) for i, j in grid]
    return cells


def check_settings(
    *, n_images: int | None = None, steps: Any = None, step_size: Any = None, batch_size: Any = None, tau: Any = None
) -> None:
    """Refuse settings that would give a meaningless report (checked before any work; None = not given).

    Raises:
        ValueError: naming the setting, the value and what is allowed.
    """
    if n_images is not None and n_images < MIN_IMAGES:
        raise ValueError(
            f"the analysis needs at least {MIN_IMAGES} images, got {n_images}: the centred Gram of n images has "
            "rank n - 1 (with 2 images every CKA is 1) and the unbiased HSIC needs n > 3"
        )
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if step_size is not None and not (
        isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0
    ):
        raise ValueError(f"step_size must be a finite number > 0 (the L2 length of a pixel step), got {step_size!r}")
    if tau is not None and not (isinstance(tau, (int, float)) and 0.0 <= tau <= 1.0):
        raise ValueError(f"tau must be a CKA threshold in [0, 1], got {tau!r}")


def _cell_seed(seed: int, cell: _Cell) -> int:
    text = f"{seed}/{cell.matrix}/{cell.key}/{cell.row}/{cell.col}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:7], "big")


@dataclass
class _Run:
    """What every step of :func:`compare` shares: the models, layers, images and the settings of one run."""

    models: dict[str, nn.Module]  # pretrained first
    layers: list[str]
    images: torch.Tensor
    seed: int
    grams: dict[str, Any]  # representation_grams settings: tokens, normalization, batch_size, unbiased, ...
    inversion: dict[str, Any]  # invert settings other than the seed: steps, step_size, batch_size, ...
    progress: bool
    clean: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # model -> layer -> centred Gram

    def evaluate(self, model: str, inputs: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Centred Grams of ``model`` on ``inputs`` at ``layers``."""
        return representation_grams(self.models[model], inputs, list(layers), **self.grams)

    def cka(self, model: str, layer: str, gram: torch.Tensor) -> float:
        """CKA between ``model``'s clean-image Gram at ``layer`` and ``gram`` (both centred)."""
        return cka_from_grams(self.clean[model][layer], gram, centered=True)


def _named_models(
    pretrained: nn.Module, finetuned: nn.Module | Mapping[str, nn.Module], pretrained_name: str
) -> dict[str, nn.Module]:
    """``{name: model}`` with the pretrained model first; checks the names."""
    models: dict[str, nn.Module] = {pretrained_name: pretrained}
    if isinstance(finetuned, nn.Module):
        finetuned = {"finetuned": finetuned}
    for name, model in finetuned.items():
        if name in models:
            raise ValueError(f"model name {name!r} is used twice")
        models[name] = model
    if len(models) < 2:
        raise ValueError("give at least one fine-tuned model")
    return models


# Config entries that only concern the classification head or bookkeeping, not the analysed backbone's function.
_HEAD_KEYS = frozenset(
    {"id2label", "label2id", "num_labels", "_name_or_path", "architectures", "problem_type", "finetuning_task",
     "transformers_version", "dtype", "torch_dtype"}
)  # fmt: skip


def _analysed_part(model: nn.Module) -> tuple[Any, ...]:
    """What decides a model's representations at every analysed layer: module types, config, weights, buffers."""
    view = _view(model)
    config = getattr(view.model, "config", None)
    config = {k: v for k, v in config.to_dict().items() if k not in _HEAD_KEYS} if config is not None else None
    return [type(m) for m in view.backbone.modules()], config, view.backbone.state_dict()


def _same_function(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if a[0] != b[0] or a[1] != b[1] or a[2].keys() != b[2].keys():
        return False
    pairs = ((a[2][k], b[2][k]) for k in a[2])
    return all(
        x.dtype == y.dtype and x.shape == y.shape and x.device == y.device and torch.equal(x, y) for x, y in pairs
    )


def identical_models(models: Mapping[str, nn.Module]) -> dict[str, str]:
    """``name -> name`` of the first model (in order) whose analysed part computes exactly what this one computes.

    Two models are identical here when their backbones (the part every analysed layer reads; the classification
    head is never used) have the same module types, the same config apart from label entries and equal weights and
    buffers, e.g. a head-only fine-tune and its pretrained model. Their inversions are equal to the last bit, so
    :func:`compare` runs them once. PEFT-wrapped models are never merged with another (adapter state such as
    disabled adapters lives outside the weights); the ``peft-ssf analyze`` command merges adapters on load.
    """
    parts = {name: None if unwrap_model(m) is not m else _analysed_part(m) for name, m in models.items()}
    alias: dict[str, str] = {}
    for name, part in parts.items():
        same = (other for other in alias if alias[other] == other and part is not None and parts[other] is not None)
        alias[name] = next((other for other in same if _same_function(parts[other], part)), name)
    return alias


def planned_inversions(
    models: Mapping[str, nn.Module], n_layers: int, *, reverse: bool, within: bool, fresh_noise_per_cell: bool
) -> list[tuple[str, int]]:
    """The (model name, source layer index) of every inversion :func:`compare` will run, in order.

    Cached: one per distinct source (identical models share theirs, see :func:`identical_models`); fresh noise per
    cell: one per STIR cell. Used to say what a run costs before it starts.
    """
    names = list(models)
    cells = _cells(names[0], names[1:], n_layers, reverse, within)
    if fresh_noise_per_cell:
        return [c.source for c in cells]
    alias = identical_models(models)
    return list(dict.fromkeys((alias[name], layer) for name, layer in (c.source for c in cells)))


def _similarity(run: _Run) -> torch.Tensor:
    """[L, M, M] CKA between every pair of models at every layer, on the clean images."""
    names = list(run.models)
    out = torch.empty(len(run.layers), len(names), len(names), dtype=torch.float64)
    for k, layer in enumerate(run.layers):
        for a, ma in enumerate(names):
            for b in range(a, len(names)):
                out[k, a, b] = out[k, b, a] = run.cka(ma, layer, run.clean[names[b]][layer])
    return out


def _cross_cka(run: _Run, pretrained: str, finetuned: str) -> torch.Tensor:
    """C = CKA(P_i(X), F_j(X)) for every pair of layers."""
    rows = [[run.cka(pretrained, li, run.clean[finetuned][lj]) for lj in run.layers] for li in run.layers]
    return torch.tensor(rows, dtype=torch.float64)


def _noise_floors(run: _Run) -> dict[str, list[float]]:
    """Per model and layer, CKA(M_l(X), M_l(N)) with N = :func:`~peft_ssf_analysis.stir.noise_images`."""
    noise = noise_images(run.images.shape[1:], run.images.shape[0], run.seed)
    floors = {}
    for name in run.models:
        grams = run.evaluate(name, noise, run.layers)
        floors[name] = [run.cka(name, layer, grams[layer]) for layer in run.layers]
    return floors


def _empty_matrices(cells: Sequence[_Cell], n_layers: int) -> dict[tuple[str, str], torch.Tensor]:
    mats: dict[tuple[str, str], torch.Tensor] = {}
    for cell in cells:
        mats.setdefault((cell.matrix, cell.key), torch.full((n_layers, n_layers), math.nan, dtype=torch.float64))
    return mats


_Losses = dict[tuple[str, int], list[InversionResult]]


def _stir_cached(run: _Run, cells: Sequence[_Cell]) -> tuple[dict[tuple[str, str], torch.Tensor], _Losses, int]:
    """Every STIR cell from one X' per (model, source layer), evaluated at every layer in one pass per model."""
    mats = _empty_matrices(cells, len(run.layers))
    losses: _Losses = defaultdict(list)
    by_source: dict[tuple[str, int], list[_Cell]] = defaultdict(list)
    for cell in cells:
        by_source[cell.source].append(cell)
    cache = InversionCache()
    alias = identical_models(run.models)  # identical models share one inversion per source layer
    bar = _progress(len({(alias[m], layer) for m, layer in by_source}), "inversions", run.progress, leave=True)
    for (src_name, src_layer), group in by_source.items():
        before = cache.performed
        result = cache.invert(
            run.models[alias[src_name]], run.layers[src_layer], run.images, seed=run.seed, progress=run.progress,
            **run.inversion,
        )  # fmt: skip
        losses[(src_name, src_layer)].append(result)
        for eval_name in dict.fromkeys(c.target[0] for c in group):
            grams = run.evaluate(eval_name, result.inputs, run.layers)
            for cell in (c for c in group if c.target[0] == eval_name):
                layer = run.layers[cell.target[1]]
                mats[(cell.matrix, cell.key)][cell.row, cell.col] = run.cka(eval_name, layer, grams[layer])
        bar.update(cache.performed - before)
    bar.close()
    return mats, losses, cache.performed


def _stir_fresh(run: _Run, cells: Sequence[_Cell]) -> tuple[dict[tuple[str, str], torch.Tensor], _Losses, int]:
    """Every STIR cell from its own inversion, started from noise seeded by the cell (the authors' protocol)."""
    mats = _empty_matrices(cells, len(run.layers))
    losses: _Losses = defaultdict(list)
    bar = _progress(len(cells), "inversions (fresh noise per cell)", run.progress, leave=True)
    for cell in cells:
        (src_name, src_layer), (eval_name, eval_layer) = cell.source, cell.target
        result = invert(
            run.models[src_name],
            run.layers[src_layer],
            run.images,
            seed=_cell_seed(run.seed, cell),
            progress=False,
            **run.inversion,
        )
        losses[cell.source].append(result)
        layer = run.layers[eval_layer]
        gram = run.evaluate(eval_name, result.inputs, [layer])[layer]
        mats[(cell.matrix, cell.key)][cell.row, cell.col] = run.cka(eval_name, layer, gram)
        bar.update(1)
    bar.close()
    return mats, losses, len(cells)


def _inversion_summary(losses: _Losses, layers: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """model -> source layer -> mean / max best relative loss and mean start loss, over all its inversions."""
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (src_name, src_layer), results in losses.items():
        best = torch.cat([r.rel_loss for r in results])
        start = torch.cat([r.start_rel_loss for r in results])
        out[src_name][layers[src_layer]] = {
            "mean": float(best.mean()),
            "max": float(best.max()),
            "start_mean": float(start.mean()),
        }
    return dict(out)


def _settings(run: _Run, norm: Normalization, **flags: Any) -> dict[str, Any]:
    """The report's record of how it was computed."""
    return {
        "n_images": int(run.images.shape[0]),
        "image_shape": list(run.images.shape[1:]),
        "tokens": run.grams["tokens"],
        "steps": run.inversion["steps"],
        "step_size": run.inversion["step_size"],
        "seed": run.seed,
        "batch_size": run.inversion["batch_size"],
        "unbiased": run.grams["unbiased"],
        **flags,
        "estimator": _ESTIMATORS[bool(flags["fresh_noise_per_cell"])],
        "noise_baseline": NOISE_BASELINE_DEFINITION,
        "normalization": norm.to_dict(),
    }


def compare(
    pretrained: nn.Module,
    finetuned: nn.Module | Mapping[str, nn.Module],
    images: torch.Tensor,
    *,
    layers: Sequence[str] | None = None,
    tokens: TokenMode = "flatten",
    steps: int = 500,
    step_size: float = 0.5,
    seed: int = 0,
    batch_size: int = 32,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    processor: Any = None,
    tau: float = 0.8,
    unbiased: bool = False,
    reverse: bool = True,
    within: bool = True,
    reference: str | None = None,
    pretrained_name: str = "pretrained",
    fresh_noise_per_cell: bool = False,
    max_feature_bytes: int = 2**31,
    progress: bool = True,
) -> InvarianceReport:
    """Measure how much of the pretrained model's invariance each fine-tuned model keeps, layer by layer.

    Args:
        pretrained: the pretrained model P.
        finetuned: one fine-tuned model (named ``"finetuned"``) or ``{name: model}`` for several (e.g. full
            fine-tuning, SSF, LoRA); same architecture as P. PEFT models may be merged or not.
        images: [n, C, H, W] raw pixels in [0, 1] (the paper: first 500 evaluation images, 224 px).
        layers: layer names (default: every block and ``"final"``, see :mod:`~peft_ssf_analysis.features`).
        tokens: ``"flatten"`` (default) | ``"cls"`` | ``"mean"`` for block outputs.
        steps, step_size, seed, batch_size: inversion settings (see :func:`~peft_ssf_analysis.stir.invert`).
        mean, std, processor: input normalisation, resolved once from P (see ``resolve_normalization``) and
            applied to every model.
        tau: threshold of the ``shallowest_above_tau`` compression summary.
        unbiased: use the unbiased HSIC estimator in every CKA.
        reverse: compute Q (needs inversions of the fine-tuned models).
        within: compute W for every model (free once P's and the fine-tuned models' inversions exist).
        reference: model the per-layer closeness is measured against (default: the first fine-tuned model).
        pretrained_name: name of P in the report.
        fresh_noise_per_cell: draw new starting noise for every STIR cell instead of reusing one X' per
            (model, source layer): the authors' protocol, at ``L^2 (1 + 3m)`` instead of ``L (1 + m)`` inversions.
        max_feature_bytes: memory budget for the features of all n images held at once while building Grams.
        progress: tqdm progress bars.

    Every model's per-layer noise floor, CKA(M_l(X), M_l(noise)), is measured too (one forward pass per model) and
    stored in ``report.noise_baseline``.
    """
    started = time.perf_counter()
    _check_images(images)
    check_settings(n_images=images.shape[0], steps=steps, step_size=step_size, batch_size=batch_size, tau=tau)
    models = _named_models(pretrained, finetuned, pretrained_name)
    ft_names = list(models)[1:]
    layers = list(layers) if layers is not None else layer_names(pretrained)
    if not layers:
        raise ValueError("no layers to analyse")
    reference = ft_names[0] if reference is None else reference
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of {list(models)}")
    norm = resolve_normalization(pretrained, mean, std, processor)
    run = _Run(
        models=models,
        layers=layers,
        images=images,
        seed=seed,
        grams={"tokens": tokens, "normalization": norm, "batch_size": batch_size, "unbiased": unbiased,
               "max_feature_bytes": max_feature_bytes},
        inversion={"steps": steps, "step_size": step_size, "batch_size": batch_size, "tokens": tokens,
                   "normalization": norm},
        progress=progress,
    )  # fmt: skip
    run.clean = {name: run.evaluate(name, images, layers) for name in models}
    floors = _noise_floors(run)
    cells = _cells(pretrained_name, ft_names, len(layers), reverse, within)
    mats, losses, performed = (_stir_fresh if fresh_noise_per_cell else _stir_cached)(run, cells)
    flags = {"reverse": reverse, "within": within, "fresh_noise_per_cell": fresh_noise_per_cell}
    if not fresh_noise_per_cell:
        flags["shared_inversions"] = {k: v for k, v in identical_models(models).items() if k != v}
    return InvarianceReport(
        layers=layers,
        pretrained=pretrained_name,
        finetuned=ft_names,
        R={f: mats[("R", f)] for f in ft_names},
        Q={f: mats[("Q", f)] for f in ft_names} if reverse else {},
        C={f: _cross_cka(run, pretrained_name, f) for f in ft_names},
        W={m: mats[("W", m)] for m in models} if within else {},
        similarity=_similarity(run),
        tau=tau,
        reference=reference,
        inversions_performed=performed,
        inversions_without_cache=len(cells),
        inversion_loss=_inversion_summary(losses, layers),
        settings=_settings(run, norm, **flags),
        elapsed_s=time.perf_counter() - started,
        noise_baseline=floors,
    )
