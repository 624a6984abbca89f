"""The one adapter between option dataclasses and the command line.

A stage's or recipe's options are a dataclass; each field declared with :func:`option` is one CLI option
(`lora_rank` -> `--lora-rank`) whose `help`, default, bounds and choices live in the field itself
(trl's `DPOConfig` style). From the dataclass:

- :func:`click_options` decorates a click command with one option per field (choices from `Literal[...]`,
  repeatable options from `tuple[...]`, flags from `bool`, bounds from `min`/`max`);
- :func:`validate_fields` checks the same bounds and choices for callers of the Python API;
- :func:`parse_assignments` reads `KEY=VALUE` items into typed fields (an option forwarded to an inner
  command, as `prefpipe d3po-rounds --train max-steps=50` forwards to every round's `prefpipe train`).

So `--help`, the Python API and the recorded options can never disagree.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from prefpipe.core.errors import PrefpipeError


def finite_float(lo: float | None = None, hi: float | None = None):
    """A click type for a float option: a finite number (`nan` and `inf` are refused, naming the option),
    within [lo, hi] when given."""
    import click

    class FiniteFloat(click.FloatRange):
        name = "float"

        def convert(self, value, param, ctx):
            number = click.FLOAT.convert(value, param, ctx)
            if not math.isfinite(number):
                self.fail(f"{value!r} is not a finite number", param, ctx)
            return super().convert(number, param, ctx)

    return FiniteFloat(min=lo, max=hi)


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field that is a CLI option: `help` is its help line; `extra` may hold `min`, `max`,
    `required` (no default on the command line) and `show_default`."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def cli_name(name: str) -> str:
    """The option spelling of a field: `lora_rank` -> `lora-rank`."""
    return name.replace("_", "-")


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def literal_choices(tp: Any) -> tuple[str, ...]:
    """The choices of `Literal[...]`, `Literal[...] | None` or `tuple[Literal[...], ...]`; () otherwise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return tuple(typing.get_args(tp))
    if origin in (typing.Union, types.UnionType, tuple):
        for arg in typing.get_args(tp):
            if arg is not type(None) and arg is not Ellipsis:
                found = literal_choices(arg)
                if found:
                    return found
    return ()


def base_type(tp: Any) -> Any:
    """int / float / str / bool for `X`, `X | None`, `tuple[X, ...]` and Literals of strings."""
    if typing.get_origin(tp) is Literal:
        return str
    if typing.get_origin(tp) in (typing.Union, types.UnionType, tuple):
        args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
        return base_type(args[0])
    return tp


def _option_fields(cls: type, only: Iterable[str] | None, exclude: Iterable[str]) -> list[dataclasses.Field]:
    fields = [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.name not in set(exclude)]
    if only is not None:
        by_name = {f.name: f for f in fields}
        missing = [n for n in only if n not in by_name]
        if missing:
            raise ValueError(f"{cls.__name__} has no option field(s) {missing}")
        fields = [by_name[n] for n in only]
    return fields


def click_options(cls: type, *, only: Sequence[str] | None = None, exclude: Iterable[str] = (),
                  defaults: dict[str, Any] | None = None, help: dict[str, str] | None = None,
                  bounds: dict[str, dict[str, Any]] | None = None):
    """A decorator adding one click option per option field of dataclass `cls`, in field order (or `only`'s).

    `defaults`, `help` and `bounds` (`{"min": ..}`) override a field's for this command only (a command
    that shares the field with another but differs in its default, wording or range).
    """
    import click

    hints = field_types(cls)
    defaults, help, bounds = defaults or {}, help or {}, bounds or {}

    def decorate(func):
        for f in reversed(_option_fields(cls, only, exclude)):
            tp = hints[f.name]
            kwargs: dict[str, Any] = {"help": help.get(f.name, f.metadata["help"])}
            choices = literal_choices(tp)
            base = base_type(tp)
            default = defaults.get(f.name, f.default)
            if base is bool:
                kwargs.update(is_flag=True, default=bool(default))
            else:
                if choices:
                    kwargs["type"] = click.Choice(list(choices))
                elif base in (int, float):
                    limits = {**{k: f.metadata.get(k) for k in ("min", "max")}, **bounds.get(f.name, {})}
                    lo, hi = limits.get("min"), limits.get("max")
                    if base is float:
                        kwargs["type"] = finite_float(lo, hi)
                    else:
                        kwargs["type"] = click.IntRange(min=lo, max=hi) if lo is not None or hi is not None else int
                else:
                    kwargs["type"] = str
                if typing.get_origin(tp) is tuple:
                    kwargs.update(multiple=True, default=())
                else:
                    kwargs["default"] = default
                    kwargs["show_default"] = f.metadata.get("show_default", default is not None)
                if f.metadata.get("required"):
                    kwargs["required"] = True
            func = click.option("--" + cli_name(f.name), f.name, **kwargs)(func)
        return func

    return decorate


def validate_fields(obj: Any) -> None:
    """Required fields, bounds and `Literal` choices of an options dataclass instance (raises PrefpipeError)."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        if "help" not in f.metadata:
            continue
        value = getattr(obj, f.name)
        if f.metadata.get("required") and value in (None, ""):
            raise PrefpipeError(f"--{cli_name(f.name)} is required")
        if isinstance(value, float) and not math.isfinite(value):
            raise PrefpipeError(f"--{cli_name(f.name)} {value}: must be a finite number")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise PrefpipeError(f"--{cli_name(f.name)} {value}: must be {bounds}")
        choices = literal_choices(hints[f.name])
        if choices:
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if v is not None and v not in choices:
                    raise PrefpipeError(f"--{cli_name(f.name)} {v}: choose one of {', '.join(choices)}")


def parse_assignments(items: Sequence[str], cls: type, flag: str, what: str) -> dict[str, Any]:
    """`KEY=VALUE` items -> fields of dataclass `cls`, typed from its annotations (`max-steps=20`,
    `lora_targets=attn,ff`, `full=true`, `init-from=none`). `flag` names the option in messages, `what`
    the options it takes ("a `prefpipe train` option")."""
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if not sep or name not in names:
            raise PrefpipeError(f"{flag} {item}: write OPTION=VALUE with {what}, e.g. max-steps=50")
        tp = hints[name]
        base = base_type(tp)
        if typing.get_origin(tp) is tuple:
            out[name] = tuple(v for v in value.split(",") if v)
        elif base is bool:
            out[name] = value.strip().lower() in ("1", "true", "yes", "on")
        elif value.strip().lower() == "none":
            out[name] = None
        else:
            try:
                out[name] = base(value)
            except ValueError as e:
                raise PrefpipeError(f"{flag} {item}: {value!r} is not a {base.__name__}") from e
            if base is float and not math.isfinite(out[name]):
                raise PrefpipeError(f"{flag} {item}: {value!r} is not a finite number")
    return out
