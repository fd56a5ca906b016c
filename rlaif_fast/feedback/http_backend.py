"""An OpenAI-compatible ``/v1/completions`` endpoint (vLLM, SGLang, llama.cpp, TGI, :mod:`.serve`) as the labeler.

A candidate's log-prob is the sum of the log-probs the server gives the candidate's tokens when it reads
``prompt + candidate`` (exact for multi-token candidates such as "10", no top-k luck). Servers differ in
how they hand those out, so one probe per backend (run once, on first use, then cached) picks a route:

1. ``list``: the K texts in one request as a list prompt, ``echo=true, logprobs=1, max_tokens=1`` (vLLM,
   SGLang, :mod:`.serve`);
2. ``single``: the same, one text per request (llama-cpp-python's server takes one prompt per request);
3. ``prompt_logprobs``: vLLM's ``prompt_logprobs`` field instead of echo (lists, then single);
4. ``tgi``: TGI's native ``/generate`` with ``decoder_input_details`` (the prefill tokens' log-probs).

``max_tokens`` is always 1, never 0 (llama.cpp reads 0 as "until the context is full"); the generated
token is cut away. The candidate is located by token texts aligned with the echoed text, never by
``text_offset`` alone (llama.cpp's offsets are shifted by SentencePiece's leading space). When no route
gives candidate log-probs, :class:`ProtocolError` names each route's reply.

Every request runs under one deadline (``timeout`` bounds connect + send + the whole reply, however slowly it
drips), is retried on connection errors, timeouts, 5xx/429 and malformed replies with exponential backoff,
then fails with :class:`BackendError` naming the server's reply (or yields NaN rows with
``on_error="nan"``; ``first_error`` keeps the first cause). Redirects: 307/308 are followed with the same
POST, the API key only to the same origin; 301/302/303 (which would turn the POST into a GET) are refused
naming the new address. The API key is sent in the Authorization header only; it is never logged or repr'd.
Generation (chain-of-thought rationales) is greedy: temperature 0 and every repetition penalty off.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rlaif_fast.feedback.templates import PromptParts

ROUTES = ("list", "single", "prompt_logprobs", "prompt_logprobs_single", "tgi")
# greedy on every server: vLLM/SGLang (repetition_penalty), llama.cpp (repeat_penalty, default 1.1), OpenAI
GREEDY = {
    "temperature": 0,
    "top_p": 1,
    "repetition_penalty": 1.0,
    "repeat_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}
# not in OpenAI's API: a strict server (transformers serve: HTTP 422 "Unexpected fields") refuses them, so a
# reply naming one drops it for the rest of this backend's life (such a server applies no such penalty)
OPTIONAL_FIELDS = ("repetition_penalty", "repeat_penalty")
_REPLY_CHARS = 300


class BackendError(RuntimeError):
    """A request that still failed after every retry (or failed in a way retrying cannot fix).

    ``status``: the last HTTP status (None for connection errors); ``transient``: a later rerun may succeed."""

    def __init__(self, msg: str, *, status: int | None = None, transient: bool = False):
        super().__init__(msg)
        self.status, self.transient = status, transient


class ProtocolError(BackendError):
    """The server answers, but no route gives the candidates' log-probs (the message names its replies)."""


class _Fail(Exception):
    """One attempt failed; ``retry`` says whether another attempt may succeed."""

    def __init__(self, msg: str, retry: bool, status: int | None = None):
        super().__init__(msg)
        self.retry, self.status = retry, status


class _BadReply(ValueError):
    """The reply parsed as JSON but does not carry what the route needs."""


def _snippet(raw) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    text = " ".join(text.split())
    return text if len(text) <= _REPLY_CHARS else text[:_REPLY_CHARS] + "..."


