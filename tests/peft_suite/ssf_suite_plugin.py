"""pytest plugin that runs PEFT's own generic tuner tests (``tests/test_custom_models.py`` of the peft sdist) on SSF.

PEFT lists the cases of each method in module-level lists (``TEST_CASES``, ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``,
``MIXED_ADAPTER_TEST_CASES``) that its ``parametrize`` marks hold by reference. This plugin appends SSF cases to
those lists right after pytest imports the module and before it expands the parametrisations, then deselects every
test that does not involve SSF, so the run is "PEFT's suite, as if SSF were one of its built-in methods".
Loaded by ``tests/peft_suite/run.py`` with ``-p ssf_suite_plugin``.
"""

from __future__ import annotations

import sys
import types

import pytest


def _stub_diffusers() -> None:
    """``testing_common`` imports diffusers for its Stable Diffusion tests only; none of the SSF cases use it."""
    try:
        import diffusers  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or installed but broken
        stub = types.ModuleType("diffusers")

        class StableDiffusionPipeline:  # pragma: no cover - never instantiated in the SSF cases
            pass

        stub.StableDiffusionPipeline = StableDiffusionPipeline
        sys.modules["diffusers"] = stub


_stub_diffusers()

import peft_ssf  # noqa: E402,F401  (registers SSF with PEFT)
from peft_ssf import SSFConfig  # noqa: E402

# Same model ids and layer kinds as PEFT's IA3 / LN-tuning rows: Linear MLP, transformers Conv1D + Embedding,
# Conv1d / Conv2d (incl. grouped and 1x1) / Conv3d, LayerNorm, modules_to_save.
SSF_TEST_CASES = [
    ("Vanilla MLP 1 SSF", "MLP", SSFConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 SSF", "MLP", SSFConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 SSF", "MLP", SSFConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 SSF", "MLP", SSFConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 SSF", "MLP", SSFConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 SSF paper init", "MLP", SSFConfig, {"target_modules": ["lin0", "lin1"], "init_weights": "paper"}),
    ("Vanilla MLP 7 SSF unfused", "MLP", SSFConfig, {"target_modules": ["lin0", "lin1"], "fused": False}),
    ("Embedding + transformers Conv1D 1 SSF", "EmbConv1D", SSFConfig, {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 SSF", "EmbConv1D", SSFConfig, {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 SSF", "EmbConv1D", SSFConfig, {"target_modules": ["emb", "conv1d"]}),
    ("Conv1d 1 SSF", "Conv1d", SSFConfig, {"target_modules": ["conv1d"]}),
    ("Conv1d 2 SSF", "Conv1dGroups", SSFConfig, {"target_modules": ["conv1d"]}),
    ("Conv2d 1 SSF", "Conv2d", SSFConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 SSF", "Conv2d", SSFConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 SSF", "Conv2d1x1", SSFConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 4 SSF", "Conv2dGroups", SSFConfig, {"target_modules": ["conv2d"]}),
    ("Conv3d 1 SSF", "Conv3d", SSFConfig, {"target_modules": ["conv3d"]}),
    ("Conv3d 2 SSF", "Conv3d", SSFConfig, {"target_modules": ["conv3d", "lin0"]}),
    ("LayerNorm 1 SSF", "MLP_LayerNorm", SSFConfig, {"target_modules": "layernorm0"}),
    ("LayerNorm 2 SSF", "MLP_LayerNorm", SSFConfig, {"target_modules": ["layernorm0", "layernorm1"]}),
    ("LayerNorm 3 SSF", "MLP_LayerNorm", SSFConfig, {"target_modules": ["layernorm0", "lin0", "lin1"]}),
]

SSF_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("SSF Same", "ssf", SSFConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "init_weights": False}),
    ("SSF Different", "ssf", SSFConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
]

SSF_MIXED_ADAPTER_TEST_CASES = [
    ("SSF mixed adapter", SSFConfig(target_modules=["lin0"], init_weights=False),
     SSFConfig(target_modules=["lin0", "lin1"], init_weights=False)),
]

_SUITE_MODULE = "test_custom_models"

# (test function, case name) -> why PEFT's test does not apply; the same kind of exemption PEFT grants its own
# methods that are not an identity at initialisation (e.g. DEFT's PaRa in test_disable_adapters).
SKIPS = {
    ("test_disable_adapters", "Vanilla MLP 6 SSF paper init"):
        "init_weights='paper' draws scale ~ N(1, 0.02), shift ~ N(0, 0.02) on purpose: not an identity at init",
    ("test_disable_adapters_with_merging", "Vanilla MLP 6 SSF paper init"):
        "init_weights='paper' draws scale ~ N(1, 0.02), shift ~ N(0, 0.02) on purpose: not an identity at init",
}


def _extend(module: types.ModuleType) -> None:
    if getattr(module, "_ssf_cases_added", False):
        return
    module.TEST_CASES.extend(SSF_TEST_CASES)
    if SSFConfig not in module.ALL_PEFT_CONFIG_CLASSES:
        module.ALL_PEFT_CONFIG_CLASSES.append(SSFConfig)
    module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES.extend(SSF_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)
    module.MIXED_ADAPTER_TEST_CASES.extend(SSF_MIXED_ADAPTER_TEST_CASES)
    module._ssf_cases_added = True


def pytest_collectstart(collector: pytest.Collector) -> None:
    if isinstance(collector, pytest.Module) and collector.path.stem == _SUITE_MODULE:
        _extend(collector.obj)  # .obj imports the module; parametrisations are expanded after this hook


def _involves_ssf(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    for value in callspec.params.values():
        if value is SSFConfig or isinstance(value, SSFConfig):
            return True
        if isinstance(value, str) and ("SSF" in value or value == "ssf"):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        (keep if _involves_ssf(item) else drop).append(item)
        case = getattr(item, "callspec", None) and item.callspec.params.get("test_name")
        reason = SKIPS.get((item.originalname, case))
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
