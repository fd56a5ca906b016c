"""A PNG of a run's curves from its ``metrics.jsonl``: reward, KL, entropy and win rate.

RL rows carry ``reward``, ``kl`` and ``entropy`` per step (the trainer's names); evaluation rows carry
``kind: eval`` and ``win_rate`` per iteration. Steps of successive iterations are laid end to end so
several iterations read as one curve. matplotlib runs on the Agg backend: no display is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("reward", "reward (each iteration's reward model)"),
    ("kl", "KL(pi || pi_SFT) per sequence"),
    ("entropy", "entropy estimate (mean -log p of sampled tokens)"),
    ("win_rate", "win rate vs SFT (AI labeler)"),
)


def read_metrics(path: str | Path) -> tuple[dict[str, list[tuple[float, float]]], list[dict]]:
    """Series ``name -> [(x, y)]`` of the RL rows (x = step, counted across iterations) and the eval rows."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {str(path)!r} does not exist; run the loop first")
    series: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in PANELS if name != "win_rate"}
    evals, x = [], 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i} is not JSON ({err.msg}); the metrics file is damaged") from None
        if row.get("kind") == "eval":
            evals.append({**row, "x": x})
            continue
        x += 1
        for name in series:
            if isinstance(row.get(name), (int, float)):
                series[name].append((x, float(row[name])))
    return series, evals


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Draw the four panels into ``png_path`` and return it (None, with one warning, without matplotlib)."""
    from rlaif_fast.trainer.logging import pyplot_or_warn

    plt = pyplot_or_warn(png_path)
    if plt is None:
        return None

    series, evals = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (name, title) in zip(axes.flat, PANELS):
        if name == "win_rate":
            pts = [(e["iteration"], e["win_rate"]) for e in evals if "win_rate" in e]
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("iteration")
            ax.set_ylim(0, 1)
            ax.set_xticks(sorted({e["iteration"] for e in evals}))
        else:
            pts = series[name]
            ax.set_xlabel("RL step")
            for e in evals[:-1]:  # iteration boundaries
                ax.axvline(e["x"] + 0.5, color="grey", linestyle=":", linewidth=1)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if name == "win_rate" else None, linewidth=1.5)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
