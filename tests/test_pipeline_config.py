"""RunConfig: YAML loading, unknown keys and contradictory settings fail with errors that name the fix."""

from pathlib import Path

import pytest
import yaml

from rlaif_fast.feedback import load_template
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


# -------------------- bad values, empty values and edited templates


# ---- config validation: a bad value names its key, before any model is built ---------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"pairs_per_iteration": "1e3"},
            "pairs_per_iteration must be an integer",
        ),  # YAML 1.1 reads 1e3 as str
        ({"pairs_per_iteration": 512.0}, "pairs_per_iteration must be an integer"),
        ({"labeler": None}, "labeler must be a string"),
        ({"output_dir": None}, "output_dir must be a string"),
        ({"template": None}, "template must be a string"),
        ({"labeler_model": 5, "labeler": "http://127.0.0.1:1"}, "labeler_model must be a string or null"),
        ({"policy_dim": 30}, "policy_dim must be a multiple of 4"),
    ],
)
def test_bad_values_name_the_key(settings, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RunConfig(**settings)


def test_policy_dim_is_free_for_a_loaded_policy_and_a_real_labeler():
    RunConfig(task=None, prompts_file="p.jsonl", policy="p", labeler="hf:x", policy_dim=30)


def test_empty_yaml_value_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir:\n")  # an empty value is null in YAML
    with pytest.raises(TypeError, match="output_dir must be a string"):
        RunConfig.from_yaml(path)


# ---- resume: a template file edited between a killed run and its rerun is a changed config ---------------
def test_edited_template_file_is_a_changed_config(tmp_path):
    from rlaif_fast.pipeline.run import Run

    template = tmp_path / "my template.yaml"
    template.write_text((packaged_config("demo").parent / "demo_template.yaml").read_text())
    cfg = RunConfig(output_dir=str(tmp_path / "out dir"), template=str(template))
    Run(cfg, progress=False)._check_same_config()
    Run(cfg, progress=False)._check_same_config()  # unchanged: resumes
    template.write_text(template.read_text().replace("happier", "sadder"))
    with pytest.raises(ValueError, match=r"different config \(changed: template"):
        Run(cfg, progress=False)._check_same_config()


# -------------------- every shipped config


ROOT = Path(__file__).resolve().parents[1]


SHIPPED = sorted((ROOT / "rlaif_fast" / "pipeline" / "configs").glob("*.yaml")) + sorted(
    (ROOT / "examples").glob("*.yaml")
)


# ---- every shipped config parses, validates, and each key it sets reaches its stage ----------------------
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_its_keys_arrive(path, tmp_path):
    from rlaif_fast.pipeline.run import RL_OWNED, Run
    from rlaif_fast.trainer import RLAIFConfig

    raw = yaml.safe_load(path.read_text())
    if "sample" in raw and "output_dir" not in raw:  # a labeler template, not a run config
        template = load_template(path)
        assert template.render_pairwise("c", "a", "b") and template.render_score("c", "a")
        return
    cfg = RunConfig.from_yaml(path)
    for key, value in raw.items():  # nothing set in the file is dropped or replaced on the way in
        if key in ("template", "prompts_file") and (path.parent / value).is_file():
            value = str(path.parent / value)
        assert getattr(cfg, key) == value, key
    load_template(cfg.template)
    run = Run.__new__(Run)  # the user task's tokenizer is not here; the rl section is checked without it
    run.cfg, run.out = cfg, tmp_path
    settings = run._rl_settings()
    rl = RLAIFConfig.from_dict({**settings, "output_dir": str(tmp_path), "seed": 1})
    for key, value in (raw.get("rl") or {}).items():
        assert key not in RL_OWNED and getattr(rl, key) == value, key
    if cfg.task is not None:
        Run(cfg, progress=False)


# -------------------- run / eval / demo answer a user's mistake with exit 2, no traceback


def _cli_case(tmp_path, kind):
    bad = {
        "unknown key": ("iterations: 1\nfoo_bar: 3\n", "unknown run config key 'foo_bar'"),
        "wrong type": ('iterations: "x"\n', "iterations must be an integer, got 'x'"),
        "broken YAML": ("iterations: 1\n  bad: [\n", r"c\.yaml:2:6: not valid YAML"),
        "missing policy": (
            f"task: null\nprompts_file: p.jsonl\nlabeler: http://127.0.0.1:9\nlabeler_model: m\npolicy: {tmp_path / 'no_such_policy'}\n",
            "policy '.*no_such_policy' does not exist",
        ),
    }
    if kind == "missing config":
        return str(tmp_path / "absent.yaml"), "config file '.*absent.yaml' does not exist"
    text, message = bad[kind]
    (tmp_path / "c.yaml").write_text(text)
    return str(tmp_path / "c.yaml"), message


@pytest.mark.parametrize("command", ["run", "eval"])
@pytest.mark.parametrize(
    "kind", ["unknown key", "wrong type", "broken YAML", "missing policy", "missing config"]
)
def test_run_and_eval_answer_a_bad_config_with_exit_2(tmp_path, capsys, command, kind):
    import re

    from rlaif_fast import cli

    path, message = _cli_case(tmp_path, kind)
    assert cli.main([command, path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlaif-fast {command}: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_demo_set_changing_a_finished_run_names_the_key(tmp_path, capsys):
    """A rerun of the demo resumes its output; a --set that changes one rl setting is refused naming
    rl.kl_coef (it named only the section, in a traceback), while a moved output folder still resumes."""
    import json

    from rlaif_fast import cli
    from rlaif_fast.pipeline.run import Run

    out = tmp_path / "demo_out"
    out.mkdir()
    cfg = RunConfig.from_yaml(packaged_config("demo"), {"output_dir": str(out)})
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "output_dir": "/moved/from/here"}))
    Run(cfg, progress=False)._check_same_config()  # only output_dir differs: resumes
    assert cli.main(["demo", "--out", str(out), "--set", "rl.kl_coef=0.123"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlaif-fast demo: error: ") and "changed: rl.kl_coef)" in err
    assert cli.main(["demo", "--set", "no_such_key=1"]) == 2
    assert "unknown run config key 'no_such_key'" in capsys.readouterr().err
