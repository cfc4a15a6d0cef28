"""Teach PEFT about SSF: a real ``PeftType.SSF`` enum member plus the config / tuner / prefix tables.

PEFT's ``register_peft_method`` only accepts names that already exist in the closed enum ``peft.utils.PeftType``.
``setattr(PeftType, "SSF", "SSF")`` is not enough (it gives a plain ``str`` without ``.value``, which transformers'
``load_adapter`` uses), so we insert a genuine member into the enum's member tables. The insertion and the table
updates run under a lock and are idempotent: importing ``peft_ssf`` twice, from several threads, or beside another
plugin never double-registers or corrupts PEFT's tables.
"""

from __future__ import annotations

import threading

from peft.utils import PeftType

PEFT_TYPE_NAME = "SSF"
METHOD_NAME = "ssf"
PREFIX = "ssf_"

_LOCK = threading.RLock()


class RegistrationError(RuntimeError):
    """Raised when SSF cannot be registered because another method already owns its name or prefix."""


def _add_enum_member(enum_cls: type, name: str, value: str) -> object:
    """Insert ``name = value`` into a (str, Enum) class as a real member and return it.

    Works on CPython 3.10-3.13: members live in ``_member_map_`` (name -> member), ``_value2member_map_``
    (value -> member) and ``_member_names_`` (iteration order), and are reachable as class attributes.
    """
    existing = enum_cls._member_map_.get(name)
    if existing is not None:
        return existing
    if value in enum_cls._value2member_map_:
        other = enum_cls._value2member_map_[value]
        raise RegistrationError(
            f"PeftType already has a member {other.name!r} with value {value!r}; cannot add {name!r}."
        )
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    # Python >= 3.11.? stores a sort order for Flag; harmless for plain enums.
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    # type.__setattr__ bypasses EnumType.__setattr__, which refuses to rebind member names.
    type.__setattr__(enum_cls, name, member)
    return member


def register() -> None:
    """Register SSF with PEFT. Safe to call any number of times, from any thread.

    Raises:
        RegistrationError: another PEFT method already owns the ``"SSF"`` type or the ``"ssf_"`` prefix.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    from .config import SSFConfig
    from .model import SSFModel

    with _LOCK:
        _install_config_type_check()
        member = _add_enum_member(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
        owner_cfg = PEFT_TYPE_TO_CONFIG_MAPPING.get(member)
        owner_tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(member)
        if owner_cfg is SSFConfig and owner_tuner is SSFModel:
            return  # already registered by us: idempotent
        if _same_class(owner_cfg, SSFConfig) and _same_class(owner_tuner, SSFModel):
            # the module was re-imported (e.g. importlib.reload): refresh the tables with the new classes
            PEFT_TYPE_TO_CONFIG_MAPPING[member] = SSFConfig
            PEFT_TYPE_TO_TUNER_MAPPING[member] = SSFModel
            return
        if owner_cfg is not None or owner_tuner is not None:
            other = owner_cfg or owner_tuner
            raise RegistrationError(
                f"PEFT type 'SSF' is already registered by {other.__module__}.{other.__qualname__}. "
                "Uninstall or stop importing the other plugin that registers 'SSF' before importing peft_ssf."
            )
        # PEFT's own prefix check looks at the keys of the prefix mapping, which are peft types: it never fires.
        for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
            if prefix == PREFIX and peft_type != member:
                raise RegistrationError(
                    f"The parameter prefix {PREFIX!r} is already used by PEFT method {peft_type!s}; "
                    "SSF needs it to find its parameters in state dicts."
                )
        register_peft_method(name=METHOD_NAME, config_cls=SSFConfig, model_cls=SSFModel, prefix=PREFIX)


def _install_config_type_check() -> None:
    """Make ``PeftConfig._get_peft_type`` (PEFT's first read of a local ``adapter_config.json``, in
    ``PeftModel.from_pretrained`` / ``load_adapter``) report a malformed file by name instead of with ``KeyError:
    'peft_type'``, ``JSONDecodeError`` or ``RecursionError``. Valid files and Hub ids go through PEFT's code unchanged;
    installed once."""
    import os

    from peft.config import PeftConfigMixin
    from peft.utils import CONFIG_NAME

    from .config import AdapterFileError, read_config_file

    original = PeftConfigMixin.__dict__["_get_peft_type"].__func__
    if getattr(original, "_ssf_checked", False):
        return

    def _get_peft_type(cls, model_id: str, **hf_hub_download_kwargs):
        subfolder = hf_hub_download_kwargs.get("subfolder", None)
        path = os.path.join(model_id, subfolder) if subfolder is not None else model_id
        config_file = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(config_file):
            peft_type = read_config_file(config_file).get("peft_type")
            if not isinstance(peft_type, str):
                found = "has no 'peft_type'" if peft_type is None else f"has peft_type {peft_type!r}"
                raise AdapterFileError(
                    f"{config_file} {found}: PEFT needs the adapter's method there (e.g. \"peft_type\": \"SSF\"). "
                    "Save the adapter again with save_pretrained."
                )
        return original(cls, model_id, **hf_hub_download_kwargs)

    _get_peft_type._ssf_checked = True
    PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)


def _same_class(a: object, b: type) -> bool:
    return isinstance(a, type) and a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


def is_registered() -> bool:
    """True when PEFT resolves ``"SSF"`` to this package's config and tuner."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import SSFConfig

    return PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE_NAME) is SSFConfig
