"""Options declared once: each config field carries its flag's help, choices and group; the CLI is built from them.

A stage's config is a frozen dataclass whose fields are made with :func:`option`::

    @dataclass(frozen=True)
    class ExportConfig(Options):
        model: str = model_field()
        opset: int = option(17, help="ONNX opset (17 suits TensorRT 8.6 and later)")

:func:`add_options` turns such a class into argparse flags (``--opset``, type, default, choices, help with the
default printed once), :func:`from_args` builds the config back from the parsed namespace, and
:meth:`Options.__post_init__` checks every field's ``choices`` with one message. Nothing here imports torch, so
``cli.py --help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING
from typing import Any

from .errors import ConfigError


def option(default: Any = MISSING, *, help: str, choices: tuple | None = None, flag: str | None = None,
           aliases: tuple[str, ...] = (), metavar: str | None = None, group: str | None = None,
           default_text: str | None = None, positional: bool = False, cli: bool = True,
           exclude: tuple[str, ...] = (), default_factory: Any = MISSING,
           bounds: tuple[float | None, float | None] | None = None) -> Any:
    """A dataclass field that also declares its command-line flag.

    Args:
        default: the field's default (no default: the flag is required).
        help: what the option does and why; the default is appended by the CLI.
        choices: the values allowed (checked by :class:`Options` too, so configs built in code get them).
        flag: the flag when it is not ``--field-name`` (e.g. ``--timeout`` for ``timeout_s``).
        aliases: further flag spellings.
        metavar / group: argparse's metavar, and the argument group the flag is listed under.
        default_text: how a ``None`` default reads in the help ("the data's preset").
        positional: a positional argument (``nargs='+'`` for tuples) instead of a flag.
        cli: False for fields no flag sets (the CLI fills them, e.g. ``progress`` from ``--quiet``).
        exclude: for a nested config field: its fields that get no flag here.
        bounds: ``(lowest, highest)`` a number may take (either None: open), checked by :class:`Options`.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "aliases": aliases, "metavar": metavar,
                "group": group, "default_text": default_text, "positional": positional, "cli": cli,
                "exclude": exclude, "bounds": bounds}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class Options:
    """Base of every stage config: checks each field's ``choices`` and ``bounds``, then the config's own
    :meth:`check`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{flag_of(f)} must be one of {', '.join(map(str, choices))} (got {value!r})")
            bounds = f.metadata.get("bounds")
            if bounds and value is not None:
                low, high = bounds
                if (low is not None and value < low) or (high is not None and value > high):
                    where = (f"between {low:g} and {high:g}" if low is not None and high is not None
                             else f"at least {low:g}" if low is not None else f"at most {high:g}")
                    raise ConfigError(f"{flag_of(f)} must be {where} (got {value!r})")
        self.check()

    def check(self) -> None:
        """Checks between fields; each config overrides it as needed."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _help_text(f: dataclasses.Field, default: Any, shown: str | None = None) -> str:
    text = f.metadata["help"]
    if default is True:
        return (text + f" (on by default; {'--no-' + flag_of(f)[2:]} turns it off)").replace("%", "%%")
    shown = shown or f.metadata.get("default_text")
    if shown is None and not (default is None or default is False or default is MISSING or default == ()):
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else str(default)
    if shown:
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (),
                groups: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None,
                defaults_text: str | None = None) -> None:
    """Add one flag per field of the dataclass ``cls`` (nested config fields: their fields, in their group).

    Args:
        exclude: fields that get no flag.
        groups: argument groups by name, shared between calls so a group is listed once per subcommand.
        defaults: flag defaults that differ from the field's (e.g. None for "take the recipe's value").
        defaults_text: how those defaults read in the help.
    """
    groups = {} if groups is None else groups
    defaults = defaults or {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True) or "help" not in f.metadata:
            continue
        hint = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(hint):
            add_options(parser, hint, exclude=f.metadata.get("exclude", ()), groups=groups)
            continue
        group_name = f.metadata.get("group")
        target = parser
        if group_name:
            if group_name not in groups:
                groups[group_name] = parser.add_argument_group(group_name)
            target = groups[group_name]
        default = defaults.get(f.name, f.default if f.default is not MISSING else
                               (f.default_factory() if f.default_factory is not MISSING else MISSING))
        kwargs: dict[str, Any] = {"help": _help_text(f, default, defaults_text if f.name in defaults else None)}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if hint is bool and default is True:  # on by default: --name and --no-name (one help line, any Python)
            flag = flag_of(f)
            target.add_argument(flag, dest=f.name, action="store_true", default=True, help=kwargs["help"])
            target.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=argparse.SUPPRESS)
            continue
        if hint is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(hint) is tuple:
            kwargs["type"] = typing.get_args(hint)[0]
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = hint
        if f.metadata.get("positional"):
            target.add_argument(f.name, **kwargs)
            continue
        if default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = list(default) if isinstance(default, tuple) else default
        target.add_argument(flag_of(f), *f.metadata.get("aliases", ()), dest=f.name, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """The config ``cls`` from parsed flags; ``fixed`` sets fields (at every nesting level) no flag sets."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = _unwrap_optional(hints[f.name])
        if f.name in fixed:
            kwargs[f.name] = fixed[f.name]
        elif dataclasses.is_dataclass(hint):
            kwargs[f.name] = from_args(hint, args, **fixed)
        elif hasattr(args, f.name) and f.metadata.get("cli", True):
            value = getattr(args, f.name)
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
