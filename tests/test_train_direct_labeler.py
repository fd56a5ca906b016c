"""d-RLAIF through `rlaif-fast train`: ``--reward labeler:hf:PATH`` makes the labeler's rescaled 1-10 rating the
reward, and RL against it raises the labeler's mean rating of the policy's responses."""

import json

import pytest

from rlaif_fast import cli
from rlaif_fast.pipeline import task as T
from rlaif_fast.pipeline.sft import build_policy


def _mean_score(policy_dir, labeler_dir, template, prompts):
    from rlaif_fast.pipeline import evaluate as ev
    from rlaif_fast.pipeline.models import direct_reward, load_policy

    reward = direct_reward(f"labeler:hf:{labeler_dir}", template)
    tok = T.build_tokenizer()
    out = ev.sample_completions(
        load_policy(policy_dir), tok, prompts, max_new_tokens=6, temperature=1.0, seed=7
    )
    return sum(reward(prompts, out)) / len(out)


@pytest.mark.slow
def test_train_with_a_labeler_reward_raises_the_labelers_score(tmp_path, capsys):
    from rlaif_fast.pipeline.config import packaged_config

    template = str(packaged_config("demo").parent / "demo_template.yaml")
    tok = T.build_tokenizer()
    policy = build_policy(len(tok), dim=32, layers=1, seed=0)
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    from rlaif_fast.feedback import load_template
    from rlaif_fast.pipeline.labeler_model import train_labeler

    tpl = load_template(template)  # a tiny labeler that rates happy sentences (briefly trained)
    labeler = train_labeler(
        tpl.render_pairwise, tok, dim=32, steps=200, seed=1, progress=False, render_score=tpl.render_score
    )
    labeler.save_pretrained(tmp_path / "labeler")
    tok.save_pretrained(tmp_path / "labeler")
    prompts = [f"write a happy sentence about the {w} :" for w in ("dog", "sea", "park", "song")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    before = _mean_score(tmp_path / "policy", tmp_path / "labeler", template, prompts * 16)
    argv = ["train", "--policy", str(tmp_path / "policy"), "--prompts", str(tmp_path / "p.jsonl")]
    argv += ["--reward", f"labeler:hf:{tmp_path / 'labeler'}", "--labeler-template", template]
    argv += ["--algorithm", "rloo", "--group-size", "4", "--batch-size", "16", "--micro-batch-size", "16"]
    argv += ["--kl-coef", "0", "--learning-rate", "0.02", "--total-steps", "12", "--max-new-tokens", "6"]
    argv += ["--output-dir", str(tmp_path / "rl"), "--no-progress", "--no-tensorboard"]
    assert cli.main(argv) == 0
    after = _mean_score(tmp_path / "rl" / "final", tmp_path / "labeler", template, prompts * 16)
    assert after > before + 0.05, (before, after)

    # a bad labeler spec is refused before any model loads, naming the forms it takes
    bad = [x if not x.startswith("labeler:hf:") else "labeler:nope:x" for x in argv]
    assert cli.main(bad) == 2
    assert "labeler:hf:PATH or labeler:http:URL" in capsys.readouterr().err
