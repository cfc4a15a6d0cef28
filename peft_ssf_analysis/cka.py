"""Linear centred kernel alignment (CKA, Kornblith et al. 2019), computed in float64 via n x n Gram matrices.

Why the Gram form: a flattened ViT token sequence has ~10^5 features per example, while the number of examples n
is a few hundred. ``X X^T`` is n x n whatever the feature count, and it can be accumulated over feature chunks, so
memory stays bounded. Everything here is float64 because CKA of nearly identical representations is a ratio of
nearly equal large numbers.

Definitions (n examples, K = X X^T, L = Y Y^T, H = I - 11^T / n):

- biased:   HSIC(K, L) = <HKH, HLH>_F (the 1 / (n-1)^2 factor cancels in the ratio);
- unbiased: the estimator of Song et al. (2012), computed through U-centring (Szekely & Rizzo 2014) which gives
  the same value up to the factor n (n - 3) that also cancels in the ratio; needs n > 3;
- CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

:class:`MinibatchCKA` is the minibatch estimator of Nguyen et al. (2021): unbiased HSIC summed over minibatches.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MinibatchCKA", "center_gram", "cka_from_grams", "gram_linear", "linear_cka"]

# Largest float64 chunk (in elements) materialised at once while building a Gram matrix: 2**25 * 8 B = 256 MiB.
_CHUNK_ELEMENTS = 2**25


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Return the float64 Gram matrix ``X X^T`` of ``x`` ([n, ...], flattened per example) as an [n, n] CPU tensor.

    The product runs on ``x``'s device (a GPU for features of a model on a GPU) and only the n x n result is moved
    to the CPU: building the Gram is the expensive part (2 n^2 p operations for p features), everything after it
    is O(n^2). It is accumulated over column chunks in float64, so a float64 copy of a huge feature matrix is never
    made and half-precision features lose nothing here. Devices without float64 (Apple MPS) fall back to the CPU.
    """
    if x.dim() < 1:
        raise ValueError("expected a tensor with a leading example dimension, got a scalar")
    n = x.shape[0]
    flat = x.detach().reshape(n, -1)
    if flat.device.type == "mps":
        flat = flat.cpu()
    p = flat.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    gram = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    for start in range(0, p, chunk):
        block = flat[:, start : start + chunk].to(torch.float64)
        gram += block @ block.T
    return gram.cpu()


def center_gram(gram: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """Centre a Gram matrix: ``H K H`` (biased) or U-centring (unbiased; requires n > 3).

    The inner product of two U-centred Grams divided by n (n - 3) is the unbiased HSIC estimator of Song et al.
    """
    gram = gram.to(torch.float64)
    n = gram.shape[0]
    if gram.shape != (n, n):
        raise ValueError(f"expected a square Gram matrix, got shape {tuple(gram.shape)}")
    if not unbiased:
        row = gram.mean(dim=0, keepdim=True)
        col = gram.mean(dim=1, keepdim=True)
        return gram - row - col + gram.mean()
    if n <= 3:
        raise ValueError(f"the unbiased HSIC estimator needs more than 3 examples, got n={n}")
    g = gram.clone()
    g.fill_diagonal_(0.0)
    means = g.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    g = g - means[None, :] - means[:, None]
    g.fill_diagonal_(0.0)
    return g


def cka_from_grams(gx: torch.Tensor, gy: torch.Tensor, *, unbiased: bool = False, centered: bool = False) -> float:
    """Linear CKA from two [n, n] Gram matrices (pass ``centered=True`` if they already went through
    :func:`center_gram` with the same ``unbiased`` flag). Returns NaN when a representation is constant."""
    if gx.shape != gy.shape:
        raise ValueError(f"Gram matrices differ in shape: {tuple(gx.shape)} vs {tuple(gy.shape)}")
    if not centered:
        gx = center_gram(gx, unbiased=unbiased)
        gy = center_gram(gy, unbiased=unbiased)
    hsic_kl = float((gx * gy).sum())
    hsic_kk = float((gx * gx).sum())
    hsic_ll = float((gy * gy).sum())
    denom = hsic_kk * hsic_ll
    if not denom > 0.0:
        return math.nan
    return hsic_kl / math.sqrt(denom)


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, unbiased: bool = False) -> float:
    """Linear CKA between two representations of the same n inputs.

    Args:
        x: [n, ...] features of model/layer A; everything after the first dimension is flattened.
        y: [n, ...] features of model/layer B for the same inputs, in the same order.
        unbiased: use the unbiased HSIC estimator (Song et al. 2012) instead of the biased one (the default, as in
            Kornblith et al. and the invariance papers). The unbiased value can be slightly negative.

    Returns:
        CKA in [0, 1] (biased) as a Python float; 1 means equal up to an orthogonal transform and isotropic scale.
        NaN if either representation is constant across the n inputs.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    return cka_from_grams(gram_linear(x), gram_linear(y), unbiased=unbiased)


class MinibatchCKA:
    """Minibatch linear CKA (Nguyen et al. 2021): unbiased HSIC accumulated over minibatches of paired features.

    Use it when the n inputs do not fit in memory at once. Each minibatch must hold more than 3 examples. The
    estimate converges to the full-data unbiased CKA; it is *not* the same number as :func:`linear_cka` on all n.

    Example::

        acc = MinibatchCKA()
        for xb, yb in batches:
            acc.update(xb, yb)
        value = acc.compute()
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated minibatch."""
        self._xy = 0.0
        self._xx = 0.0
        self._yy = 0.0
        self.num_batches = 0
        self.num_examples = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one minibatch of paired features x: [b, ...], y: [b, ...] (b > 3)."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
        n = x.shape[0]
        gx = center_gram(gram_linear(x), unbiased=True)
        gy = center_gram(gram_linear(y), unbiased=True)
        scale = 1.0 / (n * (n - 3))
        self._xy += float((gx * gy).sum()) * scale
        self._xx += float((gx * gx).sum()) * scale
        self._yy += float((gy * gy).sum()) * scale
        self.num_batches += 1
        self.num_examples += n

    def compute(self) -> float:
        """Current CKA estimate (NaN before any update or for constant features)."""
        denom = self._xx * self._yy
        if self.num_batches == 0 or not denom > 0.0:
            return math.nan
        return self._xy / math.sqrt(denom)
