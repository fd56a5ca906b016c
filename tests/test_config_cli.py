"""rlaif_fast/config_cli.py: the one generator of command-line flags from a config dataclass (train, label,
train-rm). Help comes from field metadata, types from the annotations, checks from the dataclass."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from rlaif_fast.config_cli import add_options, build_parser, option, parse_config
from rlaif_fast.trainer.config import RLAIFConfig


@dataclass
class Toy:
    """A toy job."""

    path: str = option(help="where to read", flags=("--in", "--path"))
    steps: int = option(3, "how many steps")
    limit: int | None = option(None, "at most this many (none: no limit)")
    rate: float = option(0.5, "a rate of 50%")
    mode: str = option("a", "the mode", choices=("a", "b"))
    packed: bool | None = option(None, "true, false or none (auto)")
    lora: dict | None = option(None, "a JSON mapping")
    strict: bool = option(False, "fail early")
    tags: dict = option(default_factory=dict, help="free-form")

    def __post_init__(self):
        if self.mode not in ("a", "b"):
            raise ValueError(f"mode={self.mode!r} is not supported; use one of ('a', 'b')")


def test_values_are_parsed_by_their_annotation():
    cfg = parse_config(
        Toy,
        [
            "--in",
            "x",
            "--steps",
            "7",
            "--limit",
            "none",
            "--packed",
            "TRUE",
            "--lora",
            '{"r": 8}',
            "--strict",
        ],
        prog="toy",
    )
    assert (cfg.path, cfg.steps, cfg.limit, cfg.packed, cfg.lora, cfg.strict) == (
        "x",
        7,
        None,
        True,
        {"r": 8},
        True,
    )
    assert (cfg.rate, cfg.mode, cfg.tags) == (0.5, "a", {})  # defaults where no flag was given
    assert parse_config(Toy, ["--path", "y", "--limit", "4", "--packed", "none"], prog="toy").limit == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: --in/--path"),
        (["--in", "x", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["--in", "x", "--packed", "maybe"], "argument --packed: 'maybe': use true, false or none"),
        (["--in", "x", "--lora", "r=8"], "argument --lora: 'r=8' is not JSON"),
        (["--in", "x", "--lora", "[8]"], "argument --lora: '[8]' is not a JSON mapping"),
    ],
)
def test_a_bad_flag_is_an_argparse_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(Toy, argv, prog="toy")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: toy") and f"toy: error: {message}" in err, err


def test_a_choice_is_listed_in_help_but_checked_by_the_dataclass(capsys):
    """argparse does not enforce choices, so the user gets the config's own message (the same for the API)."""
    with pytest.raises(ValueError, match=r"mode='c' is not supported; use one of \('a', 'b'\)"):
        parse_config(Toy, ["--in", "x", "--mode", "c"], prog="toy")
    text = build_parser(Toy, prog="toy").format_help()
    assert "--mode {a,b}" in text and "the mode (default: a)" in text
    assert "a rate of 50% (default: 0.5)" in text  # a % in the help is text, not a format directive
    assert "A toy job." in text  # the description is the docstring's first line


def test_without_defaults_only_the_given_flags_reach_the_namespace():
    """defaults=False is how `rlaif-fast train` lets a YAML file sit between the defaults and the flags."""
    parser = argparse.ArgumentParser()
    add_options(parser, Toy, skip=("tags",), defaults=False)
    ns = vars(parser.parse_args(["--in", "x", "--no-strict"]))
    assert ns == {"path": "x", "strict": False}
    assert "--tags" not in parser.format_help() and "how many steps (default: 3)" in parser.format_help()


def test_every_rlaif_config_field_has_help_in_the_train_cli():
    """Each knob of RLAIFConfig is documented once, in its field metadata, and shows in `rlaif-fast train --help`."""
    from rlaif_fast.trainer.cli import build_parser as train_parser

    text = "".join(train_parser().format_help().split())  # argparse wraps lines, also at hyphens
    for f in dataclasses.fields(RLAIFConfig):
        if f.name == "extra":  # free-form metadata: no flag
            assert "--extra" not in text
            continue
        help_ = "".join(f.metadata.get("help", "").split())
        assert help_, f"RLAIFConfig.{f.name} has no help: give it option(default, 'help')"
        assert "--" + f.name.replace("_", "-") in text and help_ in text, f.name
