"""Regression tests from a review of the pipeline and the llama2.c loader: each one failed before its fix."""

import json
import struct

import pytest

from rlaif_fast import cli
from rlaif_fast.pipeline import task as T
from rlaif_fast.pipeline.config import RunConfig, packaged_config


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


def test_config_json_of_an_older_run_without_file_hashes_still_resumes(tmp_path):
    from rlaif_fast.pipeline.run import Run

    template = tmp_path / "t.yaml"
    template.write_text((packaged_config("demo").parent / "demo_template.yaml").read_text())
    cfg = RunConfig(output_dir=str(tmp_path / "out"), template=str(template))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps(cfg.to_dict()))
    Run(cfg, progress=False)._check_same_config()


# ---- prompts file: a damaged line names the file and the line --------------------------------------------
def test_damaged_prompts_file_names_file_and_line(tmp_path):
    from rlaif_fast.pipeline import files

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:3 is not JSON"):
        files.read_prompts(path)


# ---- demo: Ctrl-C returns 130 with the resume hint, no traceback and no stale report ---------------------
def test_interrupted_demo_returns_130_without_reading_a_report(tmp_path, monkeypatch, capsys):
    from rlaif_fast.pipeline import run as run_mod

    monkeypatch.setattr(run_mod, "finish", lambda cfg, progress: 130)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--no-progress", "--out", str(out)]) == 130  # no report.json yet
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"gt_improved": False, "gt_sft": 0.1, "gt_policy": 0.0}))
    assert cli.main(["demo", "--no-progress", "--out", str(out)]) == 130  # a stale one is not reported
    printed = capsys.readouterr().out
    assert "demo finished" not in printed and "did NOT improve" not in printed


# ---- rlaif-fast eval: --n 0 is refused, --out may name a new folder ---------------------------------------
@pytest.fixture
def eval_setup(tmp_path, monkeypatch):
    from rlaif_fast.pipeline.run import Run
    from rlaif_fast.pipeline.sft import build_policy

    tok = T.build_tokenizer()
    policy_dir = tmp_path / "a policy"
    build_policy(len(tok), dim=16, layers=1).save_pretrained(policy_dir)
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\n")
    seen = []

    def fake_evaluate(self, policy, baseline, n=None):
        seen.append(n)
        return {"pairs": n, "win_rate": 0.5}

    monkeypatch.setattr(Run, "evaluate", fake_evaluate)
    return ["eval", str(path), "--policy", str(policy_dir), "--baseline", str(policy_dir)], tmp_path, seen


def test_eval_refuses_n_zero(eval_setup):
    argv, _, seen = eval_setup
    with pytest.raises(ValueError, match="--n must be >= 1, got 0"):
        cli.main(argv + ["--n", "0"])
    assert seen == []


def test_eval_out_in_a_new_folder_keeps_the_result(eval_setup):
    argv, tmp_path, seen = eval_setup
    out = tmp_path / "results" / "e.json"
    assert cli.main(argv + ["--n", "3", "--out", str(out)]) == 0
    assert seen == [3] and json.loads(out.read_text()) == {"pairs": 3, "win_rate": 0.5}


# ---- report: RL steps are the trainer's steps, not its logged rows -----------------------------------------
def test_report_counts_rl_steps_not_logged_rows():
    from rlaif_fast.pipeline import report

    history = [{"iteration": 1, "step": s, "reward": 0.1, "kl": 0.0} for s in (5, 10)]  # log_every: 5
    result = {
        "sft": {},
        "iterations": [
            {
                "iteration": 1,
                "label": {"position_bias": 0.1, "alignment": 0.8},
                "rl": {"summary": {"steps": 10, "stopped": "completed"}, "history": history},
                "eval": {"win_rate": 0.6},
            }
        ],
    }
    rep = report.build_report(result, RunConfig())
    assert rep["per_iteration"][0]["rl_steps"] == 10
    assert "| 1 | 80.0% | 10.0% | n/a | n/a | 10 | 60.0% | n/a |" in report.render_markdown(rep)


# ---- llama2.c loader: damaged files give the loader's own errors --------------------------------------------
def _header(dim=8, hidden=16, layers=1, heads=2, kv=2, vocab=10, seq=4):
    return struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short for a llama2.c header"),
        (b"\x01\x02\x03", "too short for a llama2.c header"),
        (_header() + b"\0" * 203, "truncated"),  # cut mid-float: not a multiple of 4 bytes
        (_header(dim=6, heads=2) + b"\0" * 4000, "valid llama2.c v0 header"),  # head_dim 3: RoPE needs even
        (_header(dim=8, heads=2, kv=3) + b"\0" * 4000, "valid llama2.c v0 header"),  # heads % kv_heads != 0
        (_header(dim=10, heads=4) + b"\0" * 4000, "valid llama2.c v0 header"),  # dim % heads != 0
    ],
)
def test_damaged_llama2c_checkpoint_is_reported(tmp_path, content, message):
    from rlaif_fast.models.llama2c import load_llama2c

    path = tmp_path / "model with spaces.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_llama2c(path)


def test_truncated_llama2c_tokenizer_is_reported(tmp_path):
    from rlaif_fast.models import Llama2cTokenizer

    pieces = [(0.0, b"<unk>"), (0.0, b"\n<s>\n"), (0.0, b"\n</s>\n"), (-1.0, b"ab")]
    raw = struct.pack("<i", 6) + b"".join(struct.pack("<fi", s, len(p)) + p for s, p in pieces)
    good = tmp_path / "tok512.bin"
    good.write_bytes(raw)
    assert Llama2cTokenizer(good).vocab_size == 4
    for cut in (len(raw) - 1, len(raw) - 3):  # inside the last piece, inside its (score, length) record
        bad = tmp_path / f"cut{cut}.bin"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated"):
            Llama2cTokenizer(bad)


# ---- demo labeler cache: two runs that train the same labeler at once both finish ------------------------
def test_labeler_cache_published_meanwhile_by_another_run_is_kept(tmp_path, monkeypatch):
    from rlaif_fast.feedback import load_template
    from rlaif_fast.pipeline import labeler_model as L

    tok = T.build_tokenizer()
    render = load_template("helpfulness").render_pairwise
    real = L.train_labeler
    entry = tmp_path / f"labeler-{L.cache_key(render, 64, 2, 0)}"

    def train_while_another_run_publishes_first(*args, **kwargs):
        model = real(*args, **kwargs)
        model.save_pretrained(entry)  # the other run, same key, finished and renamed its copy first
        tok.save_pretrained(entry)
        return model

    monkeypatch.setattr(L, "train_labeler", train_while_another_run_publishes_first)
    model, where = L.load_or_train_labeler(render, tok, tmp_path, steps=2, progress=False)
    assert where == entry and (where / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]  # no temporary folder left behind
