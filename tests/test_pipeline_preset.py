"""The paper's presets (configs/paper.yaml, configs/paper_same_size.yaml): every key arrives where it belongs,
and a short run with the paper preset (scaled down and pointed at the embedded task with --set) completes with
chain-of-thought rationales in its label file, Adafactor in both trainings, the harmless rate and checkpoint
selection in its evaluation."""

import json
import math

import pytest
import yaml

from rlaif_fast import cli
from rlaif_fast.pipeline.config import RunConfig, packaged_config
from rlaif_fast.trainer import RLAIFConfig


@pytest.mark.parametrize("name", ["paper", "paper_same_size"])
def test_every_preset_key_arrives(name):
    raw = yaml.safe_load(packaged_config(name).read_text())
    cfg = RunConfig.from_yaml(packaged_config(name))
    rl_raw = raw.pop("rl")
    for key, value in raw.items():
        assert getattr(cfg, key) == value, key
    rl = RLAIFConfig.from_dict({**rl_raw, "output_dir": "x"})
    for key, value in rl_raw.items():
        assert getattr(rl, key) == value, key
    # the paper's numbers (arXiv 2309.00267): detailed preamble + CoT 0-shot, T = 0.9, beta = 0.05, lr 1e-5,
    # batch 128, rationales up to 512 tokens, Adafactor
    assert (cfg.template, cfg.chain_of_thought, cfg.rationale_tokens) == ("summarization-detailed", True, 512)
    assert (cfg.temperature, rl.kl_coef, rl.learning_rate, rl.batch_size) == (0.9, 0.05, 1e-5, 128)
    assert (cfg.rm_batch_size, cfg.rm_lr, cfg.rm_optimizer, rl.optimizer) == (
        128,
        1e-5,
        "adafactor",
        "adafactor",
    )
    assert cfg.labeler == ("sft" if name == "paper_same_size" else "hf:labeler")


def test_feedback_section_and_flat_keys_merge_from_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("feedback: direct\ntemplate: helpfulness\n")
    from rlaif_fast.pipeline.run import parse_overrides

    cfg = RunConfig.from_yaml(path, parse_overrides(["feedback.chain_of_thought=true"]))
    assert (cfg.feedback, cfg.chain_of_thought) == ("direct", True)
    for sets in (
        ["feedback=distilled", "feedback.rationale_tokens=7"],
        ["feedback.rationale_tokens=7", "feedback=distilled"],
    ):
        cfg = RunConfig.from_yaml(path, parse_overrides(sets))  # both kept, in either order
        assert (cfg.feedback, cfg.rationale_tokens) == ("distilled", 7), sets
    with pytest.raises(
        ValueError, match="unknown feedback key 'chain_of_thougt'; did you mean 'chain_of_thought'"
    ):
        RunConfig.from_yaml(path, parse_overrides(["feedback.chain_of_thougt=true"]))
    with pytest.raises(ValueError, match="rm_optimizer='adam'"):
        RunConfig.from_yaml(path, {"rm_optimizer": "adam"})


@pytest.mark.slow
def test_short_run_with_the_paper_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("RLAIF_FAST_CACHE", str(tmp_path / "cache"))
    template = packaged_config("demo").parent / "demo_template.yaml"
    out = tmp_path / "out"
    human = [("the dog is happy .", "the dog is sad .", 1), ("a cold dark day .", "a warm kind day .", 0)]
    (tmp_path / "human.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "context": "write a happy sentence about the dog :",
                    "response_a": a,
                    "response_b": b,
                    "human_a": h,
                }
            )
            + "\n"
            for a, b, h in human
        )
    )
    sets = {
        "output_dir": out,
        "task": "happy_sentences",
        "prompts_file": "null",
        "policy": "null",
        "sft_steps": 20,
        "labeler": "demo",
        "labeler_steps": 10,
        "template": template,
        "harmless_template": template,
        "human_pairs": tmp_path
        / "human.jsonl",  # the demo template's score prompt stands in for harmlessness
        "feedback.rationale_tokens": 3,  # the feedback section reaches the flat keys
        "pairs_per_iteration": 12,
        "rm_epochs": 1,
        "rm_batch_size": 8,
        "rm_lr": 1e-3,
        "max_new_tokens": 8,
        "eval_prompts": 6,
        "rl.batch_size": 4,
        "rl.micro_batch_size": 4,
        "rl.total_steps": 2,
        "rl.save_every": 1,
        "rl.learning_rate": 1e-3,
        "rl.zero_stage": 0,
    }
    argv = ["run", str(packaged_config("paper")), "--no-progress"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    assert cli.main(argv) == 0
    pairs = [json.loads(x) for x in (out / "iter_1" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 12
    for p in pairs:  # CoT through `run`: both orders' rationales are in the label file
        assert isinstance(p["rationales"], list) and len(p["rationales"]) == 2
        assert all(isinstance(r, str) for r in p["rationales"])
    config = json.loads((out / "config.json").read_text())
    assert config["chain_of_thought"] is True and config["rationale_tokens"] == 3
    assert config["rm_optimizer"] == "adafactor" and config["rl"]["optimizer"] == "adafactor"
    ev = json.loads((out / "iter_1" / "eval.json").read_text())
    assert 0.0 <= ev["harmless_rate"] <= 1.0 and 0.0 <= ev["harmless_rate_baseline"] <= 1.0
    assert ev["lc_win_rate"] is None or 0.0 <= ev["lc_win_rate"] <= 1.0
    # checkpoint selection: the final policy and the checkpoints after steps 1 and 2, the best one kept
    names = [c["checkpoint"] for c in ev["checkpoints"]]
    assert names == ["iter_1/rl/final", "iter_1/rl/policies/step_000001", "iter_1/rl/policies/step_000002"]
    best = max(ev["checkpoints"], key=lambda c: c["win_rate"])
    assert ev["win_rate"] == best["win_rate"] and not math.isnan(ev["win_rate"])
    assert ev["best_checkpoint"] in names
    # the dashboard (from the label file) agrees with the label stage's record (from the labels in memory)
    dash = json.loads((out / "report.json").read_text())["labeler_dashboard"]
    label = json.loads((out / "iter_1" / "label.json").read_text())
    assert dash[0]["position_bias"] == pytest.approx(label["position_bias"])
    assert dash[0]["mean_entropy"] == pytest.approx(label["mean_entropy"])
    assert dash[0]["alignment"] == pytest.approx(label["alignment"])
    assert "## Labeler dashboard" in (out / "report.md").read_text()
    judged = [json.loads(x) for x in (out / "iter_1" / "human_pairs.jsonl").read_text().splitlines()]
    assert [r["human_a"] for r in judged] == [1, 0] and all(0.0 <= r["p_a"] <= 1.0 for r in judged)
    agree = sum((r["p_a"] > 0.5) == (r["human_a"] == 1) for r in judged) / 2
    assert dash[0]["alignment_human"] == pytest.approx(agree) and dash[0]["alignment_human_pairs"] == 2
    assert (out / "labeler_dashboard.png").read_bytes()[:4] == b"\x89PNG"
