"""RunConfig: YAML loading, unknown keys and contradictory settings fail with errors that name the fix."""

import pytest

from rlaif_fast.pipeline.config import RunConfig, packaged_config


def test_packaged_demo_config_loads():
    cfg = RunConfig.from_yaml(packaged_config("demo"))
    assert cfg.task == "happy_sentences" and cfg.labeler == "demo" and cfg.feedback == "distilled"
    assert cfg.rl["algorithm"] == "reinforce_baseline"


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iterations: 2\nseed: 3\n")
    cfg = RunConfig.from_yaml(path, {"iterations": 5})
    assert (cfg.iterations, cfg.seed) == (5, 3)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iteratons: 2\n")
    with pytest.raises(ValueError, match=r"unknown run config key 'iteratons'; did you mean 'iterations'"):
        RunConfig.from_yaml(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        RunConfig.from_yaml(path)


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"feedback": "direct", "template": "C {context} 1 {first} 2 {second} ="},
            r"feedback: direct \(d-RLAIF\) asks the labeler for a 1-10 rating, but template 'user' has no score",
        ),
        ({"feedback": "bogus"}, r"feedback='bogus' is not supported"),
        (
            {"task": None, "prompts_file": "p.jsonl", "policy": "p"},
            "labeler: demo is trained on the embedded",
        ),
        ({"task": None, "prompts_file": None}, "no prompts_file"),
        ({"prompts_file": "p.jsonl"}, "both set"),
        ({"task": None, "prompts_file": "p.jsonl", "labeler": "hf:x"}, "needs a policy path"),
        ({"task": "chess"}, "not an embedded task"),
        ({"labeler": "gpt"}, "use 'demo', 'hf:PATH' or 'http:URL'"),
        ({"labeler": "hf:"}, "names no path"),
        ({"labeler": "http://127.0.0.1:1"}, "set labeler_model"),
        ({"iterations": 0}, "iterations must be >= 1, got 0"),
        ({"pairs_per_iteration": 1}, "pairs_per_iteration must be >= 2"),
        ({"temperature": 0}, "temperature must be a number > 0"),
        ({"sft_steps": 1.5}, "sft_steps must be an integer"),
        ({"rl": [1]}, "rl must be a mapping"),
    ],
)
def test_bad_settings_raise_before_any_compute(settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RunConfig(**settings)


def test_run_rejects_rl_keys_owned_by_the_run_config(tmp_path):
    from rlaif_fast.pipeline.run import Run

    cfg = RunConfig(output_dir=str(tmp_path), rl={"temperature": 0.5})
    with pytest.raises(ValueError, match=r"\['temperature'\] are set by the run config itself"):
        Run(cfg, progress=False)


def test_run_validates_trainer_settings_before_sft(tmp_path):
    from rlaif_fast.pipeline.run import Run

    cfg = RunConfig(output_dir=str(tmp_path / "out"), rl={"algoritm": "ppo"})
    with pytest.raises(ValueError, match="algoritm"):
        Run(cfg, progress=False)
    assert not (tmp_path / "out").exists()  # nothing was computed or written


def test_labeler_url_forms():
    from rlaif_fast.pipeline.run import labeler_url

    assert labeler_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert labeler_url("http:https://api.example/v1") == "https://api.example/v1"
    RunConfig(labeler="https://api.example", labeler_model="m")  # accepted
    with pytest.raises(ValueError, match="names no URL"):
        RunConfig(labeler="http:", labeler_model="m")


def test_real_llm_example_config_is_valid():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "rlaif_real_llm.yaml"
    cfg = RunConfig.from_yaml(path)
    assert cfg.task is None and cfg.labeler.startswith("http") and cfg.labeler_model
    assert cfg.rl["algorithm"] == "reinforce_baseline"
