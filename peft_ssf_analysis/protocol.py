"""Named analysis protocols: every setting a run uses, stated in one place for the CLI help, the docs and the report.

- ``cached`` (the fast default): 64 images at the model's own input size, 100 inversion steps of L2 length 0.5,
  one X' per (model, source layer) reused for every evaluated layer, and the pretrained model's invariances only:
  R (retention, compression), C, the closeness and the noise floors, at ``L`` inversions for L layers whatever the
  number of fine-tuned models. Q (``--reverse``) and W (``--within``) each need the fine-tuned models' own
  inversions too: ``L (1 + m)`` for m fine-tuned models (models whose analysed weights are identical to another's,
  e.g. a head-only fine-tune, share its inversions). Identical values to a cell-by-cell computation with the same
  seed.
- ``faithful``: the authors' protocol (Merlin et al., CoLLAs 2023): the first 500 images of the evaluation split
  (100 when the model's input is 384 px or larger), resized (shorter side) and centre-cropped to the model's input
  size (224 px for the paper's models), 500 steps of 0.5, fresh starting noise for every STIR cell, R, Q and W,
  which costs ``L^2 (1 + 3m)`` inversions (``m L^2`` for R alone).

Any setting given explicitly overrides the protocol's value and is recorded in ``overrides``, so a report never
claims a protocol it did not follow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CACHED", "FAITHFUL", "PROTOCOLS", "Protocol"]


@dataclass(frozen=True)
class Protocol:
    """The settings of one named protocol. ``size=None`` means the model's own ``config.image_size``."""

    name: str
    n: int
    steps: int
    step_size: float
    size: int | None
    fresh_noise_per_cell: bool
    reverse: bool  # compute Q = STIR(P | F)
    within: bool  # compute W = STIR(M | M) for every model
    n_at_384px: int | None  # n used instead when the input size is >= 384 px (None: no change)
    description: str

    def resolve(self, model_size: int | None, **given: Any) -> dict[str, Any]:
        """Concrete settings for a model whose input size is ``model_size``.

        ``given`` values that are not None (n, steps, step_size, size, fresh_noise_per_cell, reverse, within)
        override the protocol
        and are listed in ``overrides``; n follows the final size (``n_at_384px``) unless given.
        """
        values: dict[str, Any] = {
            "n": None,
            "steps": self.steps,
            "step_size": self.step_size,
            "size": model_size if model_size is not None else self.size,
            "fresh_noise_per_cell": self.fresh_noise_per_cell,
            "reverse": self.reverse,
            "within": self.within,
        }
        overrides = {k: v for k, v in given.items() if v is not None and k in values and v != values[k]}
        values.update(overrides)
        size = values["size"]
        protocol_n = self.n_at_384px if self.n_at_384px is not None and size is not None and size >= 384 else self.n
        if "n" not in overrides or overrides["n"] == protocol_n:
            overrides.pop("n", None)
            values["n"] = protocol_n
        return {"protocol": self.name, **values, "overrides": overrides}

    def help(self) -> str:
        """One line for ``--help``: everything the protocol sets."""
        size = "the model's input size" if self.size is None else f"the model's input size ({self.size} px if unknown)"
        n = f"n={self.n}" + (f" ({self.n_at_384px} at >= 384 px)" if self.n_at_384px else "")
        noise = "fresh noise per STIR cell" if self.fresh_noise_per_cell else "one X' per model and source layer"
        matrices = "R, Q and W" if self.reverse and self.within else "R only (add Q: --reverse, W: --within)"
        return f"{n}, {self.steps} steps of {self.step_size:g}, resize + centre-crop to {size}, {noise}, {matrices}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CACHED = Protocol(
    name="cached",
    n=64,
    steps=100,
    step_size=0.5,
    size=None,
    fresh_noise_per_cell=False,
    reverse=False,
    within=False,
    n_at_384px=None,
    description="fast default: one X' per (pretrained model, source layer), reused for every evaluated layer",
)
FAITHFUL = Protocol(
    name="faithful",
    n=500,
    steps=500,
    step_size=0.5,
    size=224,
    fresh_noise_per_cell=True,
    reverse=True,
    within=True,
    n_at_384px=100,
    description="the authors' protocol (Merlin et al. 2023): fresh starting noise for every STIR cell",
)
PROTOCOLS = {p.name: p for p in (CACHED, FAITHFUL)}
