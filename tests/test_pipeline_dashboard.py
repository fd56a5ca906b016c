"""The labeler dashboard's figures equal a recomputation from the label files, written here by hand."""

import json
import math

import pytest

from rlaif_fast.pipeline import dashboard as D
from rlaif_fast.pipeline import report


def _pair(p_ab, p_ba, **extra):
    p = (p_ab + p_ba) / 2
    h = -sum(x * math.log(x) for x in (p, 1 - p) if x > 0)
    row = {"context": "c", "response_a": "a", "response_b": "b", "p_a": p, "p_a_ab": p_ab, "p_a_ba": p_ba}
    return {**row, "consistent": (p_ab > 0.5) == (p_ba > 0.5), "entropy": h, **extra}


ITER1 = [
    _pair(0.9, 0.7, reference_a=1.0, human_a=1),  # consistent, a
    _pair(0.8, 0.3, reference_a=0.0),  # inconsistent: a won shown first, b won shown first -> first position
    _pair(0.2, 0.6, reference_a=1.0, human_a=0),  # inconsistent: b won shown first... -> second position
    _pair(0.55, 0.51, reference_a=0.5),  # consistent; reference tie: left out of alignment
    {**_pair(0.5, 0.5), "p_a": float("nan")},  # the labeler failed: left out of everything
    _pair(0.1, 0.2, reference_a=0.0, human_a=0),  # consistent, b
]
ITER2 = [_pair(0.95, 0.9, reference_a=1.0), _pair(0.6, 0.45, reference_a=1.0)]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    # a blank line in the middle: line numbers in the links must still be the file's
    text = (
        "".join(json.dumps(r) + "\n" for r in rows[:2])
        + "\n"
        + "".join(json.dumps(r) + "\n" for r in rows[2:])
    )
    path.write_text(text)


def test_dashboard_equals_a_recomputation_from_the_label_files(tmp_path):
    _write(tmp_path / "iter_1" / "pairs.jsonl", ITER1)
    _write(tmp_path / "iter_2" / "pairs.jsonl", ITER2)
    # the run's human-labeled pairs, labeled by the AI labeler (human_pairs): 2 agree out of 3, one failed
    human = [_pair(0.9, 0.8, human_a=1), _pair(0.3, 0.2, human_a=1), _pair(0.1, 0.4, human_a=0)]
    human.append({**_pair(0.5, 0.5, human_a=1), "p_a": float("nan")})
    _write(tmp_path / "iter_2" / "human_pairs.jsonl", human)
    rows = D.build_dashboard(tmp_path, iterations=3)  # iteration 3 has no label file yet: left out
    assert [r["iteration"] for r in rows] == [1, 2]
    one, two = rows

    valid = [r for r in ITER1 if not math.isnan(r["p_a"])]
    assert (one["pairs"], one["failed"]) == (6, 1)
    assert one["position_bias"] == pytest.approx(2 / 5) and one["consistency"] == pytest.approx(3 / 5)
    # P(first shown wins): order (a, b) -> p_a_ab; order (b, a) -> 1 - p_a_ba
    firsts = [0.9, 0.3, 0.8, 0.7, 0.2, 0.4, 0.55, 0.49, 0.1, 0.8]
    assert one["p_first"] == pytest.approx(sum(firsts) / 10)
    assert one["favours"] == ("first" if sum(firsts) / 10 > 0.5 else "second")
    assert (one["same_position_first"], one["same_position_second"]) == (1, 1)
    assert one["mean_entropy"] == pytest.approx(sum(r["entropy"] for r in valid) / 5)
    assert one["confidence"] == pytest.approx(sum(abs(2 * r["p_a"] - 1) for r in valid) / 5)
    # reference: pairs 1 (0.8 vs 1: yes), 2 (0.55 vs 0: no), 3 (0.4 vs 1: no), 6 (0.15 vs 0: yes); 4 ties
    assert (one["alignment"], one["alignment_pairs"]) == (pytest.approx(0.5), 4)
    # human: pairs 1 (yes), 3 (0.4 vs 0: yes), 6 (yes)
    assert (one["alignment_human"], one["alignment_human_pairs"]) == (pytest.approx(1.0), 3)
    assert (two["alignment_human"], two["alignment_human_pairs"]) == (pytest.approx(2 / 3), 3)
    assert all(v is None for v in one["drift"].values())
    for f in ("position_bias", "p_first", "mean_entropy", "confidence", "alignment"):
        assert two["drift"][f] == pytest.approx(two[f] - one[f]), f

    # least sure: p_a closest to 0.5, each link pointing at its own line of the file
    lines = (tmp_path / "iter_1" / "pairs.jsonl").read_text().splitlines()
    got = [p["p_a"] for p in one["least_sure"]]
    assert got == sorted(got, key=lambda p: abs(p - 0.5))
    assert got[0] == pytest.approx(0.53) and len(got) == 5
    for p in one["least_sure"]:
        assert p["link"] == f"iter_1/pairs.jsonl#L{p['line']}"
        assert json.loads(lines[p["line"] - 1])["p_a"] == p["p_a"]

    md = D.render_dashboard(rows)
    assert "## Labeler dashboard" in md and "(iter_1/pairs.jsonl#L" in md
    assert "| 2 | 100.0% (+50.0 pt) |" in md  # iteration 2's alignment and its drift
    png = D.plot_dashboard(rows, tmp_path / "labeler_dashboard.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_embeds_the_dashboard(tmp_path):
    _write(tmp_path / "iter_1" / "pairs.jsonl", ITER1)
    rep = {
        "labeler": "demo",
        "feedback": "distilled",
        "algorithm": "reinforce_baseline",
        "iterations": 1,
        **dict.fromkeys(
            [
                "labeler_alignment",
                "labeler_position_bias",
                "rm_accuracy_ai",
                "rm_accuracy_gt",
                "win_rate_vs_sft",
            ]
        ),
        **dict.fromkeys(["gt_win_rate_vs_sft", "gt_sft", "gt_policy"]),
        "per_iteration": [],
        "examples": [],
        "labeler_dashboard": D.build_dashboard(tmp_path, 1),
    }
    assert "Least sure pairs, iteration 1" in report.render_markdown(rep)
