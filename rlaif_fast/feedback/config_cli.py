"""Command-line flags generated from a config dataclass: one flag per field, its help from field metadata
(``metadata={"help": ..., "flags": ("--in",)}``).

A field ``batch_size: int = 16`` with ``metadata={"help": ...}`` becomes ``--batch-size INT``; a bool becomes
``--flag`` / ``--no-flag``; a field without a default is a required flag. The dataclass's
``__post_init__`` then validates the values, so the rules live in one place for the API and the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _base_type(tp):
    """int | None -> int; plain types unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def build_parser(cls, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").split("\n")[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flags = f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))
        tp = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = (
            None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        )
        if tp is bool:
            parser.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_
            )
        else:
            parser.add_argument(
                *flags,
                dest=f.name,
                type=tp,
                default=default,
                required=required,
                metavar=tp.__name__.upper(),
                help=f"{help_} (default: {default})" if not required else help_,
            )
    return parser


def parse_config(cls, argv, prog: str):
    """Parse ``argv`` into an instance of the dataclass ``cls`` (its __post_init__ validates)."""
    ns = build_parser(cls, prog).parse_args(argv)
    return cls(**vars(ns))
