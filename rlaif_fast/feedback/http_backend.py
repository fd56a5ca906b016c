"""An OpenAI-compatible ``/v1/completions`` endpoint (vLLM, SGLang, TGI, :mod:`.serve`) as the labeler.

Candidate log-probs use echo, as evaluation harnesses do with vLLM: one request per prompt carries the K
texts ``prompt + candidate`` with ``echo=true, max_tokens=0, logprobs=0``; the log-prob of a candidate is
the sum over the echoed tokens that end after the prompt. That is exact for multi-token candidates
("10") and needs no top-k luck. Requests run concurrently in a thread pool; each one is retried on
connection errors, timeouts, 5xx/429 and malformed JSON with exponential backoff, then fails with
:class:`BackendError` (or yields NaN rows with ``on_error="nan"``, which the labeling job counts as
failed pairs). The API key is sent in the Authorization header only; it is never logged or repr'd.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rlaif_fast.feedback.templates import PromptParts


class BackendError(RuntimeError):
    """A request that still failed after every retry (or failed in a way retrying cannot fix)."""


class _Retryable(Exception):
    pass


class OpenAICompatibleBackend:
    """A labeler behind ``{base_url}/completions``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model's name.
        api_key: sent as ``Authorization: Bearer ...`` (never logged).
        timeout: seconds per request. max_retries: retries after the first attempt.
        backoff: first retry delay in seconds, doubled each retry (plus up to 10% jitter).
        concurrency: requests in flight at once.
        on_error: "raise" (BackendError) or "nan" (the failed prompt's row is NaN; others still count).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
        on_error: str = "raise",
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error={on_error!r} is not supported; use 'raise' or 'nan'")
        if int(max_retries) < 0 or float(timeout) <= 0 or int(concurrency) < 1:
            raise ValueError(
                f"need max_retries >= 0, timeout > 0, concurrency >= 1; got {max_retries!r}, {timeout!r}, {concurrency!r}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        self.concurrency, self.on_error = int(concurrency), on_error
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "failures": 0}

    def __repr__(self) -> str:
        key = "***" if self._api_key else None
        return f"OpenAICompatibleBackend(base_url={self.base_url!r}, model={self.model!r}, api_key={key!r})"

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _post_once(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(
            f"{self.base_url}/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        self._count("requests")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code == 429:
                raise _Retryable(f"HTTP {exc.code}") from None
            raise BackendError(
                f"{self.base_url}/completions answered HTTP {exc.code}: {exc.read()[:200]!r}"
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # OSError: timeouts and resets; HTTPException: a body cut short (IncompleteRead), a bad status line
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        try:
            out = json.loads(raw)
            if not isinstance(out.get("choices"), list):
                raise ValueError("no 'choices' list")
            return out
        except (ValueError, AttributeError) as exc:
            raise _Retryable(f"malformed JSON response ({exc})") from None

    def _post(self, body: dict) -> dict:
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                delay = self.backoff * 2 ** (attempt - 1)
                time.sleep(delay * (1 + 0.1 * random.random()))
            try:
                return self._post_once(body)
            except _Retryable as exc:
                last = exc
        self._count("failures")
        raise BackendError(
            f"{self.base_url}/completions failed after {self.max_retries + 1} attempts: {last}"
        )

    def _map(self, fn, items) -> list:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    @staticmethod
    def _text(p) -> str:
        return p.text if isinstance(p, PromptParts) else p

    def _one_prompt(self, text: str, candidates: Sequence[str]) -> list[float]:
        body = {
            "model": self.model,
            "prompt": [text + c for c in candidates],
            "max_tokens": 0,
            "echo": True,
            "logprobs": 0,
            "temperature": 0,
        }
        try:
            choices = sorted(self._post(body)["choices"], key=lambda c: c.get("index", 0))
            out = []
            for ch in choices:
                lp = ch["logprobs"]
                # tokens that end after the prompt belong to the candidate (a boundary-merged one included)
                ends = [o + len(t) for o, t in zip(lp["text_offset"], lp["tokens"])]
                vals = [v for e, v in zip(ends, lp["token_logprobs"]) if e > len(text) and v is not None]
                if not vals:
                    raise BackendError(
                        f"the server echoed no candidate token after a prompt of {len(text)} chars"
                    )
                out.append(float(sum(vals)))
            if len(out) != len(candidates):
                raise BackendError(f"the server returned {len(out)} choices for {len(candidates)} candidates")
            return out
        except (KeyError, TypeError) as exc:
            if self.on_error == "raise":
                raise BackendError(
                    f"the server's logprobs block is missing {exc}; does it support echo?"
                ) from None
            return [math.nan] * len(candidates)
        except BackendError:
            if self.on_error == "raise":
                raise
            return [math.nan] * len(candidates)

    def candidate_logprobs(self, prompts: Sequence, candidates: Sequence[str]) -> torch.Tensor:
        """(N, K) float64 log-probs of each candidate continuation; NaN rows for failures with on_error="nan"."""
        rows = self._map(lambda p: self._one_prompt(self._text(p), candidates), prompts)
        return torch.tensor(rows, dtype=torch.float64).reshape(len(prompts), len(candidates))

    def generate(self, prompts: Sequence, *, max_new_tokens: int = 64) -> list[str | None]:
        """Greedy continuations (temperature 0). Failures give None with on_error="nan", so that a failed
        rationale is told apart from an empty one (PairwiseLabeler then counts the pair as failed)."""

        def one(p):
            body = {
                "model": self.model,
                "prompt": self._text(p),
                "max_tokens": int(max_new_tokens),
                "temperature": 0,
            }
            try:
                return str(self._post(body)["choices"][0]["text"])
            except (BackendError, KeyError, IndexError, TypeError):
                if self.on_error == "raise":
                    raise
                return None

        return self._map(one, prompts)
