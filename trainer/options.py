"""The option registry: one place for every setting's default, range, choices and help text.

Each config is a dataclass whose fields are declared with :func:`option`. The metadata carried there
is what the ComfyUI nodes turn into widgets, what the CLI turns into flags, and what
:func:`validate` checks, so an option is described exactly once.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value. ``field`` names the option so UIs can point at it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    tooltip: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    advanced: bool = False
    multiline: bool = False
    # Widgets that should not be exposed on nodes (paths the node fills itself, internal state).
    hidden: bool = False


def option(
    default: Any = dataclasses.MISSING,
    *,
    tooltip: str,
    default_factory: Any = dataclasses.MISSING,
    min: float | None = None,
    max: float | None = None,
    step: float | None = None,
    advanced: bool = False,
    multiline: bool = False,
    hidden: bool = False,
) -> Any:
    """Declare a config field with its help text and limits (see :class:`OptionInfo`)."""
    info = OptionInfo(tooltip, min, max, step, advanced, multiline, hidden)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"option": info})
    return dataclasses.field(default=default, metadata={"option": info})


def option_info(f: dataclasses.Field) -> OptionInfo:
    return f.metadata.get("option") or OptionInfo(tooltip="")


def fields_of(cls_or_obj: Any) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls_or_obj))


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Turn a JSON/CLI/widget value into the annotated type, or raise ConfigError naming the field."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(name, "a value is required (got null)")
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(name, f"{value!r} is not one of {choices}") from None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"expected an object, got {type(value).__name__}")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and item_tp is str:
            value = [line for line in value.splitlines() if line.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {type(value).__name__}")
        items = [_coerce(f"{name}[{i}]", item_tp, v) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(name, f"expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected text, got {type(value).__name__}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys (with a did-you-mean) and bad values."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            prefix.rstrip(".") or cls.__name__, f"expected an object, got {type(data).__name__}"
        )
    hints = _resolved_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; valid options: {', '.join(sorted(names))}"
            )
            raise ConfigError(f"{prefix}{key}", f"unknown option{hint}")
    kwargs = {k: _coerce(f"{prefix}{k}", hints[k], v) for k, v in data.items()}
    obj = cls(**kwargs)
    validate(obj, prefix=prefix)
    return obj


def validate(obj: Any, *, prefix: str = "") -> None:
    """Check every field against its declared range, recursing into nested configs."""
    hints = _resolved_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        info = option_info(f)
        name = f"{prefix}{f.name}"
        tp, _ = _unwrap_optional(hints[f.name])
        if (
            isinstance(tp, type)
            and issubclass(tp, enum.Enum)
            and value is not None
            and not isinstance(value, tp)
        ):
            setattr(obj, f.name, _coerce(name, tp, value))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if info.min is not None and value < info.min:
                raise ConfigError(name, f"{value} is below the minimum {info.min:g}. {info.tooltip}")
            if info.max is not None and value > info.max:
                raise ConfigError(name, f"{value} is above the maximum {info.max:g}. {info.tooltip}")
        if dataclasses.is_dataclass(value):
            validate(value, prefix=f"{name}.")
        if isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    validate(item, prefix=f"{name}[{i}].")
    check = getattr(obj, "check", None)
    if callable(check):
        check()


def to_dict(obj: Any) -> Any:
    """JSON-ready plain data (enums as their values)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2, sort_keys=False)


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` that coerces and validates the changed values."""
    hints = _resolved_hints(type(obj))
    coerced = {k: _coerce(k, hints[k], v) for k, v in changes.items()}
    new = dataclasses.replace(obj, **coerced)
    validate(new)
    return new
