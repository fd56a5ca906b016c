"""rlaif_fast.trainer.logging: the end-of-run summary across resumes, and plots without matplotlib."""

import sys
import warnings

import pytest

from rlaif_fast.trainer.logging import MetricsLogger, plot_metrics


def _segment(out, initial, steps):
    logger = MetricsLogger(out, enabled=True, tensorboard=False, progress=False, total=4, initial=initial)
    for step in steps:
        logger.log(step, {"reward": float(step), "tokens": 100, "step_seconds": float(step)})
    return logger


def test_summary_after_a_resume_covers_the_whole_run(tmp_path):
    first = _segment(tmp_path, 0, [1, 2, 3])  # killed after step 3, checkpoint at step 2
    first.close()
    second = _segment(tmp_path, 2, [3, 4])
    summary = second.summary(4, "completed")
    second.close()
    assert [h["step"] for h in second.history] == [3, 4]  # this process's steps
    assert (summary["reward_first"], summary["reward_last"], summary["resumed_at"]) == (1.0, 4.0, 2)
    assert summary["tokens_per_s"] == pytest.approx(400 / (1 + 2 + 3 + 4))  # step 3 of the killed run redone


def test_without_matplotlib_the_plot_is_skipped_with_one_warning(tmp_path, monkeypatch):
    import rlaif_fast.trainer.logging as logging_mod
    from rlaif_fast.pipeline import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(logging_mod, "_warned_no_matplotlib", False)
    history = [{"step": 1, "reward": 0.5}]
    with pytest.warns(UserWarning, match=r"matplotlib is not installed: .*rlaif-fast\[plots\]"):
        assert plot_metrics(history, tmp_path / "m.png") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per plot
        assert plot_metrics(history, tmp_path / "m.png") is None
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
        assert plots.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "p.png") is None
    assert not list(tmp_path.glob("*.png"))
