"""Preference pairs from JSONL (optionally gzipped), in the three shapes people have on disk.

- ``{"prompt", "chosen", "rejected"}`` (TRL / DPO style): context = prompt; a = chosen, b = rejected.
- ``{"context", "response_a", "response_b"}``: unlabeled pairs, e.g. two policy samples.
- ``{"chosen", "rejected"}`` full dialogues (Anthropic HH-RLHF): the shared prefix up to the last
  ``"\\n\\nAssistant:"`` is the context; the two remainders are the responses.

When the human choice is known, ``human_a`` is True (a = chosen). ``id`` is the record's ``"id"`` when it
has one, otherwise a hash of its content, so a re-read of the same file gives the same keys (resume).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Pair:
    id: str
    context: str
    response_a: str
    response_b: str
    human_a: bool | None = None  # True: humans preferred a; None: unknown


class PairFormatError(ValueError):
    def __init__(self, path, line_no: int, reason: str):
        self.path, self.line_no, self.reason = str(path), line_no, reason
        super().__init__(f"{path}:{line_no}: {reason}")


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF: (context, chosen response, rejected response) split at the last shared Assistant turn."""
    i = 0
    limit = min(len(chosen), len(rejected))
    while i < limit and chosen[i] == rejected[i]:
        i += 1
    cut = chosen.rfind(ASSISTANT, 0, i)  # the last Assistant turn lying wholly in the shared prefix
    if cut < 0:
        raise ValueError(
            f"the dialogues share no {ASSISTANT!r} turn before they differ; give a 'prompt' field"
        )
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def content_id(context: str, a: str, b: str) -> str:
    h = hashlib.sha1()
    for s in (context, a, b):
        h.update(s.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def pair_from_record(rec) -> Pair:
    """One JSON object to a :class:`Pair`; ValueError names what is missing or malformed."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if {"response_a", "response_b"} <= rec.keys():
        ctx, a, b, human = rec.get("context", ""), rec["response_a"], rec["response_b"], None
        if "human_a" in rec:
            human = bool(rec["human_a"])
    elif {"chosen", "rejected"} <= rec.keys():
        if "prompt" in rec:
            ctx, a, b = rec["prompt"], rec["chosen"], rec["rejected"]
        else:
            ctx, a, b = split_dialogue(str(rec["chosen"]), str(rec["rejected"]))
        human = True
    else:
        raise ValueError(
            f"keys {sorted(rec)} match no known shape; use {{prompt, chosen, rejected}}, "
            "{context, response_a, response_b} or HH-RLHF {chosen, rejected}"
        )
    for name, v in (("context", ctx), ("response_a", a), ("response_b", b)):
        if not isinstance(v, str):
            raise ValueError(f"field {name} must be a string, got {type(v).__name__}")
    for name, v in (("response_a", a), ("response_b", b)):
        if not v.strip():
            raise ValueError(f"{name} is empty; the labeler cannot judge an empty response")
    pid = str(rec["id"]) if "id" in rec else content_id(ctx, a, b)
    return Pair(pid, ctx, a, b, human)


def open_text(path: Path):
    """A text handle on a .jsonl or .jsonl.gz file (utf-8-sig: a leading byte-order mark is dropped)."""
    enc = "utf-8-sig"  # plain UTF-8 reads the same; a BOM would otherwise make line 1 malformed
    return gzip.open(path, "rt", encoding=enc) if path.suffix == ".gz" else open(path, encoding=enc)


def iter_records(path, parse, *, strict: bool = False, errors: list | None = None) -> Iterator:
    """``parse(record)`` for each JSONL line of ``path``. A line that is not JSON, or that ``parse``
    rejects with ValueError, is appended to ``errors`` as a :class:`PairFormatError` (with its line
    number) and skipped, or raised with ``strict=True``. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {str(path)!r} does not exist")
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield parse(json.loads(line))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                err = PairFormatError(path, line_no, str(exc))
                if strict:
                    raise err from None
                if errors is not None:
                    errors.append(err)
                continue


def read_pairs(path, *, strict: bool = False, errors: list | None = None) -> Iterator[Pair]:
    """Stream pairs from a JSONL file; bad lines as in :func:`iter_records`."""
    return iter_records(path, pair_from_record, strict=strict, errors=errors)