def _origin(parts: urllib.parse.SplitResult) -> tuple:
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def locate_candidate(tokens: Sequence, prompt: str, candidate: str, after: str = "") -> list[int]:
    """Indices of ``candidate``'s tokens in the token texts a server gave for ``prompt + candidate (+ after)``.

    ``after`` is what the server appended past the candidate (the generated token's text). Tokens are
    aligned with the text, not trusted by offset: first by finding ``prompt + candidate`` in the joined token
    texts (a leading SentencePiece space or a BOS text before it is fine), else, when token texts are missing
    (``None``) or do not spell the prompt (byte pieces), from the end: the last texts must spell
    ``candidate + after``. The candidate must end on a token boundary. Raises ``_BadReply`` otherwise.
    """
    full = prompt + candidate
    start, found = 0, -1
    if all(isinstance(t, str) for t in tokens):
        found = "".join(tokens).find(full)
    if found >= 0:
        b, e = found + len(prompt), found + len(full)
    else:  # align from the end over the last run of known token texts
        start = len(tokens)
        while start > 0 and isinstance(tokens[start - 1], str):
            start -= 1
        joined = "".join(tokens[start:])
        if not joined.endswith(candidate + after):
            raise _BadReply(
                f"the token texts end with {joined[-40:]!r}, not with the candidate {candidate!r} then "
                f"{after[:20]!r}: cannot locate the candidate's tokens"
            )
        e = len(joined) - len(after)
        b = e - len(candidate)
    idx, pos = [], 0
    for i, t in enumerate(tokens[start:], start=start):
        s, pos = pos, pos + len(t)
        if pos > b and s < e and pos > s:
            idx.append((i, s, pos))
    if not idx or idx[-1][2] != e:
        raise _BadReply(
            f"no token ends where the candidate {candidate!r} ends (tokens {list(tokens[-6:])!r}); the server's "
            "tokens do not spell prompt + candidate"
        )
    return [i for i, _, _ in idx]


