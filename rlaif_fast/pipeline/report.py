"""The run's report: what the paper measures (section 3.3), from the stage records of a finished run.

- AI labeler alignment: binarized debiased soft label vs the ground truth's choice (the paper compares
  against human choices; the embedded task has an exact ground truth instead).
- Position bias: share of pairs whose two orders disagreed (the labeler picked the same position).
- Reward model accuracy: pairwise, on held-out pairs, against the AI labels and against the ground truth.
- Win rate of the final policy against SFT, judged by the labeler in both orders (ties split).
- Ground-truth score of SFT and of the final policy on the same held-out prompts.
- d-RLAIF (``feedback: direct``): the labeler's mean rescaled score and its Pearson and Spearman
  correlation with the ground truth over the first iteration's sampled responses.
"""

from __future__ import annotations

import json
from pathlib import Path


def build_report(result: dict, cfg) -> dict:
    """A flat dict of the headline numbers plus one row per iteration."""
    its = result["iterations"]
    if not its:
        raise ValueError("the run has no finished iteration to report on; set iterations >= 1")
    first, last = its[0], its[-1]
    rep = {
        "labeler": cfg.labeler,
        "feedback": cfg.feedback,
        "algorithm": last["rl"]["summary"].get("algorithm") or cfg.rl.get("algorithm", "reinforce_baseline"),
        "iterations": len(its),
        "labeler_alignment": first["label"].get("alignment"),
        "labeler_position_bias": first["label"]["position_bias"],
        "rm_accuracy_ai": last.get("rm", {}).get("acc_ai_held_out"),
        "rm_accuracy_gt": last.get("rm", {}).get("acc_gt_held_out"),
        "win_rate_vs_sft": last["eval"]["win_rate"],
        "gt_sft": last["eval"].get("gt_baseline"),
        "gt_policy": last["eval"].get("gt_policy"),
        "gt_win_rate_vs_sft": last["eval"].get("gt_win_rate"),
        "labeler_score_mean": first["label"].get("mean_score"),
        "labeler_score_gt_pearson": first["label"].get("score_gt_pearson"),
        "labeler_score_gt_spearman": first["label"].get("score_gt_spearman"),
        "per_iteration": [
            {
                "iteration": it["iteration"],
                "alignment": it["label"].get("alignment"),
                "position_bias": it["label"]["position_bias"],
                "rm_accuracy_ai": it.get("rm", {}).get("acc_ai_held_out"),
                "rm_accuracy_gt": it.get("rm", {}).get("acc_gt_held_out"),
                # the trainer's step count: history has one row per logged step (rl: log_every)
                "rl_steps": it["rl"]["summary"].get("steps", len(it["rl"]["history"])),
                "final_reward": it["rl"]["history"][-1].get("reward") if it["rl"]["history"] else None,
                "final_kl": it["rl"]["history"][-1].get("kl") if it["rl"]["history"] else None,
                "win_rate": it["eval"]["win_rate"],
                "gt_policy": it["eval"].get("gt_policy"),
            }
            for it in its
        ],
        "lc_win_rate_vs_sft": last["eval"].get("lc_win_rate"),
        "harmless_rate": last["eval"].get("harmless_rate"),
        "harmless_rate_sft": last["eval"].get("harmless_rate_baseline"),
        "best_checkpoint": last["eval"].get("best_checkpoint"),
        "examples": last["eval"].get("examples", []),
    }
    if rep["gt_sft"] is not None:
        rep["gt_improved"] = rep["gt_policy"] > rep["gt_sft"]
    return rep


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{100 * x:.1f}%" if pct else f"{x:+.3f}"


def render_markdown(rep: dict) -> str:
    lines = [
        "# RLAIF run report",
        "",
        f"Labeler `{rep['labeler']}`, feedback `{rep['feedback']}`, RL `{rep['algorithm']}`, "
        f"{rep['iterations']} iteration(s).",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| AI labeler alignment with the ground truth | {_fmt(rep['labeler_alignment'], True)} |",
        f"| labeler position-bias rate (orders disagree) | {_fmt(rep['labeler_position_bias'], True)} |",
        f"| reward model accuracy, held out, vs AI labels | {_fmt(rep['rm_accuracy_ai'], True)} |",
        f"| reward model accuracy, held out, vs ground truth | {_fmt(rep['rm_accuracy_gt'], True)} |",
        f"| win rate vs SFT (AI labeler, both orders) | {_fmt(rep['win_rate_vs_sft'], True)} |",
        f"| win rate vs SFT (ground truth) | {_fmt(rep['gt_win_rate_vs_sft'], True)} |",
        f"| length-controlled win rate vs SFT (AI labeler) | {_fmt(rep.get('lc_win_rate_vs_sft'), True)} |",
        f"| ground-truth score, SFT | {_fmt(rep['gt_sft'])} |",
        f"| ground-truth score, after RL | {_fmt(rep['gt_policy'])} |",
    ]
    if "gt_improved" in rep:
        lines.append(f"| ground truth improved | {_fmt(rep['gt_improved'])} |")
    if rep.get("harmless_rate") is not None:
        lines.append(
            f"| harmless rate, policy / SFT | {_fmt(rep['harmless_rate'], True)} / "
            f"{_fmt(rep['harmless_rate_sft'], True)} |"
        )
    if rep.get("best_checkpoint"):
        lines.append(f"| RL checkpoint selected by labeler win rate | `{rep['best_checkpoint']}` |")
    if rep.get("feedback") == "direct":
        lines += [
            f"| d-RLAIF score, mean (in [-1, 1]) | {_fmt(rep['labeler_score_mean'])} |",
            f"| d-RLAIF score vs ground truth, Pearson | {_fmt(rep['labeler_score_gt_pearson'])} |",
            f"| d-RLAIF score vs ground truth, Spearman | {_fmt(rep['labeler_score_gt_spearman'])} |",
        ]
    lines += [
        "",
        "| iteration | alignment | position bias | RM acc (AI) | RM acc (gt) | RL steps | win rate | gt |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rep["per_iteration"]:
        lines.append(
            f"| {r['iteration']} | {_fmt(r['alignment'], True)} | {_fmt(r['position_bias'], True)} | "
            f"{_fmt(r['rm_accuracy_ai'], True)} | {_fmt(r['rm_accuracy_gt'], True)} | {r['rl_steps']} | "
            f"{_fmt(r['win_rate'], True)} | {_fmt(r['gt_policy'])} |"
        )
    if rep["examples"]:
        lines += ["", "Samples on held-out prompts (policy / SFT):", ""]
        for e in rep["examples"]:
            lines.append(f"- `{e['prompt']}` -> `{e['policy']}` / `{e['baseline']}`")
    text = "\n".join(lines) + "\n"
    if rep.get("labeler_dashboard"):
        from rlaif_fast.pipeline.dashboard import render_dashboard

        text += "\n" + render_dashboard(rep["labeler_dashboard"])
    return text


def write_report(rep: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "report.md", out_dir / "report.json"
    md.write_text(render_markdown(rep))
    js.write_text(json.dumps(rep, indent=2) + "\n")
    return md, js
