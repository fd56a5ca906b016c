"""The labeler dashboard: how the AI labeler behaved in each iteration, computed from its label files alone.

For each iteration's ``pairs.jsonl`` (one soft label per pair, both orders kept):

- alignment: the binarized debiased label (p_a > 0.5) agrees with the reference choice, over pairs that have
  one: ``human_a`` (a human label, when the pairs carry it, or from ``iter_<k>/human_pairs.jsonl``: the run's
  ``human_pairs`` labeled by the AI labeler) and ``reference_a`` (the embedded task's ground truth); ties of
  the reference are left out.
- position bias: share of pairs whose two orders disagreed (the labeler picked the same position twice), and
  which position it favours: ``p_first``, the mean P(the response shown first wins) over both orders of every
  pair (0.5 = no preference for a position), and among the inconsistent pairs how many went to the first
  position and how many to the second.
- label entropy: mean binary entropy of the debiased label, in nats (ln 2 = 0.693 undecided); consistency is
  1 - position bias; confidence the mean of |2 p_a - 1|.
- drift: the change of each figure since the previous iteration (labels of a later policy's samples).
- least sure: the pairs whose debiased label is closest to 0.5, each with its line in the label file.

Pairs the labeler failed on (NaN p_a) are counted (``failed``) and left out of every figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FIGURES = (
    "alignment",
    "alignment_human",
    "position_bias",
    "p_first",
    "mean_entropy",
    "consistency",
    "confidence",
)
LEAST_SURE = 5


def _read(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, record) of every non-empty line."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            out.append((n, json.loads(line)))
    return out


def _agreement(rows: list[dict], key: str) -> tuple[float | None, int]:
    ref = [(r["p_a"], r[key]) for r in rows if r.get(key) is not None and r[key] != 0.5]
    if not ref:
        return None, 0
    return sum((p > 0.5) == (float(h) > 0.5) for p, h in ref) / len(ref), len(ref)


def labeler_stats(path: str | Path, link_prefix: str = "") -> dict:
    """The dashboard's figures of one label file (``pairs.jsonl``)."""
    path = Path(path)
    lines = _read(path)
    valid = [(ln, r) for ln, r in lines if isinstance(r.get("p_a"), (int, float)) and math.isfinite(r["p_a"])]
    rows = [r for _, r in valid]
    n = len(rows)
    out: dict = {"pairs": len(lines), "failed": len(lines) - n}
    if not n:
        return {**out, **dict.fromkeys(FIGURES), "least_sure": []}
    inconsistent = [r for r in rows if not r["consistent"]]
    # P(first shown wins): p_a_ab in order (a, b); 1 - p_a_ba in order (b, a), where b is shown first
    p_first = sum(r["p_a_ab"] + (1.0 - r["p_a_ba"]) for r in rows) / (2 * n)
    out.update(
        position_bias=len(inconsistent) / n,
        consistency=1.0 - len(inconsistent) / n,
        p_first=p_first,
        favours="first" if p_first > 0.5 else "second" if p_first < 0.5 else "neither",
        # an inconsistent pair went to the first position when a won shown first and b won shown first
        same_position_first=sum(r["p_a_ab"] > 0.5 for r in inconsistent),
        same_position_second=sum(r["p_a_ab"] <= 0.5 for r in inconsistent),
        mean_entropy=sum(r["entropy"] for r in rows) / n,
        confidence=sum(abs(2 * r["p_a"] - 1) for r in rows) / n,
    )
    out["alignment"], out["alignment_pairs"] = _agreement(rows, "reference_a")
    out["alignment_human"], out["alignment_human_pairs"] = _agreement(rows, "human_a")
    ranked = sorted(valid, key=lambda x: (abs(x[1]["p_a"] - 0.5), x[0]))[:LEAST_SURE]
    out["least_sure"] = [
        {
            "line": ln,
            "link": f"{link_prefix}{path.name}#L{ln}",
            "p_a": r["p_a"],
            "consistent": r["consistent"],
            "context": r.get("context", ""),
            "response_a": r["response_a"],
            "response_b": r["response_b"],
        }
        for ln, r in ranked
    ]
    return out