class OpenAICompatibleBackend:
    """A labeler behind ``{base_url}/completions``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model's name.
        api_key: sent as ``Authorization: Bearer ...`` (never logged; never sent to another origin).
        timeout: seconds per request, for the whole request (connect, send, the full reply).
        max_retries: retries after the first attempt.
        backoff: first retry delay in seconds, doubled each retry (plus up to 10% jitter).
        concurrency: requests in flight at once.
        on_error: "raise" (BackendError) or "nan" (the failed prompt's row is NaN; others still count).
        route: force a route (one of ``ROUTES``) instead of probing.
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
        route: str | None = None,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error={on_error!r} is not supported; use 'raise' or 'nan'")
        if int(max_retries) < 0 or float(timeout) <= 0 or int(concurrency) < 1:
            raise ValueError(
                f"need max_retries >= 0, timeout > 0, concurrency >= 1; got {max_retries!r}, {timeout!r}, {concurrency!r}"
            )
        if route is not None and route not in ROUTES:
            raise ValueError(f"route={route!r} is not one of {ROUTES}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        self.concurrency, self.on_error = int(concurrency), on_error
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self.route: str | None = route
        self._probing = False
        self.dropped_fields: set[str] = set()
        self.probe_replies: dict[str, str] = {}
        self.first_error: str | None = None
        self.stats = {"requests": 0, "retries": 0, "failures": 0}

    def __repr__(self) -> str:
        key = "***" if self._api_key else None
        return f"OpenAICompatibleBackend(base_url={self.base_url!r}, model={self.model!r}, api_key={key!r})"

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _note(self, msg: str) -> None:
        with self._lock:
            self.stats["failures"] += 1
            if self.first_error is None:
                self.first_error = msg

    # ---- one HTTP exchange under one deadline ----
    def _exchange(self, url: str, payload: bytes, deadline: float) -> dict:
        parts = urllib.parse.urlsplit(url)
        home = _origin(urllib.parse.urlsplit(self.base_url))
        for _ in range(6):  # at most 5 redirects
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Fail(f"timed out after {self.timeout:g} s (the whole request)", retry=True)
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            if self._api_key and _origin(parts) == home:
                headers["Authorization"] = f"Bearer {self._api_key}"
            cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = cls(parts.hostname, parts.port, timeout=left)
            fired = threading.Event()

            def cut(conn=conn, fired=fired):
                fired.set()
                sock = conn.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            timer = threading.Timer(left, cut)
            timer.daemon = True
            timer.start()
            try:
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                conn.request("POST", path or "/", body=payload, headers=headers)
                resp = conn.getresponse()
                status, location = resp.status, resp.getheader("Location")
                raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                if fired.is_set():
                    raise _Fail(
                        f"timed out after {self.timeout:g} s (the whole request)", retry=True
                    ) from None
                raise _Fail(f"{type(exc).__name__}: {exc}", retry=True) from None
            finally:
                timer.cancel()
                conn.close()
            if fired.is_set():
                raise _Fail(f"timed out after {self.timeout:g} s (the whole request)", retry=True)
            if status in (307, 308) and location:
                parts = urllib.parse.urlsplit(urllib.parse.urljoin(url, location))
                url = urllib.parse.urlunsplit(parts)
                continue
            if status in (301, 302, 303):
                raise _Fail(
                    f"HTTP {status}: redirected to {location!r}, which would turn the POST into a GET; point "
                    "the labeler at that address",
                    retry=False,
                    status=status,
                )
            if status == 429 or status >= 500:
                raise _Fail(f"HTTP {status}: {_snippet(raw)}", retry=True, status=status)
            if status >= 300:
                raise _Fail(f"HTTP {status}: {_snippet(raw)}", retry=False, status=status)
            try:
                out = json.loads(raw)
            except ValueError:
                raise _Fail(f"malformed JSON reply: {_snippet(raw)}", retry=True, status=status) from None
            if not isinstance(out, dict):
                raise _Fail(
                    f"malformed reply (not a JSON object): {_snippet(raw)}", retry=True, status=status
                )
            return out
        raise _Fail("more than 5 redirects", retry=False)

    def _post(self, body: dict, path: str = "/completions", check=None):
        """POST ``body``; ``check(reply)`` turns the reply into the result (a _BadReply is retried)."""
        url = self.base_url + path if path.startswith("/") else path
        body = {k: v for k, v in body.items() if k not in self.dropped_fields}
        payload = json.dumps(body).encode()
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                delay = self.backoff * 2 ** (attempt - 1)
                time.sleep(delay * (1 + 0.1 * random.random()))
            self._count("requests")
            try:
                reply = self._exchange(url, payload, time.monotonic() + self.timeout)
                return check(reply) if check is not None else reply
            except _Fail as exc:
                last = exc
                named = [k for k in OPTIONAL_FIELDS if k in body and k in str(exc)]
                if exc.status in (400, 422) and named:  # a strict server: resend without the fields it names
                    with self._lock:
                        self.dropped_fields.update(named)
                    return self._post(body, path, check)
                if not exc.retry:
                    raise BackendError(f"{url} answered {exc}", status=exc.status) from None
            except (_BadReply, KeyError, TypeError, AttributeError, IndexError) as exc:
                last = _Fail(f"malformed reply: {exc}", retry=True)
                if self._probing:  # a reply without what a route needs says the route is unsupported
                    raise BackendError(f"{url} answered {last}", status=200) from None
        raise BackendError(
            f"{url} failed after {self.max_retries + 1} attempts: {last}",
            status=last.status,
            transient=last.status is None or last.status >= 500 or last.status == 429,
        )

    def _map(self, fn, items) -> list:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    @staticmethod
    def _text(p) -> str:
        return p.text if isinstance(p, PromptParts) else p

    # ---- the routes ----
    def _body(self, prompt, **extra) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": 1, **GREEDY, **extra}

    @staticmethod
    def _choices(reply: dict, n: int) -> list[dict]:
        choices = reply.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise _BadReply(f"'choices' is not a list of objects: {_snippet(json.dumps(reply))}")
        if len(choices) != n:
            raise _BadReply(f"{len(choices)} choices for {n} prompts")
        idx = [c.get("index", i) for i, c in enumerate(choices)]
        if sorted(idx) == list(range(n)):
            choices = [c for _, c in sorted(zip(idx, choices), key=lambda t: t[0])]
        return choices

    @staticmethod
    def _sum(vals, idx) -> float:
        out = 0.0
        for i in idx:
            v = vals[i]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise _BadReply(f"the candidate token {i} has log-prob {v!r}")
            out += float(v)
        return out

    @classmethod
    def _echo_logprob(cls, ch: dict, prompt: str, cand: str) -> float:
        full, text = prompt + cand, ch.get("text")
        lp = ch.get("logprobs")
        if not isinstance(text, str) or not text.startswith(full):
            raise _BadReply(
                f"the server did not echo the prompt (its text starts {str(text)[:60]!r}); it ignores echo"
            )
        if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
            raise _BadReply(f"no logprobs.tokens in the choice (logprobs={_snippet(json.dumps(lp))})")
        tokens, vals = lp["tokens"], lp.get("token_logprobs")
        if not isinstance(vals, list) or len(vals) != len(tokens):
            raise _BadReply("logprobs.token_logprobs does not match logprobs.tokens")
        return cls._sum(vals, locate_candidate(tokens, prompt, cand, text[len(full) :]))

    @classmethod
    def _plp_logprob(cls, ch: dict, prompt: str, cand: str) -> float:
        plp = ch.get("prompt_logprobs")
        if not isinstance(plp, list) or not plp:
            raise _BadReply(f"no prompt_logprobs in the choice (keys {sorted(ch)})")
        tokens, vals = [], []
        for e in plp:
            if e is None:
                tokens.append(None)
                vals.append(None)
                continue
            if not isinstance(e, dict) or len(e) != 1:
                raise _BadReply(f"a prompt_logprobs entry is not one token: {_snippet(json.dumps(e))}")
            (info,) = e.values()
            tokens.append(info.get("decoded_token"))
            vals.append(info.get("logprob"))
        return cls._sum(vals, locate_candidate(tokens, prompt, cand, ""))

    @classmethod
    def _tgi_logprob(cls, reply: dict, prompt: str, cand: str) -> float:
        prefill = (reply.get("details") or {}).get("prefill")
        if not isinstance(prefill, list) or not prefill:
            raise _BadReply(f"no details.prefill in the reply: {_snippet(json.dumps(reply))}")
        tokens = [t.get("text") if isinstance(t, dict) else None for t in prefill]
        vals = [t.get("logprob") if isinstance(t, dict) else None for t in prefill]
        return cls._sum(vals, locate_candidate(tokens, prompt, cand, ""))

    def _tgi_url(self) -> str:
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        return root + "/generate"

    def _route_logprobs(self, route: str, text: str, candidates: Sequence[str]) -> list[float]:
        """One prompt's K candidate log-probs over ``route`` (raises BackendError)."""
        texts = [text + c for c in candidates]
        if route in ("list", "prompt_logprobs"):
            if route == "list":
                body, one = self._body(texts, echo=True, logprobs=1), self._echo_logprob
            else:
                body, one = self._body(texts, prompt_logprobs=0), self._plp_logprob
            return self._post(
                body,
                check=lambda r: [one(ch, text, c) for ch, c in zip(self._choices(r, len(texts)), candidates)],
            )
        out = []
        for c, t in zip(candidates, texts):
            if route == "single":
                body, one = self._body(t, echo=True, logprobs=1), self._echo_logprob
            elif route == "prompt_logprobs_single":
                body, one = self._body(t, prompt_logprobs=0), self._plp_logprob
            else:  # tgi
                params = {
                    "max_new_tokens": 1,
                    "decoder_input_details": True,
                    "details": True,
                    "do_sample": False,
                }
                out.append(
                    self._post(
                        {"inputs": t, "parameters": params},
                        self._tgi_url(),
                        check=lambda r, c=c: self._tgi_logprob(r, text, c),
                    )
                )
                continue
            out.append(self._post(body, check=lambda r, c=c, one=one: one(self._choices(r, 1)[0], text, c)))
        return out

    def probe(self) -> str:
        """Find (once; cached) the first route that gives finite candidate log-probs; return its name.

        Raises :class:`ProtocolError` naming every route's reply when none does, and :class:`BackendError` at
        once for an answer no route can change (401/403/404: key or address) or a server that cannot be reached.
        """
        with self._probe_lock:
            if self.route is not None:
                return self.route
            replies = {}
            for route in ROUTES:
                self._probing = True
                try:
                    vals = self._route_logprobs(route, "Probe: which is better?\nPreferred=", ["1", "2"])
                except BackendError as exc:
                    if exc.status in (401, 403) or (exc.status == 404 and route != "tgi"):
                        raise
                    if exc.status is None and route == "list":  # nothing answers at all
                        raise
                    replies[route] = str(exc)
                    continue
                finally:
                    self._probing = False
                if all(math.isfinite(v) for v in vals):
                    self.route, self.probe_replies = route, replies
                    return route
                replies[route] = f"non-finite log-probs {vals}"
            self.probe_replies = replies
            listing = "; ".join(f"[{r}] {m}" for r, m in replies.items())
            raise ProtocolError(
                f"{self.base_url} gives no candidate log-probs by any route (list prompts with echo, one prompt "
                f"with echo, prompt_logprobs, TGI /generate details): {listing}. The labeler needs the log-probs "
                "of prompt tokens: serve it with vLLM, SGLang, llama-cpp-python (logits_all) or TGI, or use hf:DIR"
            )

    def _one_prompt(self, text: str, candidates: Sequence[str]) -> list[float]:
        try:
            return self._route_logprobs(self.route, text, candidates)
        except BackendError as exc:
            if self.on_error == "raise":
                raise
            self._note(str(exc))
            return [math.nan] * len(candidates)

    def _ensure_route(self) -> bool:
        if self.route is not None:
            return True
        try:
            self.probe()
            return True
        except ProtocolError:
            raise
        except BackendError as exc:
            if self.on_error == "raise":
                raise
            self._note(str(exc))
            return False

    def candidate_logprobs(self, prompts: Sequence, candidates: Sequence[str]) -> torch.Tensor:
        """(N, K) float64 log-probs of each candidate continuation; NaN rows for failures with on_error="nan"."""
        if not prompts:
            return torch.zeros((0, len(candidates)), dtype=torch.float64)
        if not self._ensure_route():
            return torch.full((len(prompts), len(candidates)), math.nan, dtype=torch.float64)
        rows = self._map(lambda p: self._one_prompt(self._text(p), candidates), prompts)
        return torch.tensor(rows, dtype=torch.float64).reshape(len(prompts), len(candidates))

    def generate(self, prompts: Sequence, *, max_new_tokens: int = 64) -> list[str | None]:
        """Greedy continuations (temperature 0, repetition penalties off). Failures give None with
        on_error="nan", so that a failed rationale is told apart from an empty one (PairwiseLabeler then
        counts the pair as failed)."""

        def text_of(reply):
            choices = self._choices(reply, 1)
            if not isinstance(choices[0].get("text"), str):
                raise _BadReply(f"the choice has no text: {_snippet(json.dumps(choices[0]))}")
            return choices[0]["text"]

        def one(p):
            body = {"model": self.model, "prompt": self._text(p), "max_tokens": int(max_new_tokens), **GREEDY}
            try:
                return self._post(body, check=text_of)
            except BackendError as exc:
                if self.on_error == "raise":
                    raise
                self._note(str(exc))
                return None

        return self._map(one, prompts)
