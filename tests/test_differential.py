"""Property-based differential test: on generated models the default SSF op equals ``fused=False`` (outputs, every
trainable parameter's gradient over two steps, merged outputs, save / reload) or stops with an error naming SSF.
The models and tolerances are described in ``tests/differential.py``; ``scripts/differential_search.py`` runs a
long search with the same generator."""

from __future__ import annotations

import warnings

import pytest
from differential import check, draw_spec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

#: examples per CI run: bounded so that the test stays within seconds on 2 cores; derandomized so CI is repeatable.
#: No shrinking (it costs minutes): a failure prints its whole spec, a repro for ``differential.check``.
CI_EXAMPLES = 60


@st.composite
def specs(draw):
    return draw_spec(lambda name, options: draw(st.sampled_from(options), label=name))


@settings(max_examples=CI_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
          phases=(Phase.explicit, Phase.reuse, Phase.generate), database=None)
@given(spec=specs())
def test_fused_equals_naive_or_refuses_clearly(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check(spec) in ("passed", "refused")


@pytest.mark.parametrize(
    "case",
    [
        {"kind": "residual", "sites": ["conv1d_hf"], "site_inplace": True},  # the y.mul_(2) row
        {"kind": "two_adds", "sites": ["linear", "ln"], "stream_inplace": True},
        {"kind": "nested", "sites": ["ln", "linear"], "layer_scale": "trainable"},
        # found by the long search: an in-place change under activation checkpointing (was 2x the scale gradient)
        {"kind": "residual", "sites": ["linear_nobias", "ln"], "site_inplace": True, "spec": {"checkpoint": True}},
        # and a trainable channels-first norm bias in a bf16 model (shift gradient 6x further from float64)
        {"kind": "residual", "sites": ["conv", "ln_cf"], "spec": {"domain": "img", "precision": "bf16",
                                                                  "train_norm_bias": True}},
    ],
)
def test_known_shapes(case):
    """Hand-picked graphs from the issue's table and the long search, so they run whatever hypothesis draws."""
    case = dict(case)
    overrides = case.pop("spec", {})
    block = {"act": "none", "site_inplace": False, "stream_inplace": False, "layer_scale": "none", "dropout": 0.0,
             "view": "none", **case}
    spec = {"domain": "seq", "blocks": [block], "tie": False, "target_tied": False, "container_head": True,
            "train_norm_bias": False, "precision": "fp32", "checkpoint": False, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check(spec) in ("passed", "refused")


#: the two graphs the 400-example long search still failed on (half precision): a folded conv's output rounded
#: differently from the naive op's and flipped a ReLU downstream (A), and a bf16 model's folded weights (B)
LONG_SEARCH_SPECS = [
    {"domain": "img", "blocks": [{"kind": "residual", "sites": ["conv_nobias", "gn", "gn"], "act": "relu",
                                  "site_inplace": False, "stream_inplace": True, "layer_scale": "none",
                                  "dropout": 0.0, "view": "permute"}],
     "tie": False, "target_tied": False, "container_head": False, "train_norm_bias": True, "precision": "autocast",
     "checkpoint": False},
    {"domain": "seq", "blocks": [
        {"kind": "plain", "sites": ["linear", "linear_nobias"], "act": "gelu", "site_inplace": False,
         "stream_inplace": False, "layer_scale": "none", "dropout": 0.0, "view": "permute"},
        {"kind": "residual", "sites": ["linear_nobias", "linear_nobias"], "act": "none", "site_inplace": False,
         "stream_inplace": True, "layer_scale": "frozen", "dropout": 0.0, "view": "permute"},
        {"kind": "plain", "sites": ["ln"], "act": "relu_inplace", "site_inplace": False, "stream_inplace": False,
         "layer_scale": "trainable", "dropout": 0.0, "view": "roll"}],
     "tie": False, "target_tied": False, "container_head": True, "train_norm_bias": True, "precision": "bf16",
     "checkpoint": False},
]


@pytest.mark.parametrize("spec", LONG_SEARCH_SPECS, ids=["autocast-conv-relu", "bf16-model-linears"])
def test_long_search_half_precision_shapes(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check(spec) == "passed"
