"""Evaluation as in the RLAIF paper (arXiv 2309.00267, section 3.3): win rate against the SFT policy.

For each evaluation prompt both policies write one response; the AI labeler judges the pair in BOTH
orders (``PairwiseLabeler`` averages P(policy first wins) and P(policy second wins) into a debiased
soft label). A pair counts 1 when the debiased label prefers the policy, 0 when it prefers SFT, and 1/2
when it is exactly 0.5 (identical responses, or a labeler that flips with the order symmetrically).
A pair the labeler failed on (NaN label) is neither: it is left out of the rates and counted as failed.
Where the task has a ground truth, the mean ground-truth score of both policies is reported too.
``rlaif-fast eval CONFIG.yaml [--policy DIR] [--baseline DIR]`` runs this on a finished run.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

EMPTY = "(empty)"  # what the labeler sees for a response that stopped at once: it cannot judge ""


def visible(completions: Sequence[str]) -> list[str]:
    """Completions as shown to the labeler: an empty one becomes ``(empty)`` (PairwiseLabeler rejects "")."""
    return [c if c.strip() else EMPTY for c in completions]


def win_rate(labels) -> float:
    """Mean over pairs of 1 (p_a > 0.5), 0 (p_a < 0.5) or 1/2 (p_a == 0.5): ties split evenly. Pairs the
    labeler failed on (NaN p_a) are left out: they are neither wins, losses nor ties."""
    if not labels:
        raise ValueError("win_rate needs at least one labeled pair")
    valid = [lab for lab in labels if math.isfinite(lab.p_a)]
    if not valid:
        raise ValueError(f"the labeler failed on all {len(labels)} pairs (NaN labels); there is no win rate")
    return sum(1.0 if lab.p_a > 0.5 else 0.0 if lab.p_a < 0.5 else 0.5 for lab in valid) / len(valid)


def prompt_budget(policy, max_prompt_len: int, max_new_tokens: int) -> int:
    """``max_prompt_len`` capped so that prompt + ``max_new_tokens`` fit the policy's positions (a GPT-2
    indexes past its position table otherwise); prompts keep their last tokens."""
    from rlaif_fast.ops.model import context_length

    limit = context_length(getattr(policy, "config", None))
    if limit is None:
        return max_prompt_len
    if limit <= max_new_tokens:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the policy's {limit} positions; "
            "lower max_new_tokens"
        )
    return min(max_prompt_len, limit - max_new_tokens)


@torch.no_grad()
def sample_completions(
    policy,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    max_prompt_len: int = 256,
    device=None,
) -> list[str]:
    """One sampled completion per prompt, with a fixed seed so two evaluations see the same randomness.
    Prompts keep their last ``max_prompt_len`` tokens, fewer where the policy's context needs it.
    ``device``: where the policy is (default: where its parameters are)."""
    from rlaif_fast.trainer.sampling import sample

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = sample(
            policy,
            tokenizer,
            list(prompts),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=1.0,
            max_prompt_len=prompt_budget(policy, max_prompt_len, max_new_tokens),
            device=device if device is not None else next(policy.parameters()).device,
        )
    finally:
        torch.random.set_rng_state(state)  # evaluation must not shift the training RNG stream
    return out.completions


def compare(
    labeler,
    prompts: Sequence[str],
    policy_out: Sequence[str],
    baseline_out: Sequence[str],
    ground_truth: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None,
) -> dict:
    """Judge ``policy_out`` against ``baseline_out`` (one each per prompt) with ``labeler`` in both orders.

    Returns win_rate (ties split), mean_p_policy (mean debiased soft label), position_bias (share of pairs
    whose two orders disagreed), all three over the pairs the labeler did not fail on (NaN labels, counted in
    failed_pairs), and, with ``ground_truth``, gt_policy / gt_baseline (mean scores) and gt_win_rate (the same win rate judged by the ground truth, ties split).
    """
    if not (len(prompts) == len(policy_out) == len(baseline_out)):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(policy_out)} policy and {len(baseline_out)} "
            "baseline completions; give one of each per prompt"
        )
    labels = labeler.label(list(prompts), visible(policy_out), visible(baseline_out))
    return summarize(prompts, policy_out, baseline_out, labels, ground_truth)


def summarize(prompts, policy_out, baseline_out, labels, ground_truth=None) -> dict:
    """The numbers of :func:`compare` from labels already made (one ``PairLabel`` per prompt, policy as a),
    plus the length-controlled win rate (:func:`length_controlled_win_rate`)."""
    valid = [lab for lab in labels if math.isfinite(lab.p_a)]
    out = {
        "pairs": len(labels),
        "failed_pairs": len(labels) - len(valid),
        "win_rate": win_rate(labels),
        "mean_p_policy": sum(lab.p_a for lab in valid) / len(valid),
        "position_bias": sum(not lab.consistent for lab in valid) / len(valid),
    }
    keep = [i for i, lab in enumerate(labels) if math.isfinite(lab.p_a)]
    out["lc_win_rate"] = length_controlled_win_rate(
        [_outcome(labels[i].p_a) for i in keep],
        [len(policy_out[i]) - len(baseline_out[i]) for i in keep],
    )
    if ground_truth is not None:
        g_pol = ground_truth(prompts, policy_out)
        g_base = ground_truth(prompts, baseline_out)
        out["gt_policy"] = sum(g_pol) / len(g_pol)
        out["gt_baseline"] = sum(g_base) / len(g_base)
        out["gt_win_rate"] = sum(
            1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(g_pol, g_base)
        ) / len(g_pol)
    return out


def _outcome(p_a: float) -> float:
    return 1.0 if p_a > 0.5 else 0.0 if p_a < 0.5 else 0.5


def length_controlled_win_rate(outcomes: Sequence[float], length_diffs: Sequence[float]) -> float | None:
    """The win rate with the effect of response length taken out (in the spirit of AlpacaEval's
    length-controlled win rate): fit P(win) = sigmoid(a + b * d) by maximum likelihood, d the policy's length
    minus the baseline's (in characters, scaled by their standard deviation), outcomes 1 / 0 / 1/2; report
    sigmoid(a), the win rate of a policy whose responses are as long as the baseline's. A labeler that only
    rewards length gives 0.5. None without pairs; the plain win rate when the lengths never differ. A small
    ridge (1e-3) keeps the fit finite when wins separate perfectly by length."""
    if not outcomes:
        return None
    y = torch.tensor(outcomes, dtype=torch.float64)
    d = torch.tensor(length_diffs, dtype=torch.float64)
    sd = d.std(unbiased=False) if len(d) > 1 else torch.tensor(0.0, dtype=torch.float64)
    x = torch.stack([torch.ones_like(d), d / sd if sd > 0 else torch.zeros_like(d)], dim=1)  # (n, 2)
    w = torch.zeros(2, dtype=torch.float64)
    ridge = 1e-3 * torch.eye(2, dtype=torch.float64)
    for _ in range(50):  # Newton's method on the (convex) logistic log-likelihood
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) + ridge @ w
        hess = (x * (p * (1 - p)).unsqueeze(1)).T @ x + ridge
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if step.abs().max() < 1e-10:
            break
    return float(torch.sigmoid(w[0]))


def evaluate_policy(
    policy,
    baseline,
    tokenizer,
    labeler,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    ground_truth=None,
    max_prompt_len: int = 256,
) -> dict:
    """Sample from ``policy`` and ``baseline`` on ``prompts`` (same seed), then :func:`compare` them."""
    kw = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, max_prompt_len=max_prompt_len
    )
    pol = sample_completions(policy, tokenizer, prompts, **kw)
    base = sample_completions(baseline, tokenizer, prompts, **kw)
    result = compare(labeler, prompts, pol, base, ground_truth)
    result["examples"] = [
        {"prompt": p, "policy": a, "baseline": b} for p, a, b in list(zip(prompts, pol, base))[:5]
    ]
    return result


def main(argv: list[str] | None = None) -> int:
    """``rlaif-fast eval CONFIG.yaml``: the last iteration's policy (or --policy) against SFT (or --baseline)."""
    from rlaif_fast.cli import user_error
    from rlaif_fast.pipeline import run as run_mod
    from rlaif_fast.pipeline.config import RunConfig

    ap = argparse.ArgumentParser(prog="rlaif-fast eval", description=__doc__.split("\n")[0])
    ap.add_argument(
        "config", help="the run's YAML config (its output_dir holds the policies and the labeler)"
    )
    ap.add_argument("--policy", help="policy directory (default: the run's last trained policy)")
    ap.add_argument("--baseline", help="baseline policy directory (default: the run's SFT policy)")
    ap.add_argument("--n", type=int, help="responses per policy (default: the config's eval_prompts)")
    ap.add_argument("--out", help="write the result as JSON here too")
    args = ap.parse_args(argv)
    try:
        cfg = RunConfig.from_yaml(args.config)
        run_mod.check_policy(cfg)
        run = run_mod.Run(cfg, progress=False)
        policy_dir = Path(args.policy) if args.policy else run.latest_policy_dir()
        baseline_dir = Path(args.baseline) if args.baseline else run.sft_dir()
        n = args.n if args.n is not None else cfg.eval_prompts
        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        for name, d in (("--policy", policy_dir), ("--baseline", baseline_dir)):
            if d is None or not Path(d).is_dir():
                raise ValueError(
                    f"{name} directory {str(d)!r} does not exist; run `rlaif-fast run {args.config}` "
                    "first or pass the directory"
                )
    except (ValueError, TypeError, OSError) as exc:  # OSError: a policy's tokenizer that cannot load
        return user_error("rlaif-fast eval", exc)
    result = run.evaluate(run_mod.load_policy(policy_dir), run_mod.load_policy(baseline_dir), n=n)
    result.pop("examples", None)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0
