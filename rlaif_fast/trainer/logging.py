"""Metrics: JSONL (one line per step), TensorBoard events, a tqdm bar, and the end-of-run summary.

Only rank 0 writes; every other rank gets a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

_warned_no_matplotlib = False


class MetricsLogger:
    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        tensorboard: bool,
        progress: bool,
        total: int,
        initial: int = 0,
    ):
        self.enabled = enabled
        self.history: list[dict] = []  # this process's steps
        self.earlier: list[dict] = []  # the steps before ``initial``, logged by the runs this one resumes
        self.start = time.time()
        self._tb = self._bar = self._file = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        # a resumed run continues the same file, from its checkpoint: the steps a killed run logged after
        # that checkpoint are redone, so their lines go (TensorBoard purges them the same way)
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [line for line in lines if _step_of(line) <= initial]
        path.write_text("".join(line + "\n" for line in kept))
        self.earlier = [json.loads(line) for line in kept]
        self._file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=initial + 1)
            except ImportError:  # tensorboard not installed: JSONL still has everything
                self._tb = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="rl steps", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        self.history.append({"step": step, **metrics})
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)  # log_every > 1 logs every few steps
            self._bar.set_postfix(
                reward=f"{metrics.get('reward', math.nan):.3f}", kl=f"{metrics.get('kl', math.nan):.3f}"
            )

    @property
    def full_history(self) -> list[dict]:
        """Every logged step of the run, the resumed-from runs' included."""
        return self.earlier + self.history

    def summary(self, final_step: int, stopped: str) -> dict:
        """First vs last step of the whole run (across resumes) and the totals; printed on rank 0.
        ``seconds`` is this process's wall time; ``resumed_at`` the step it resumed from (0: none)."""
        out: dict = {"steps": final_step, "stopped": stopped, "seconds": round(time.time() - self.start, 2)}
        if self.earlier:
            out["resumed_at"] = self.earlier[-1]["step"]
        rows = self.full_history
        if rows:
            first, last = rows[0], rows[-1]
            for key in ("reward", "kl", "entropy", "response_len"):
                if key in last:
                    out[f"{key}_first"], out[f"{key}_last"] = first.get(key), last[key]
            out["tokens_per_s"] = round(
                sum(h.get("tokens", 0) for h in rows)
                / max(sum(h.get("step_seconds", 0.0) for h in rows), 1e-9),
                1,
            )
            # where a step's time goes (trainer.step: time_generate, time_weight_sync, time_reward,
            # time_score, time_update), as total seconds over the run
            for key in sorted({k for h in rows for k in h if k.startswith("time_")}):
                out[f"{key}_total"] = round(sum(h.get(key, 0.0) for h in rows), 3)
        if self.enabled:
            lines = [
                f"  {k:<16} {v:.4g}" if isinstance(v, float) else f"  {k:<16} {v}" for k, v in out.items()
            ]
            print("rlaif-fast train summary\n" + "\n".join(lines), flush=True)
        return out

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line a kill cut short (or any unreadable one)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def pyplot_or_warn(path):
    """matplotlib.pyplot on the Agg backend (files only: no display on a training node), or None when the
    optional ``plots`` extra is not installed: the plot at ``path`` is skipped with one warning per
    process, and the run goes on (its metrics are in metrics.jsonl all the same)."""
    global _warned_no_matplotlib
    try:
        import matplotlib
    except ImportError:
        if not _warned_no_matplotlib:
            _warned_no_matplotlib = True
            warnings.warn(
                f"matplotlib is not installed: {path} is not drawn (the metrics are in metrics.jsonl); "
                "pip install 'rlaif-fast[plots]' to get the plot",
                stacklevel=3,
            )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(
    history: list[dict], path: str | Path, keys=("reward", "kl", "entropy", "win_rate")
) -> Path | None:
    """One PNG with a panel per metric present in ``history`` (win_rate comes from the pipeline's eval)."""
    present = [k for k in keys if any(k in h for h in history)]
    if not present:
        return None
    plt = pyplot_or_warn(path)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, key in zip(axes[0], present):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
