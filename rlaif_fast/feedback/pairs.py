"""Preference pairs from JSONL (optionally gzipped), in the three shapes people have on disk.

- ``{"prompt", "chosen", "rejected"}`` (TRL / DPO style): context = prompt; a = chosen, b = rejected.
- ``{"context", "response_a", "response_b"}``: unlabeled pairs, e.g. two policy samples.
- ``{"chosen", "rejected"}`` full dialogues (Anthropic HH-RLHF): the shared prefix up to the last
  ``"\\n\\nAssistant:"`` is the context; the two remainders are the responses.

When the human choice is known, ``human_a`` is True (a = chosen). ``id`` is the record's ``"id"`` as given
(a string or an integer: ``7`` and ``"7"`` are two pairs; ``null`` is refused) when it has one, otherwise a
hash of its content, so a re-read of the same file gives the same keys (resume).

Lines are read as bytes and decoded one by one, so a bad line (not UTF-8, not JSON, a missing field, a
non-boolean ``human_a``) is skipped with its ``file:line`` whatever the cause; a truncated ``.gz`` ends the
read with an error naming the line where the stream broke, after every line before it was read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Pair:
    id: str | int  # as given in the record (or a content hash)
    context: str
    response_a: str
    response_b: str
    human_a: bool | None = None  # True: humans preferred a; None: unknown


class PairFormatError(ValueError):
    """A bad input line (``fatal``: the file cannot be read past it, e.g. a truncated .gz)."""

    def __init__(self, path, line_no: int, reason: str, *, fatal: bool = False):
        self.path, self.line_no, self.reason, self.fatal = str(path), line_no, reason, fatal
        super().__init__(f"{path}:{line_no}: {reason}")


def record_id(rec: dict, *parts: str):
    """The record's ``id`` as given (str or int), or a content hash of ``parts`` when it has none."""
    if "id" not in rec:
        return content_id(*parts)
    v = rec["id"]
    if v is None:
        raise ValueError(
            "id is null; give a string or integer id, or drop the key to key the record by its content"
        )
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"id {v!r} is a {type(v).__name__}; give a string or an integer")
    return v


def id_key(v) -> str:
    """A set key that keeps ids as given: 7 and "7" differ."""
    return json.dumps(v, ensure_ascii=False)


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
        if rec.get("human_a") is not None:
            human = rec["human_a"]
            if not isinstance(human, bool) and not (type(human) is int and human in (0, 1)):
                raise ValueError(f"human_a must be true, false (or 1, 0) or null, got {human!r}")
            human = bool(human)
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
    return Pair(record_id(rec, ctx, a, b), ctx, a, b, human)


def open_text(path: Path):
    """A text handle on a .jsonl or .jsonl.gz file (utf-8-sig: a leading byte-order mark is dropped)."""
    enc = "utf-8-sig"  # plain UTF-8 reads the same; a BOM would otherwise make line 1 malformed
    return gzip.open(path, "rt", encoding=enc) if path.suffix == ".gz" else open(path, encoding=enc)


def check_input(path) -> Path:
    """Fail early with one line naming ``path`` when the input cannot be opened and read."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"input file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"input {str(path)!r} is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read input {str(path)!r}: {exc.strerror or exc}") from None
    return path


def _byte_lines(path: Path):
    """(line number, bytes) of a .jsonl or .jsonl.gz file; a damaged gzip stream raises PairFormatError."""
    opener = gzip.open if path.suffix == ".gz" else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                yield n, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise PairFormatError(
            path,
            n + 1,
            f"the gzip stream is truncated or damaged ({exc}); no line from here on can be read",
            fatal=True,
        ) from None
    except OSError as exc:
        raise PairFormatError(path, n + 1, f"read error: {exc.strerror or exc}", fatal=True) from None


def iter_records(path, parse, *, strict: bool = False, errors: list | None = None) -> Iterator:
    """``parse(record)`` for each JSONL line of ``path``. A line that is not JSON, or that ``parse``
    rejects with ValueError, is appended to ``errors`` as a :class:`PairFormatError` (with its line
    number) and skipped, or raised with ``strict=True``. Blank lines are ignored."""
    path = check_input(path)
    lines = _byte_lines(path)
    while True:
        try:
            line_no, raw = next(lines)
        except StopIteration:
            return
        except PairFormatError as err:  # nothing after a broken gzip stream can be read
            if strict:
                raise
            if errors is not None:
                errors.append(err)
            return
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a byte-order mark would otherwise make line 1 malformed
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            err = PairFormatError(
                path, line_no, f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
            )
        else:
            if not line.strip():
                continue
            try:
                yield parse(json.loads(line))
                continue
            except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
                err = PairFormatError(path, line_no, str(exc))
        if strict:
            raise err from None
        if errors is not None:
            errors.append(err)


def read_pairs(path, *, strict: bool = False, errors: list | None = None) -> Iterator[Pair]:
    """Stream pairs from a JSONL file; bad lines as in :func:`iter_records`."""
    return iter_records(path, pair_from_record, strict=strict, errors=errors)
