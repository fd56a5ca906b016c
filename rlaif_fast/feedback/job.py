"""``rlaif-fast label``: label preference pairs (or score responses, ``--mode score``) with an AI labeler,
resumably.

The output is append-only JSONL keyed by pair id. Each batch is written with one ``write`` of whole
lines, then flushed and fsynced; on start, ids already in the output are skipped and a torn last line
(a kill during the write) is cut off. So a job killed at any point and run again loses no pair and
labels none twice. A pair whose labeling fails (HTTP errors after retries, a model error in its batch)
is counted, not written, and a later run retries it. Summary at the end (over the whole output file):
position-consistency rate, mean label entropy, AI-human alignment where the data has the human choice.

``--mode score`` (d-RLAIF): each response gets the labeler's expected 1-10 rating rescaled to [-1, 1].
Input ``{prompt|context, response}`` records, or any pairwise record, scored once per response (ids
``<pair id>:a`` / ``<pair id>:b``). Same append-only, resumable output; the summary has the mean score.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlaif_fast.feedback.config_cli import parse_config
from rlaif_fast.feedback.pairs import Pair, content_id, iter_records, pair_from_record, read_pairs

MODES = ("pairwise", "score")


@dataclass
class LabelJobConfig:
    """Label preference pairs with an AI labeler (RLAIF paper: both orders, soft labels)."""

    input: str = field(
        metadata={
            "help": "pairs JSONL (.gz ok): {prompt,chosen,rejected}, {context,response_a,"
            "response_b} or HH-RLHF {chosen,rejected}",
            "flags": ("--in", "--input"),
        }
    )
    out: str = field(metadata={"help": "output preferences JSONL (appended to; resumable)"})
    labeler: str = field(
        metadata={
            "help": "hf:LOCAL_MODEL_DIR, llama2c:MODEL.bin (tok512.bin beside it) or http://HOST:PORT/v1"
        }
    )
    mode: str = field(
        default="pairwise",
        metadata={"help": "pairwise: P(a > b), both orders; score: d-RLAIF 1-10 rating per response"},
    )
    template: str = field(
        default="summarization", metadata={"help": "built-in name, template file or string"}
    )
    chain_of_thought: bool = field(default=False, metadata={"help": "generate a rationale before scoring"})
    batch_size: int = field(
        default=16, metadata={"help": "pairs per labeling call (2x prompts: both orders)"}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "token limit per prompt (hf); context cut from the left"}
    )
    model: str = field(default="default", metadata={"help": "served model name (http)"})
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "environment variable with the API key (http)"}
    )
    timeout: float = field(default=30.0, metadata={"help": "seconds per HTTP request"})
    max_retries: int = field(default=3, metadata={"help": "HTTP retries with exponential backoff"})
    concurrency: int = field(default=8, metadata={"help": "HTTP requests in flight"})
    limit: int | None = field(default=None, metadata={"help": "label at most this many new pairs"})
    strict: bool = field(default=False, metadata={"help": "fail on the first malformed input line"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})

    def __post_init__(self):
        if not self.labeler.startswith(("hf:", "llama2c:", "http:", "https:")):
            raise ValueError(
                f"labeler={self.labeler!r}: use hf:LOCAL_MODEL_DIR, llama2c:MODEL.bin or http://HOST:PORT/v1"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; use one of {MODES}")
        if self.mode == "score" and self.chain_of_thought:
            raise ValueError(
                "chain_of_thought applies to pairwise labeling only; drop --chain-of-thought for --mode score"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if Path(self.input).resolve() == Path(self.out).resolve():
            raise ValueError(f"--out {self.out!r} is the input file; write the preferences elsewhere")


def make_backend(spec: str, cfg: LabelJobConfig | None = None):
    """``hf:PATH`` -> HFBackend; ``http://...`` or ``http:URL`` -> OpenAICompatibleBackend (failures -> NaN rows)."""
    cfg = cfg or LabelJobConfig(input="-", out="-.out", labeler=spec)
    if spec.startswith(("hf:", "llama2c:")):
        from rlaif_fast.feedback.hf_backend import HFBackend

        if spec.startswith("hf:"):
            return HFBackend(spec[3:], batch_size=2 * cfg.batch_size, max_length=cfg.max_length)
        # llama2c:MODEL.bin — a llama2.c checkpoint with its tok512.bin tokenizer in the same folder
        from rlaif_fast.models.llama2c import Llama2cTokenizer, load_llama2c

        path = Path(spec[len("llama2c:") :])
        if not path.is_file() or not (path.parent / "tok512.bin").is_file():
            raise ValueError(f"labeler {spec!r}: need an existing llama2.c .bin with tok512.bin beside it")
        model, tok = load_llama2c(path), Llama2cTokenizer(str(path.parent / "tok512.bin"))
        return HFBackend(model, tok, batch_size=2 * cfg.batch_size, max_length=cfg.max_length)
    from rlaif_fast.feedback.http_backend import OpenAICompatibleBackend

    url = spec[5:] if spec.startswith("http:") and not spec.startswith("http://") else spec
    return OpenAICompatibleBackend(
        url,
        cfg.model,
        os.environ.get(cfg.api_key_env),
        timeout=cfg.timeout,
        max_retries=cfg.max_retries,
        concurrency=cfg.concurrency,
        on_error="nan",
    )


