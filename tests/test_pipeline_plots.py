"""plots.py draws reward, KL, entropy and win rate from metrics.jsonl into a PNG; report.py renders it."""

import json

import pytest

from rlaif_fast.pipeline import plots


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_file_is_produced_from_two_iterations(tmp_path):
    rows = []
    for it in (1, 2):
        rows += [
            {"iteration": it, "step": s, "reward": 0.1 * s, "kl": 0.01 * s, "entropy": 3.0 - 0.1 * s}
            for s in range(1, 6)
        ]
        rows.append({"iteration": it, "kind": "eval", "win_rate": 0.5 + 0.1 * it, "gt_policy": 0.3})
    _write(tmp_path / "metrics.jsonl", rows)
    series, evals = plots.read_metrics(tmp_path / "metrics.jsonl")
    assert [x for x, _ in series["reward"]] == list(range(1, 11))  # steps laid end to end
    assert [e["win_rate"] for e in evals] == pytest.approx([0.6, 0.7])
    png = plots.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "out" / "metrics.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_damaged_or_missing_metrics_are_reported(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        plots.read_metrics(tmp_path / "none.jsonl")
    (tmp_path / "m.jsonl").write_text('{"reward": 1}\n{"reward": \n')
    with pytest.raises(ValueError, match=r"m.jsonl:2 is not JSON"):
        plots.read_metrics(tmp_path / "m.jsonl")
