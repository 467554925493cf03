"""Node widgets derived from the trainer's configs, so every option is described exactly once.

:func:`inputs_for` turns the ``option()`` metadata of a config dataclass (tooltip, min, max, step,
advanced, multiline, hidden) and its type annotations into ComfyUI V3 inputs;
:func:`values_to_config` turns the widget values a node receives back into a validated config.
"""

from __future__ import annotations

import dataclasses
import decimal
import enum
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from comfy_api.latest import io

from ..trainer.options import ConfigError, from_dict, option_info, to_dict

T = TypeVar("T")

# The frontend gives an INT input with one of these names a "control after generate" widget set
# to randomize unless the schema names a mode. Our seeds are part of what a run or a dataset draw
# is, so they start fixed: queuing the same graph again must send the same settings.
SEED_NAMES = frozenset({"seed", "noise_seed"})


class WidgetError(ValueError):
    """A widget value the config refused; the message names the node and the widget."""

    def __init__(self, widget: str, message: str):
        super().__init__(message)
        self.widget = widget


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _decimals(value: float) -> int:
    """How many decimals ``value`` needs to be written exactly (0.999 -> 3, 1e-4 -> 4)."""
    if value == 0 or not math.isfinite(value):
        return 0
    exponent = decimal.Decimal(repr(abs(value))).normalize().as_tuple().exponent
    return max(0, -int(exponent))


def float_step(default: float, minimum: float | None) -> float:
    """A widget step fine enough that the frontend's rounding keeps the default exactly.

    ComfyUI's frontend rounds a float widget to its step's precision, so a learning rate of 1e-4
    with the stock step of 0.1 would become 0. One decimal finer than the default allows tuning.
    """
    decimals = max(2, _decimals(default) + 1, _decimals(minimum or 0.0))
    return float(f"1e-{decimals}")


def _field_map(config_cls: type) -> dict[str, dataclasses.Field]:
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"inputs_for needs a config dataclass, got {config_cls!r}")
    return {f.name: f for f in dataclasses.fields(config_cls)}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"option {f.name!r} has no default, so it cannot become a widget")


def _input_for(f: dataclasses.Field, tp: Any, extra: Mapping[str, Any]) -> io.Input:
    info = option_info(f)
    default = _default_of(f)
    tp = _unwrap_optional(tp)
    common: dict[str, Any] = {"tooltip": info.tooltip or None, "advanced": info.advanced or None}
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        kwargs = {**common, "options": [m.value for m in tp], "default": default.value, **extra}
        return io.Combo.Input(f.name, **kwargs)
    if tp is bool:
        return io.Boolean.Input(f.name, **{**common, "default": bool(default), **extra})
    if tp is int:
        kwargs = {
            **common,
            "default": int(default),
            "min": _int_or_none(info.min),
            "max": _int_or_none(info.max),
        }
        kwargs["step"] = _int_or_none(info.step)
        if f.name in SEED_NAMES:
            kwargs["control_after_generate"] = io.ControlAfterGenerate.fixed
        return io.Int.Input(f.name, **{**_pruned(kwargs), **extra})
    if tp is float:
        step = info.step if info.step is not None else float_step(float(default), info.min)
        kwargs = {**common, "default": float(default), "min": info.min, "max": info.max, "step": step}
        return io.Float.Input(f.name, **{**_pruned(kwargs), **extra})
    if tp is str:
        kwargs = {**common, "default": default, "multiline": info.multiline}
        return io.String.Input(f.name, **{**kwargs, **extra})
    if origin in (list, tuple) and typing.get_args(tp)[:1] == (str,):
        # One item per line; trainer.options coerces a multi-line string back into the list.
        kwargs = {**common, "default": "\n".join(default), "multiline": True}
        return io.String.Input(f.name, **{**kwargs, **extra})
    raise TypeError(f"option {f.name!r} has type {tp!r}, which has no widget; give it its own input")


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def _pruned(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def widget_names(config_cls: type) -> list[str]:
    """The fields of ``config_cls`` that become widgets by default (every field not ``hidden``
    whose type has a widget), in declaration order."""
    hints = typing.get_type_hints(config_cls)
    names = []
    for f in dataclasses.fields(config_cls):
        tp = _unwrap_optional(hints[f.name])
        if option_info(f).hidden or dataclasses.is_dataclass(tp):
            continue
        if typing.get_origin(tp) in (list, tuple) and typing.get_args(tp)[:1] != (str,):
            continue
        names.append(f.name)
    return names


def inputs_for(
    config_cls: type,
    names: list[str] | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[io.Input]:
    """V3 inputs for the options of a config dataclass, with the config's defaults and limits.

    Args:
        config_cls: A dataclass declared with :func:`trainer.options.option` fields.
        names: Which fields, in this order; ``None`` = :func:`widget_names` (all visible ones).
            Naming a ``hidden`` field explicitly exposes it.
        overrides: Per field, keyword arguments for the ``io.*.Input`` constructor that replace the
            derived ones (``default``, ``tooltip``, ``display_name``, ``advanced``, ``optional``,
            ``control_after_generate``, ...).

    Returns:
        Inputs in the order of ``names``.

    Raises:
        KeyError: a name or an override names no field of ``config_cls`` (typos fail at import).
        TypeError: a field's type has no widget (a nested config, say).
    """
    fields = _field_map(config_cls)
    hints = typing.get_type_hints(config_cls)
    overrides = dict(overrides or {})
    chosen = widget_names(config_cls) if names is None else list(names)
    for name in [*chosen, *overrides]:
        if name not in fields:
            raise KeyError(f"{config_cls.__name__} has no option {name!r}; options: {', '.join(fields)}")
    unused = set(overrides) - set(chosen)
    if unused:
        raise KeyError(
            f"overrides for {sorted(unused)} which are not among the inputs of {config_cls.__name__}"
        )
    return [_input_for(fields[name], hints[name], overrides.get(name, {})) for name in chosen]


def values_to_config(
    config_cls: type[T],
    values: Mapping[str, Any],
    *,
    node: str = "",
    base: T | None = None,
) -> T:
    """Build a validated config from a node's widget values.

    Args:
        config_cls: The config dataclass the widgets came from.
        values: Widget values by field name (only fields of ``config_cls``).
        node: The node's display name, put first in the error message when given.
        base: A config whose values fill the fields ``values`` leaves out.

    Raises:
        WidgetError: the config refused a value; the message names the node, the widget, the bad
            value and what is allowed, e.g. "Caption Shuffle: widget 'keep_tokens': -1 is below ...".
    """
    data = to_dict(base) if base is not None else {}
    data.update(values)
    try:
        return from_dict(config_cls, data)
    except ConfigError as e:
        widget = e.field.split(".")[0].split("[")[0]
        detail = str(e)
        prefix = f"{e.field}: "
        if detail.startswith(prefix):
            detail = detail[len(prefix) :]
        where = f"{node}: " if node else ""
        raise WidgetError(widget, f"{where}widget '{e.field}': {detail}") from None