def _done_ids(out: Path, mode: str = "pairwise") -> set[str]:
    """Ids already labeled in ``out``; a torn last line (killed mid-write) is truncated away first.

    Raises ValueError when ``out`` holds the other mode's records: resuming into it would append a second
    kind of record that the summary (and ``train-rm``) cannot read."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
    key, other = ("score", "pairwise") if mode == "score" else ("p_a", "score")
    ids = set()
    for n, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if key not in rec:
            raise ValueError(
                f"--out {str(out)!r} holds {other} labels (line {n} has no {key!r}); write --mode {mode} "
                f"to another --out, or resume this one with --mode {other}"
            )
        ids.add(rec["id"])
    return ids


def summarize(out) -> dict:
    """Consistency rate, mean entropy and (where known) alignment with humans over an output file."""
    n = consistent = agree = n_human = 0
    entropy = 0.0
    with open(out, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            n += 1
            consistent += bool(r["consistent"])
            entropy += r["entropy"]
            if r.get("human_a") is not None:
                n_human += 1
                # the paper's alignment: binarized soft label vs the human choice (a tie counts half)
                agree += 0.5 if r["p_a"] == 0.5 else float((r["p_a"] > 0.5) == r["human_a"])
    return {
        "labeled": n,
        "consistency_rate": consistent / n if n else math.nan,
        "position_bias_rate": 1 - consistent / n if n else math.nan,
        "mean_entropy": entropy / n if n else math.nan,
        "ai_human_alignment": agree / n_human if n_human else None,
    }


def summarize_scores(out) -> dict:
    """Count and mean of the d-RLAIF scores in an output file of ``--mode score``."""
    n, total = 0, 0.0
    with open(out, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                n += 1
                total += json.loads(line)["score"]
    return {"labeled": n, "mean_score": total / n if n else math.nan}


@dataclass(frozen=True)
class Response:
    """One response to score; ``pair_id``/``side`` when it came from a pairwise record."""

    id: str
    context: str
    response: str
    pair_id: str | None = None
    side: str | None = None
    human_chosen: bool | None = None


def response_items(rec) -> list[Response]:
    """A ``{prompt|context, response}`` record -> one item; a pairwise record -> one item per response."""
    if isinstance(rec, dict) and "response" in rec:
        ctx = rec.get("prompt", rec.get("context", ""))
        resp = rec["response"]
        for name, v in (("context", ctx), ("response", resp)):
            if not isinstance(v, str):
                raise ValueError(f"field {name} must be a string, got {type(v).__name__}")
        if not resp.strip():
            raise ValueError("response is empty; the labeler cannot score an empty response")
        rid = str(rec["id"]) if "id" in rec else content_id(ctx, resp, "")
        return [Response(rid, ctx, resp)]
    try:
        pair = pair_from_record(rec)
    except ValueError as exc:
        raise ValueError(f"{exc}; or, to score single responses, {{prompt|context, response}}") from None
    human = pair.human_a
    return [
        Response(f"{pair.id}:a", pair.context, pair.response_a, pair.id, "a", human),
        Response(
            f"{pair.id}:b", pair.context, pair.response_b, pair.id, "b", None if human is None else not human
        ),
    ]


def read_responses(path, *, strict: bool = False, errors: list | None = None):
    """Stream :class:`Response` items from JSONL; bad lines are reported like :func:`read_pairs` does."""
    for items in iter_records(path, response_items, strict=strict, errors=errors):
        yield from items


def _score_records(batch: list[Response], scores) -> tuple[list[str], int]:
    lines, failed = [], 0
    for item, score in zip(batch, scores):
        if not math.isfinite(score):
            failed += 1
            continue
        rec = {"id": item.id, "context": item.context, "response": item.response, "score": score}
        if item.pair_id is not None:
            rec.update(pair_id=item.pair_id, side=item.side)
        if item.human_chosen is not None:
            rec["human_chosen"] = item.human_chosen
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    return lines, failed


def _records(batch: list[Pair], labels) -> tuple[list[str], int]:
    lines, failed = [], 0
    for pair, lab in zip(batch, labels):
        if not math.isfinite(lab.p_a):
            failed += 1
            continue
        rec = {
            "id": pair.id,
            "context": pair.context,
            "response_a": pair.response_a,
            "response_b": pair.response_b,
            **lab.to_dict(),
        }
        if rec["rationales"] is None:
            del rec["rationales"]
        if pair.human_a is not None:
            rec["human_a"] = pair.human_a
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    return lines, failed


def _labeling(cfg: LabelJobConfig, backend):
    """(items of the input, batch -> (output lines, failures), summary of an output file) for cfg.mode."""
    from rlaif_fast.feedback.labelers import PairwiseLabeler, ScoreLabeler

    backend = backend if backend is not None else make_backend(cfg.labeler, cfg)
    if cfg.mode == "score":
        scorer = ScoreLabeler(backend, cfg.template)

        def score_batch(batch):
            return _score_records(
                batch, scorer.score([x.context for x in batch], [x.response for x in batch])
            )

        return read_responses, score_batch, summarize_scores
    labeler = PairwiseLabeler(backend, cfg.template, chain_of_thought=cfg.chain_of_thought)

    def label_batch(batch):
        labels = labeler.label(
            [p.context for p in batch], [p.response_a for p in batch], [p.response_b for p in batch]
        )
        return _records(batch, labels)

    return read_pairs, label_batch, summarize


def run_label_job(cfg: LabelJobConfig, backend=None) -> dict:
    """Label every pair (``--mode score``: every response) of ``cfg.input`` not yet in ``cfg.out``;
    return the summary dict."""
    from tqdm import tqdm

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(out, cfg.mode)
    read_items, label_batch, summary_of = _labeling(cfg, backend)
    unit = "response" if cfg.mode == "score" else "pair"
    errors: list = []
    stats = {"skipped_done": 0, "duplicates": 0, "failed": 0, "new": 0}
    seen, batch = set(done), []
    t0 = time.perf_counter()
    bar = tqdm(unit=unit, desc="label", disable=not cfg.progress, file=sys.stderr)

    def flush(f):
        try:
            lines, failed = label_batch(batch)
        except (RuntimeError, ValueError, OSError) as exc:  # one bad batch never ends the job
            print(
                f"label: a batch of {len(batch)} {unit}s failed: {type(exc).__name__}: {exc}", file=sys.stderr
            )
            lines, failed = [], len(batch)
        f.write("".join(lines))  # whole lines in one write, then fsync: a kill leaves at most a torn tail
        f.flush()
        os.fsync(f.fileno())
        stats["failed"] += failed
        stats["new"] += len(lines)
        bar.update(len(batch))
        batch.clear()

    with open(out, "a", encoding="utf-8") as f:
        for item in read_items(cfg.input, strict=cfg.strict, errors=errors):
            if item.id in seen:
                stats["skipped_done" if item.id in done else "duplicates"] += 1
                continue
            if cfg.limit is not None and stats["new"] + stats["failed"] + len(batch) >= cfg.limit:
                break
            seen.add(item.id)
            batch.append(item)
            if len(batch) == cfg.batch_size:
                flush(f)
        if batch:
            flush(f)
    bar.close()
    for err in errors:
        print(f"label: skipped malformed line {err}", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    return {
        **stats,
        "malformed_lines": [e.line_no for e in errors],
        "seconds": round(elapsed, 3),
        f"{unit}s_per_s": round(stats["new"] / elapsed, 3) if elapsed > 0 else None,
        **summary_of(out),
    }


def main(argv: list[str] | None = None) -> int:
    """``rlaif-fast label``: exit 0 when every pair (response) is labeled, 1 when some failed (rerun to retry), 2 on bad input."""
    try:
        cfg = parse_config(LabelJobConfig, argv, prog="rlaif-fast label")
        summary = run_label_job(cfg)
    except ValueError as exc:
        print(f"rlaif-fast label: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
