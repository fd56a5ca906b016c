"""Data-parallel invariance: 2 CPU ranks over gloo with ZeRO-2 and ZeRO-3 (and ZeRO-3 with token-budget
micro-batches planned per rank or across ranks) equal 1 rank, same global batch; a NaN loss on one rank
stops both.

One torchrun launch runs both stages (tests/dist/dp_invariance.py); the 1-rank run happens in this
process. Plain SGD, so a gradient of the wrong scale (e.g. a per-rank token mean) would show.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from helpers import free_port, run_torchrun  # noqa: E402
from toy import PROMPTS, hf_char_tokenizer, invariance_run, tiny_gpt2  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = Path(__file__).resolve().parent / "dist" / "dp_invariance.py"


def test_two_ranks_zero2_and_zero3_equal_one_rank(tmp_path):
    run_torchrun(SCRIPT, str(tmp_path), nproc=2, timeout=400)
    one_rank, one_history = invariance_run(zero_stage=0)
    init = tiny_gpt2().state_dict()
    step = max(
        (one_rank[k] - init[k[len("policy.") :]]).abs().max().item()
        for k in one_rank
        if k.startswith("policy.")
    )
    assert step > 1e-3  # two real updates happened
    for stage in (2, 3):
        got = torch.load(tmp_path / f"zero{stage}.pt", weights_only=False)
        diff = max((got["params"][k] - v).abs().max().item() for k, v in one_rank.items())
        assert diff <= 1e-5 * step, (
            f"ZeRO-{stage} on 2 ranks differs from 1 rank by {diff:.3e} (update {step:.3e})"
        )
        for want, have in zip(one_history, got["history"]):
            for key in ("reward", "kl", "response_len", "policy_loss", "value_loss"):
                # fp32 sums in another order: losses near 0 carry ~1e-7 absolute noise
                assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (stage, key)
    # token-budget micro-batches planned per rank: different counts, padded with empty ones, same update
    budget = torch.load(tmp_path / "zero3_budget_per_rank.pt", weights_only=False)
    assert budget["empty_microbatches"] > 0  # the ranks' plans differed: the padding path ran
    assert budget["moved_rows"] == 0
    # planned over both ranks together: rows cross ranks with their data, and the update is still 1 rank's
    balanced = torch.load(tmp_path / "zero3_budget_global.pt", weights_only=False)
    assert balanced["moved_rows"] > 0, balanced["moved_rows"]
    for name, run in (("per_rank", budget), ("global", balanced)):
        diff = max((run["params"][k] - v).abs().max().item() for k, v in one_rank.items())
        assert diff <= 1e-5 * step, f"ZeRO-3 with a {name} token budget differs from 1 rank by {diff:.3e}"
        for want, have in zip(one_history, run["history"]):
            for key in ("policy_loss", "value_loss", "clip_frac", "approx_kl"):
                assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (name, key)
    sampled = torch.load(tmp_path / "zero3_sampled.pt", weights_only=False)["history"][0]
    assert all(v == v for v in sampled.values())  # finished (no rank hung at EOS) with finite metrics
    # a NaN loss on rank 1 only: both ranks stop with NonFiniteError instead of rank 0 hanging
    sharded = torch.load(tmp_path / "ref_sharded.pt", weights_only=False)
    assert sharded["partitioned"], sharded  # the reference is not copied whole onto every rank
    assert sharded["local_numel"] <= sharded["full_numel"] // 2 + 64, sharded
    messages = torch.load(tmp_path / "nan_one_rank.pt", weights_only=False)["messages"]
    assert all("step 0: non-finite loss" in m for m in messages), messages
    assert "rank 1" in messages[1] and "other rank" in messages[0], messages


def test_deepspeed_launcher_runs_the_cli(tmp_path):
    """`deepspeed --module rlaif_fast.cli train ...` on 2 CPU ranks: the launcher puts --local_rank=N
    before the subcommand (the CLI drops it), and both ranks train and checkpoint their ZeRO-2 shards."""
    policy = tmp_path / "policy"
    tiny_gpt2(vocab=14).save_pretrained(policy)
    hf_char_tokenizer().save_pretrained(policy)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:8]))
    toy = Path(__file__).resolve().parent / "dist" / "toy.py"
    out = tmp_path / "out"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [
        *([str(launcher)] if launcher.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "rlaif_fast.cli",
        "train",
        *("--policy", str(policy), "--prompts", str(prompts), "--reward", f"{toy}:count_a"),
        *("--algorithm", "rloo", "--group-size", "2", "--batch-size", "4", "--max-new-tokens", "4"),
        *("--micro-batch-size", "1", "--zero-stage", "2", "--output-dir", str(out), "--no-progress"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"deepspeed launcher failed\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped"] == "completed", summary
    state = out / "checkpoints" / "step_000004" / "state"
    shards = sorted(p.name for p in state.glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], shards


def test_cli_drops_launcher_local_rank(monkeypatch):
    from rlaif_fast import cli

    monkeypatch.setenv("LOCAL_RANK", "x")  # recorded, so teardown restores the original environment
    monkeypatch.delenv("LOCAL_RANK")
    argv = ["--local_rank=1", "train", "--policy", "p", "--local-rank", "1", "--zero-stage", "2"]
    assert cli._strip_launcher_args(argv) == ["train", "--policy", "p", "--zero-stage", "2"]
    assert os.environ["LOCAL_RANK"] == "1"


# -------------------- two ranks: a dataclass in the reward file, an error on one rank, ZeRO-3 resume and reference


SCENARIOS = Path(__file__).resolve().parent / "dist" / "rank_scenarios.py"


def test_cli_reward_file_may_define_a_dataclass(tmp_path):
    """--reward rewards.py:Score with Score a dataclass (a class is instantiated without arguments): the
    file was executed outside sys.modules, where dataclasses cannot resolve string annotations."""
    from rlaif_fast.trainer.cli import load_callable

    path = tmp_path / "rewards.py"
    path.write_text(
        "from __future__ import annotations\n"
        "import dataclasses\n\n\n"
        "@dataclasses.dataclass\n"
        "class Score:\n"
        "    scale: float = 2.0\n\n"
        "    def __call__(self, prompts, completions):\n"
        "        return [self.scale * len(c) for c in completions]\n"
    )
    assert load_callable(f"{path}:Score")(["p"], ["abc"]) == [6.0]


@pytest.mark.slow
@pytest.mark.distributed
def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    """An empty prompt in rank 1's slice, a reward raising or giving the wrong count on rank 1, an empty
    response given to learn() on rank 1: rank 0 used to wait in the step's next collective (here until a
    15 s timeout; with NCCL, 30 minutes) instead of stopping with rank 1."""
    run_torchrun(SCENARIOS, "failures", str(tmp_path), timeout=300)
    other = "failed on 1 other rank(s)"
    want = {
        "empty_prompt": ("encodes to no tokens", "encodes to no tokens"),
        "reward_raises": (other, "ConnectionError: labeler unreachable"),
        "reward_count": (other, "the reward gave 1 scores for 2 completions"),
        "empty_response": (other, "rollout 1 has an empty response"),
    }
    for case, expected in want.items():
        for rank, text in enumerate(expected):
            got = (tmp_path / f"{case}_rank{rank}.txt").read_text()
            assert text in got, (case, rank, got)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_checkpoint_on_two_ranks_resumes_exactly(tmp_path):
    """ZeRO-3 PPO with a value model: every rank writes its shard and RNG; stopping after 2 of 4 steps and
    resuming gives the uninterrupted run's metrics and weights; final/ holds the full gathered policy."""
    from transformers import GPT2LMHeadModel

    run_torchrun(SCENARIOS, "zero3_resume", str(tmp_path), timeout=300)
    r = torch.load(tmp_path / "zero3_resume.pt", weights_only=False)
    assert r["first_stopped"] == "interrupted" and r["resumed_from"] == 2
    folder = tmp_path / "b" / "checkpoints" / "step_000002"
    assert sorted(p.name for p in folder.glob("trainer_rank*.pt")) == ["trainer_rank0.pt", "trainer_rank1.pt"]
    shards = sorted(p.name for p in (folder / "state").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], shards
    assert [h["step"] for h in r["resumed"]] == [3, 4]
    for want, got in zip(r["full"][2:], r["resumed"]):
        for key in ("reward", "kl", "policy_loss", "value_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert max((r["want"][k] - r["got"][k]).abs().max().item() for k in r["want"]) == 0.0
    final = GPT2LMHeadModel.from_pretrained(tmp_path / "a" / "final").state_dict()
    moved = 0.0
    for k, v in final.items():
        if "policy." + k in r["want"]:
            assert torch.equal(v, r["want"]["policy." + k]), k
            moved = max(moved, (v - r["init"][k]).abs().max().item())
    assert moved > 1e-4  # the weights compared are trained ones


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_json_zero3_shards_the_reference(tmp_path):
    """zero_optimization.stage=3 from the DeepSpeed JSON (whose keys win over zero_stage): the KL reference
    was copied whole onto every rank, because prepare_frozen read the config's zero_stage=0."""
    run_torchrun(SCENARIOS, "json_zero3", str(tmp_path), timeout=300)
    r = torch.load(tmp_path / "json_zero3.pt", weights_only=False)
    assert r["stage"] == 3
    assert r["partitioned"], r
    assert r["kl"] == r["kl"]  # scored through the sharded reference
