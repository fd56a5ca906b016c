"""Command-line flags generated from a config dataclass: the one generator behind every ``rlaif-fast`` command.

A field documents itself with ``option(default, "help")``, shorthand for ``dataclasses.field(default=...,
metadata={"help": ...})`` (that spelling works too). Other metadata keys: ``flags`` (the option strings;
default ``--field-name``) and ``choices`` (listed in ``--help``; the dataclass's ``__post_init__`` still does
the checking, so an unknown value gets the config's message, naming the value and the choices).

Types come from the annotations: ``int``, ``float`` and ``str`` as such; ``X | None`` also takes ``none`` (or
``null``); ``bool`` becomes ``--flag`` / ``--no-flag``; ``bool | None`` takes true, false or none; ``dict``
takes a JSON mapping. A field without a default is a required flag. The dataclass validates the values, so
the rules live in one place for the Python API, YAML files and the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Callable, Iterable
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # argparse's word for it
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    flags: tuple[str, ...] | None = None,
    choices: Iterable[Any] | None = None,
) -> Any:
    """A dataclass field with its command-line help (and optionally flags and choices) in its metadata."""
    metadata: dict[str, Any] = {"help": help}
    if flags is not None:
        metadata["flags"] = tuple(flags)
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def value_parser(annotation) -> Callable[[str], Any]:
    """The argparse ``type=`` for a field annotation (a resolved type, not a string)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if typing.get_origin(annotation) is not None and args and type(None) in args:
        annotation = next(a for a in args if a is not type(None))
    base = typing.get_origin(annotation) or annotation  # dict[str, Any] -> dict

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if base is bool:  # bool | None (a plain bool is --flag / --no-flag)
            if text.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"{text!r}: use true, false or none")
            return text.lower() == "true"
        if base is dict:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not JSON ({exc.msg}); write a mapping like '{{\"r\": 8}}'"
                ) from None
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not a JSON mapping; write one like '{{\"r\": 8}}'"
                )
            return value
        return base(text)

    parse.__name__ = getattr(base, "__name__", str(base))  # argparse's "invalid int value: 'x'"
    parse.metavar = (  # type: ignore[attr-defined]
        "{true,false,none}" if base is bool else "JSON" if base is dict else parse.__name__.upper()
    )
    return parse


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_options(parser, cls, *, skip: Iterable[str] = (), defaults: bool = True) -> None:
    """One option per field of the dataclass ``cls`` on ``parser`` (an ArgumentParser or an argument group).

    ``defaults=True``: the parsed namespace holds every field (its default when the flag is absent).
    ``defaults=False``: only the flags given appear in it, so that values from elsewhere (a YAML file) can sit
    between the dataclass defaults and the flags. ``--help`` shows the default either way."""
    hints = typing.get_type_hints(cls)
    skip = set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        default = _default(f)
        required = default is dataclasses.MISSING
        if not required:
            help_ += f" (default: {str(default).replace('%', '%%')})"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "help": help_,
            "default": argparse.SUPPRESS if not defaults else (None if required else default),
        }
        if hints[f.name] is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        parse = value_parser(hints[f.name])
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else parse.metavar
        parser.add_argument(*flags, type=parse, required=required, metavar=metavar, **kwargs)


def build_parser(cls, prog: str, description: str | None = None, **parser_kwargs) -> argparse.ArgumentParser:
    """A parser whose options are the fields of ``cls`` (description: the first line of its docstring)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description or (cls.__doc__ or "").split("\n")[0], **parser_kwargs
    )
    add_options(parser, cls)
    return parser


def parse_config(cls, argv, prog: str):
    """Parse ``argv`` into an instance of the dataclass ``cls`` (its ``__post_init__`` validates)."""
    ns = build_parser(cls, prog).parse_args(argv)
    return cls(**vars(ns))
