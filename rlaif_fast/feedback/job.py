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

Safety: ``--out`` is held under an exclusive lock (a second job on it stops at once); every record carries
``labeled_by`` (labeler, served model, template and its hash, mode, chain of thought), checked on resume so
that another labeler's records are never mixed in; a last record that only lacks its newline is kept; a
damaged line elsewhere is an error naming ``file:line``. Input and output are checked before the labeler
loads, and every OS error is one line naming the path. The first failure's cause (the server's reply) is
printed once; when the first ``--give-up-after`` pairs all fail the job stops. Ids are compared as given
(``7`` and ``"7"`` differ). The summary is strict JSON (no NaN).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlaif_fast.config_cli import parse_config
from rlaif_fast.feedback.pairs import (
    Pair,
    check_input,
    id_key,
    iter_records,
    pair_from_record,
    read_pairs,
    record_id,
)

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

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
            "help": "hf:LOCAL_MODEL_DIR, vllm:LOCAL_MODEL_DIR (an in-process vLLM engine), llama2c:MODEL.bin "
            "(tok512.bin beside it) or http://HOST:PORT/v1"
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
    timeout: float = field(
        default=30.0,
        metadata={"help": "seconds per HTTP request (the whole request, however slow the reply)"},
    )
    max_retries: int = field(default=3, metadata={"help": "HTTP retries with exponential backoff"})
    concurrency: int = field(default=8, metadata={"help": "HTTP requests in flight"})
    limit: int | None = field(default=None, metadata={"help": "label at most this many new pairs"})
    give_up_after: int = field(
        default=16, metadata={"help": "stop when the first N pairs all fail (0: never stop early)"}
    )
    strict: bool = field(default=False, metadata={"help": "fail on the first malformed input line"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})

    def __post_init__(self):
        if not self.labeler.startswith(("hf:", "vllm:", "llama2c:", "http:", "https:")):
            raise ValueError(
                f"labeler={self.labeler!r}: use hf:LOCAL_MODEL_DIR, vllm:LOCAL_MODEL_DIR, llama2c:MODEL.bin or "
                "http://HOST:PORT/v1"
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
        if self.give_up_after < 0:
            raise ValueError(f"give_up_after must be >= 0 (0: never), got {self.give_up_after}")
        if Path(self.input).resolve() == Path(self.out).resolve():
            raise ValueError(f"--out {self.out!r} is the input file; write the preferences elsewhere")


def make_backend(spec: str, cfg: LabelJobConfig | None = None):
    """``hf:PATH`` -> HFBackend; ``vllm:PATH`` -> VLLMBackend; ``http://...`` or ``http:URL`` -> OpenAICompatibleBackend (failures -> NaN rows)."""
    cfg = cfg or LabelJobConfig(input="-", out="-.out", labeler=spec)
    # vllm: the labeler in an in-process vLLM engine (rlaif_fast/feedback/vllm_backend.py)
    if spec.startswith("vllm:"):
        from rlaif_fast.feedback import vllm_backend

        return vllm_backend.VLLMBackend(spec[len("vllm:") :], max_length=cfg.max_length)
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


class LabelJobError(ValueError):
    """A job that cannot start or go on, as one line naming the path or the server; ``code`` is the exit code."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


def provenance(cfg: LabelJobConfig) -> dict:
    """What made a record: stored in each one as ``labeled_by`` and checked when a job resumes."""
    from rlaif_fast.feedback.templates import load_template

    t = load_template(cfg.template)
    body = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name != "name"}
    sha = hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
    kind, _, where = cfg.labeler.partition(":")
    labeler = cfg.labeler
    if kind in ("hf", "vllm", "llama2c") and where:
        labeler = f"{kind}:{Path(where).resolve()}"
    prov = {"labeler": labeler, "template": cfg.template, "template_sha1": sha, "mode": cfg.mode}
    if kind in ("http", "https"):
        prov["model"] = cfg.model
    if cfg.mode == "pairwise":
        prov["chain_of_thought"] = bool(cfg.chain_of_thought)
    return prov


def _same_labeler(old: dict, new: dict) -> tuple[str, object, object] | None:
    """The first provenance field that differs (a served labeler may move to another address), or None."""
    http = lambda p: str(p.get("labeler", "")).startswith(("http:", "https:"))  # noqa: E731
    fields = ["mode", "template_sha1", "chain_of_thought"]
    fields += ["model"] if http(old) and http(new) else ["labeler"]
    for k in fields:
        if old.get(k) != new.get(k):
            if k == "template_sha1":
                was, now = old.get("template"), new.get("template")
                if was == now:  # the same name, another text (an edited template file)
                    was, now = f"{was} (text sha1 {old.get(k)})", f"{now} (text sha1 {new.get(k)})"
                return "template", was, now
            return k, old.get(k), new.get(k)
    return None


def _out_key(rec: dict) -> str:
    if "pair_id" in rec and "side" in rec:
        return id_key([rec["pair_id"], rec["side"]])
    return id_key(rec["id"])


def _open_output(out: Path):
    """``out`` opened for appending under an exclusive lock; every OS error is one line naming the path."""
    if out.is_dir():
        raise LabelJobError(
            f"--out {str(out)!r} is a directory; give a file path such as {str(out / 'prefs.jsonl')!r}"
        )
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise LabelJobError(f"cannot write --out {str(out)!r}: {str(above)!r} is a file (Not a directory)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = open(out, "a+b")
    except OSError as exc:
        raise LabelJobError(f"cannot write --out {str(out)!r}: {exc.strerror or exc}") from None
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise LabelJobError(
                f"another job is writing --out {str(out)!r} (it holds the file's lock); wait for it to finish, "
                "or write to another --out"
            ) from None
    return f


def _done_ids(f, out: Path, mode: str = "pairwise", prov: dict | None = None) -> set[str]:
    """Keys of the records already in ``out`` (opened by :func:`_open_output`).

    A torn last line (killed mid-write) is cut off; a last record that is whole but lacks its newline is kept
    (its newline is added). A damaged line elsewhere, a record without ``id``, another mode's records
    (``train-rm`` could not read the mix) or another labeler's (``prov``) raise ValueError naming file:line."""
    f.seek(0)
    data = f.read()
    end = data.rfind(b"\n") + 1
    key, other = ("score", "pairwise") if mode == "score" else ("p_a", "score")
    tail = data[end:]
    if tail:
        try:
            rec = json.loads(tail)
            whole = isinstance(rec, dict) and "id" in rec and key in rec
        except ValueError:
            whole = False
        try:
            if whole:
                f.write(b"\n")
                data += b"\n"
            else:
                f.truncate(end)
                data = data[:end]
                if tail.strip():
                    print(
                        f"label: cut a torn last line ({len(tail)} bytes) from {out}; it is labeled again",
                        file=sys.stderr,
                    )
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            raise LabelJobError(f"cannot write --out {str(out)!r}: {exc.strerror or exc}") from None
    ids = set()
    for n, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise LabelJobError(
                f"--out {out}:{n} is not a JSON record ({exc}); only a last line can be torn by a kill: fix or "
                "delete that line, or write to another --out"
            ) from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise LabelJobError(
                f"--out {out}:{n} is a record without an 'id'; it was not written by rlaif-fast label: fix or "
                "delete that line, or write to another --out"
            )
        if key not in rec:
            raise ValueError(
                f"--out {str(out)!r} holds {other} labels (line {n} has no {key!r}); write --mode {mode} "
                f"to another --out, or resume this one with --mode {other}"
            )
        old = rec.get("labeled_by")
        if prov is not None and isinstance(old, dict):
            diff = _same_labeler(old, prov)
            if diff is not None:
                k, was, now = diff
                raise LabelJobError(
                    f"--out {out}:{n} was labeled with {k}={was!r}, this job has {k}={now!r}; resume with the same "
                    "settings, or write to another --out"
                )
        ids.add(_out_key(rec))
        if not isinstance(old, dict):  # written before ids kept their type: an int id 7 was stored as "7"
            digits = lambda v: isinstance(v, str) and v.lstrip("-").isdigit()  # noqa: E731
            as_int = {k: int(rec[k]) for k in ("id", "pair_id") if digits(rec.get(k))}
            if as_int:
                ids.add(_out_key({**rec, **as_int}))
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
    return {  # strict JSON: None, never NaN, when nothing is labeled
        "labeled": n,
        "consistency_rate": consistent / n if n else None,
        "position_bias_rate": 1 - consistent / n if n else None,
        "mean_entropy": entropy / n if n else None,
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
    return {"labeled": n, "mean_score": total / n if n else None}


@dataclass(frozen=True)
class Response:
    """One response to score; ``pair_id``/``side`` when it came from a pairwise record."""

    id: str | int
    context: str
    response: str
    pair_id: str | int | None = None
    side: str | None = None
    human_chosen: bool | None = None

    @property
    def key(self) -> str:
        """Its key in the output: the id as given, or (pair id as given, side)."""
        return id_key(self.id) if self.pair_id is None else id_key([self.pair_id, self.side])


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
        return [Response(record_id(rec, ctx, resp, ""), ctx, resp)]
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


def _score_records(batch: list[Response], scores, prov: dict | None = None) -> tuple[list[str], int]:
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
        if prov is not None:
            rec["labeled_by"] = prov
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    return lines, failed


def _records(batch: list[Pair], labels, prov: dict | None = None) -> tuple[list[str], int]:
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
        if prov is not None:
            rec["labeled_by"] = prov
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    return lines, failed


def _labeling(cfg: LabelJobConfig, backend, prov: dict | None = None):
    """(items of the input, batch -> (output lines, failures), summary of an output file) for cfg.mode."""
    from rlaif_fast.feedback.labelers import PairwiseLabeler, ScoreLabeler

    backend = backend if backend is not None else make_backend(cfg.labeler, cfg)
    if cfg.mode == "score":
        scorer = ScoreLabeler(backend, cfg.template)

        def score_batch(batch):
            return _score_records(
                batch, scorer.score([x.context for x in batch], [x.response for x in batch]), prov
            )

        return read_responses, score_batch, summarize_scores
    labeler = PairwiseLabeler(backend, cfg.template, chain_of_thought=cfg.chain_of_thought)

    def label_batch(batch):
        labels = labeler.label(
            [p.context for p in batch], [p.response_a for p in batch], [p.response_b for p in batch]
        )
        return _records(batch, labels, prov)

    return read_pairs, label_batch, summarize


def _probe(backend, cfg: LabelJobConfig) -> None:
    """A served labeler's route probe, before any pair: a server that cannot label stops the job here."""
    probe = getattr(backend, "probe", None)
    if not callable(probe):
        return
    from rlaif_fast.feedback.http_backend import BackendError

    try:
        probe()
    except BackendError as exc:
        raise LabelJobError(
            f"the labeler {cfg.labeler} cannot label: {exc}", 1 if exc.transient else 2
        ) from None


def run_label_job(cfg: LabelJobConfig, backend=None) -> dict:
    """Label every pair (``--mode score``: every response) of ``cfg.input`` not yet in ``cfg.out``;
    return the summary dict. Input and output are checked (and ``--out`` locked) before the labeler loads."""
    from tqdm import tqdm

    out = Path(cfg.out)
    check_input(cfg.input)
    prov = provenance(cfg)
    f = _open_output(out)
    try:
        done = _done_ids(f, out, cfg.mode, prov)
        if backend is None:
            backend = make_backend(cfg.labeler, cfg)
        _probe(backend, cfg)
        read_items, label_batch, summary_of = _labeling(cfg, backend, prov)
        return _run(cfg, f, out, done, backend, read_items, label_batch, summary_of, tqdm)
    finally:
        f.close()  # releases the lock


def _run(cfg, f, out, done, backend, read_items, label_batch, summary_of, tqdm) -> dict:
    unit = "response" if cfg.mode == "score" else "pair"
    errors: list = []
    stats = {"skipped_done": 0, "duplicates": 0, "failed": 0, "new": 0}
    seen, batch = set(done), []
    first = {"error": None, "stopped_early": False}
    t0 = time.perf_counter()
    bar = tqdm(unit=unit, desc="label", disable=not cfg.progress, file=sys.stderr)

    def flush():
        cause = None
        try:
            lines, failed = label_batch(batch)
        except (RuntimeError, ValueError, OSError) as exc:  # one bad batch never ends the job
            lines, failed = [], len(batch)
            cause = f"a batch of {len(batch)} {unit}s failed: {type(exc).__name__}: {exc}"
        try:  # whole lines in one write, then fsync: a kill leaves at most a torn tail
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            raise LabelJobError(
                f"cannot write --out {str(out)!r}: {exc.strerror or exc}; the {len(lines)} {unit}s of this batch "
                "were not saved: fix it and rerun the same command",
                1,
            ) from None
        if failed and first["error"] is None:  # the first failure's cause, printed once
            cause = (
                cause or getattr(backend, "first_error", None) or "the labeler returned a non-finite value"
            )
            first["error"] = cause
            print(f"label: first failure: {cause}", file=sys.stderr)
        stats["failed"] += failed
        stats["new"] += len(lines)
        bar.update(len(batch))
        batch.clear()
        if cfg.give_up_after and stats["new"] == 0 and stats["failed"] >= cfg.give_up_after:
            first["stopped_early"] = True

    for item in read_items(cfg.input, strict=cfg.strict, errors=errors):
        key = item.key if isinstance(item, Response) else id_key(item.id)
        if key in seen:
            stats["skipped_done" if key in done else "duplicates"] += 1
            continue
        if cfg.limit is not None and stats["new"] + stats["failed"] + len(batch) >= cfg.limit:
            break
        seen.add(key)
        batch.append(item)
        if len(batch) == cfg.batch_size:
            flush()
            if first["stopped_early"]:
                break
    if batch and not first["stopped_early"]:
        flush()
    bar.close()
    for err in errors:
        print(
            f"label: {'stopped reading at' if err.fatal else 'skipped malformed line'} {err}", file=sys.stderr
        )
    if first["stopped_early"]:
        print(
            f"label: the first {stats['failed']} {unit}s all failed; stopped early (first failure above). Fix the "
            "cause and rerun the same command",
            file=sys.stderr,
        )
    elif stats["failed"]:
        print(
            f"label: {stats['failed']} {unit}s failed; rerun the same command to retry them", file=sys.stderr
        )
    elapsed = time.perf_counter() - t0
    fatal = [str(e) for e in errors if e.fatal]
    return {
        **stats,
        "malformed_lines": [e.line_no for e in errors if not e.fatal],
        "input_error": fatal[0] if fatal else None,
        "first_error": first["error"],
        "stopped_early": first["stopped_early"],
        "seconds": round(elapsed, 3),
        f"{unit}s_per_s": round(stats["new"] / elapsed, 3) if elapsed > 0 else None,
        **summary_of(out),
    }


def main(argv: list[str] | None = None) -> int:
    """``rlaif-fast label``: exit 0 when every pair (response) is labeled; 1 when some failed, the job stopped
    early, the input broke off or the server is unreachable (rerun to retry); 2 on bad input or settings."""
    try:
        cfg = parse_config(LabelJobConfig, argv, prog="rlaif-fast label")
        summary = run_label_job(cfg)
    except LabelJobError as exc:
        print(f"rlaif-fast label: error: {exc}", file=sys.stderr)
        return exc.code
    except ValueError as exc:
        print(f"rlaif-fast label: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, allow_nan=False))
    return 1 if summary["failed"] or summary["stopped_early"] or summary["input_error"] else 0


if __name__ == "__main__":
    sys.exit(main())