def build_dashboard(out_dir: str | Path, iterations: int) -> list[dict]:
    """One entry per finished iteration (``iter_<k>/pairs.jsonl``), with the drift of every figure."""
    out_dir = Path(out_dir)
    rows, prev = [], None
    for k in range(1, iterations + 1):
        path = out_dir / f"iter_{k}" / "pairs.jsonl"
        if not path.is_file():
            break
        stats = {"iteration": k, **labeler_stats(path, link_prefix=f"iter_{k}/")}
        human = out_dir / f"iter_{k}" / "human_pairs.jsonl"
        if human.is_file():  # the run's human-labeled pairs (config human_pairs), labeled by the AI labeler
            rows_h = [
                r for _, r in _read(human) if isinstance(r.get("p_a"), float) and math.isfinite(r["p_a"])
            ]
            stats["alignment_human"], stats["alignment_human_pairs"] = _agreement(rows_h, "human_a")
        stats["drift"] = {
            f: (
                stats[f] - prev[f]
                if prev is not None and stats[f] is not None and prev[f] is not None
                else None
            )
            for f in FIGURES
        }
        rows.append(stats)
        prev = stats
    return rows


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _drift(x, pct: bool) -> str:
    if x is None:
        return ""
    return f" ({'+' if x >= 0 else ''}{100 * x:.1f} pt)" if pct else f" ({x:+.3f})"


def _code(text: str, limit: int = 80) -> str:
    """One line of inline code: newlines and backticks replaced, long text cut with an ellipsis."""
    text = " ".join(str(text).split()).replace("`", "'")
    return f"`{text[:limit] + '...' if len(text) > limit else text}`"


def render_dashboard(rows: list[dict]) -> str:
    """The dashboard as a markdown section (drift since the previous iteration in parentheses)."""
    if not rows:
        return ""
    lines = [
        "## Labeler dashboard",
        "",
        "From each iteration's label file (`iter_<k>/pairs.jsonl`); drift since the previous iteration in "
        "parentheses. P(first wins): the mean probability that the response shown first wins, over both orders "
        "(0.5 = no position preference).",
        "",
        "| iteration | alignment (reference) | alignment (human) | position bias | favours | P(first wins) "
        "| same position: first / second | label entropy (nats) | consistency | confidence | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        d = r["drift"]
        lines.append(
            f"| {r['iteration']} | {_pct(r['alignment'])}{_drift(d['alignment'], True)} | "
            f"{_pct(r['alignment_human'])}{_drift(d['alignment_human'], True)} | "
            f"{_pct(r['position_bias'])}{_drift(d['position_bias'], True)} | {r.get('favours', 'n/a')} | "
            f"{_num(r['p_first'])}{_drift(d['p_first'], False)} | "
            f"{r.get('same_position_first', 0)} / {r.get('same_position_second', 0)} | "
            f"{_num(r['mean_entropy'])}{_drift(d['mean_entropy'], False)} | "
            f"{_pct(r['consistency'])}{_drift(d['consistency'], True)} | "
            f"{_pct(r['confidence'])}{_drift(d['confidence'], True)} | {r['failed']} |"
        )
    for r in rows:
        if r["least_sure"]:
            lines += ["", f"Least sure pairs, iteration {r['iteration']} (p_a closest to 0.5):", ""]
            for p in r["least_sure"]:
                lines.append(
                    f"- [{p['link']}]({p['link']}) p_a = {p['p_a']:.3f}"
                    f"{'' if p['consistent'] else ' (orders disagree)'}: {_code(p['context'])}: "
                    f"{_code(p['response_a'])} vs {_code(p['response_b'])}"
                )
    return "\n".join(lines) + "\n"


def plot_dashboard(rows: list[dict], path: str | Path) -> Path | None:
    """One PNG: position bias and consistency, P(first wins), label entropy and alignment per iteration, and
    the distribution of the last iteration's soft labels. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    its = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))

    def series(ax, keys, title, ylim=None, hline=None):
        for key, label in keys:
            if all(r[key] is None for r in rows):  # e.g. no human labels: no empty legend entry
                continue
            ys = [r[key] if r[key] is not None else float("nan") for r in rows]
            ax.plot(its, ys, marker="o", label=label)
        if hline is not None:
            ax.axhline(hline, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_xticks(its)
        if ylim:
            ax.set_ylim(*ylim)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    series(
        axes[0][0],
        [("position_bias", "position bias"), ("consistency", "consistency")],
        "order effects",
        (-0.02, 1.05),
    )
    series(
        axes[0][1],
        [("p_first", "P(first shown wins)")],
        "position preference (0.5 = none)",
        (-0.02, 1.05),
        0.5,
    )
    series(
        axes[1][0],
        [
            ("alignment", "alignment (reference)"),
            ("alignment_human", "alignment (human)"),
            ("confidence", "confidence"),
        ],
        "agreement and confidence",
        (-0.02, 1.05),
    )
    ax = axes[1][1]
    ax.plot(
        its, [r["mean_entropy"] if r["mean_entropy"] is not None else float("nan") for r in rows], marker="o"
    )
    ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1)
    ax.set_title("mean label entropy, nats (dotted: ln 2, undecided)")
    ax.set_xlabel("iteration")
    ax.set_xticks(its)
    ax.set_ylim(0, 0.75)
    ax.grid(alpha=0.3)
    fig.suptitle("AI labeler dashboard")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
