"""`rlaif-fast train` answers a user's mistake as `rlaif-fast label` does (`prog: error: ...`, exit 2, no
traceback), and before anything heavy loads: no policy, reward model or trainer is built."""

import json
import re

import pytest

from rlaif_fast.reward.model import HEAD_FILE
from rlaif_fast.trainer import RLAIFConfig
from rlaif_fast.trainer import cli as train_cli


class Loaded(Exception):
    """Raised by the heavy loaders: reaching one means every check passed."""


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A valid set of inputs (policy folder, prompts, a reward callable, output folder); loaders stubbed."""

    def heavy(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(train_cli, "load_policy", heavy)
    monkeypatch.setattr(train_cli, "load_callable", heavy)
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text("{}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    reward = tmp_path / "reward.py"
    reward.write_text("def score(p, c):\n    return [0.0] * len(c)\n")
    args = {
        "--policy": str(policy),
        "--prompts": str(prompts),
        "--reward": f"{reward}:score",
        "--output-dir": str(tmp_path / "out"),
    }
    return tmp_path, args


def _run(args: dict, *extra: str) -> int:
    argv = [x for kv in args.items() for x in kv] + list(extra)
    return train_cli.main(argv)


def test_valid_inputs_reach_the_loaders(job):
    _, args = job
    with pytest.raises(Loaded):
        _run(args)


def _bad_prompts(tmp, args):
    (tmp / "prompts.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b",\n')
    return "prompts.jsonl:3: not JSON"


def _no_prompt_field(tmp, args):
    (tmp / "prompts.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    return 'prompts.jsonl:2: no "prompt" string'


def _missing_policy(tmp, args):
    args["--policy"] = str(tmp / "no" / "such" / "policy")
    return "--policy '.*policy' does not exist"


def _policy_without_config(tmp, args):
    args["--policy"] = str(tmp)
    return "is a folder without config.json"


def _read_only_output(tmp, args):
    (tmp / "a_file").write_text("")
    args["--output-dir"] = str(tmp / "a_file" / "out")  # under a file: nothing can be written there
    return "output_dir '.*a_file/out' cannot be written"


def _reward_model_without_tokenizer(tmp, args):
    rm = tmp / "rm"
    rm.mkdir()
    (rm / HEAD_FILE).write_bytes(b"")
    (rm / "config.json").write_text("{}")
    args["--reward"] = str(rm)
    return "holds a reward model but no tokenizer"


def _broken_yaml(tmp, args):
    (tmp / "run.yaml").write_text("batch_size: 4\n  algorithm: [\n")
    args["--config"] = str(tmp / "run.yaml")
    return r"run\.yaml:2:\d+: not valid YAML"


def _missing_yaml(tmp, args):
    args["--config"] = str(tmp / "nope.yaml")
    return "config file '.*nope.yaml' does not exist"


def _unknown_yaml_key(tmp, args):
    (tmp / "run.yaml").write_text("batch_sise: 4\n")
    args["--config"] = str(tmp / "run.yaml")
    return "did you mean 'batch_size'"


def _unknown_algorithm(tmp, args):
    args["--algorithm"] = "bogus"  # listed as a choice in --help; the config's message answers it
    return r"algorithm='bogus' is not supported; use one of \('reinforce_baseline'"


@pytest.mark.parametrize(
    "mistake",
    [
        _bad_prompts,
        _no_prompt_field,
        _missing_policy,
        _policy_without_config,
        _read_only_output,
        _reward_model_without_tokenizer,
        _broken_yaml,
        _missing_yaml,
        _unknown_yaml_key,
        _unknown_algorithm,
    ],
)
def test_a_mistake_is_answered_with_exit_2_before_anything_loads(job, mistake, capsys):
    tmp, args = job
    message = mistake(tmp, args)
    assert _run(args) == 2  # a heavy loader would have raised Loaded
    err = capsys.readouterr().err
    assert err.startswith("rlaif-fast train: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def _checkpoint(out, **settings):
    """A checkpoint folder as save_checkpoint leaves it (only what the resume check reads)."""
    folder = out / "checkpoints" / "step_000002"
    folder.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_000002")
    (folder / "config.json").write_text(RLAIFConfig(**settings).to_json())


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--learning-rate", "1e-3"], "learning_rate"),
        (["--kl-coef", "0.2"], "kl_coef"),
        (["--algorithm", "ppo"], "algorithm"),
    ],
)
def test_resume_with_changed_settings_is_refused_naming_the_key(job, flags, key, capsys):
    tmp, args = job
    _checkpoint(tmp / "out", output_dir=str(tmp / "out"))
    assert _run(args, "--resume", *flags) == 2
    err = capsys.readouterr().err
    assert f"{key} " in err and "Traceback" not in err and "other settings" in err


def test_resume_of_a_moved_run_folder_is_not_a_config_change(job):
    tmp, args = job
    # saved as /elsewhere/out, resumed from tmp/out with a longer run: both may change
    _checkpoint(tmp / "out", output_dir="/elsewhere/out", total_steps=2)
    with pytest.raises(Loaded):
        _run(args, "--resume", "--total-steps", "4")
    saved = json.loads((tmp / "out" / "checkpoints" / "step_000002" / "config.json").read_text())
    assert saved["output_dir"] == "/elsewhere/out"
