"""A small OpenAI-compatible ``/v1/completions`` server for a local transformers model.

It speaks the subset of the protocol that AI labeling uses, with vLLM's semantics: ``prompt`` as a string
or a list of strings (one choice each), ``max_tokens`` (0 allowed with ``echo``), ``temperature`` (0 =
greedy), ``logprobs`` = k (each token's log-prob plus its top-k alternatives) and ``echo`` (the prompt's
tokens come back first, the very first one with log-prob ``null``). Token texts and ``text_offset`` are
per-token decodes, as vLLM returns them.

It exists so that :class:`~rlaif_fast.feedback.OpenAICompatibleBackend` is tested against a real HTTP
server (tests start it on 127.0.0.1 on a free port), and so a labeler can be served to several jobs:
``python -m rlaif_fast.feedback.serve --model PATH --port 8000``. It computes full logits per request:
a reference server, not a fast one. ``failures`` injects faults ("500", "timeout", "malformed") into the
next requests, one per request, to test retries. The API key is compared, never logged.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

FAULTS = ("500", "timeout", "malformed")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # method, path and status only: headers (the key) never reach the log
        if self.server.owner.verbose:
            sys.stderr.write(f"serve: {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    def _send(self, status: int, body: bytes, ctype: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode())

    def _authorized(self) -> bool:
        key = self.server.owner.api_key
        return key is None or self.headers.get("Authorization", "") == f"Bearer {key}"

    def do_GET(self):
        if not self._authorized():
            return self._json(401, {"error": {"message": "invalid or missing API key"}})
        if self.path.rstrip("/") == "/v1/models":
            return self._json(
                200, {"object": "list", "data": [{"id": self.server.owner.model_name, "object": "model"}]}
            )
        self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        owner = self.server.owner
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        owner.count_request()
        if not self._authorized():
            return self._json(401, {"error": {"message": "invalid or missing API key"}})
        if self.path.rstrip("/") != "/v1/completions":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        fault = owner.next_fault()
        if fault == "500":
            return self._json(500, {"error": {"message": "injected failure"}})
        if fault == "timeout":  # hang past the client's timeout; whatever follows goes to a closed socket
            time.sleep(owner.hang_s)
            return self._json(504, {"error": {"message": "injected timeout"}})
        if fault == "malformed":
            return self._send(200, b'{"choices": [{"text": ')
        try:
            req = json.loads(raw)
            resp = owner.complete(req)
        except (ValueError, TypeError, KeyError) as exc:
            return self._json(400, {"error": {"message": str(exc)}})
        self._json(200, resp)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the request threads: no torch work at interpreter exit
    owner: CompletionServer

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the client gave up (its timeout): expected with injected hangs
        super().handle_error(request, client_address)


class CompletionServer:
    """Serve ``model`` (a transformers causal LM) and ``tokenizer`` on ``http://host:port/v1``.

    Use as a context manager, or ``start()`` / ``stop()``. ``port=0`` picks a free port (see ``url``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        model_name: str = "local",
        failures=(),
        hang_s: float = 2.0,
        verbose: bool = False,
    ):
        bad = [f for f in failures if f not in FAULTS]
        if bad:
            raise ValueError(f"unknown injected failures {bad}; use any of {FAULTS}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.api_key, self.model_name, self.hang_s, self.verbose = api_key, model_name, float(hang_s), verbose
        self._faults = deque(failures)
        self._lock = threading.Lock()  # one forward at a time: torch threads already use the cores
        self.requests = 0
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def inject(self, *failures: str) -> None:
        """Queue faults for the next requests, one per request."""
        with self._lock:
            self._faults.extend(failures)

    def next_fault(self):
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def count_request(self):
        with self._lock:
            self.requests += 1

    def start(self) -> CompletionServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- the completion itself ----
    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=next(self.model.parameters()).device)
        return torch.log_softmax(self.model(input_ids=x).logits[0].float(), dim=-1).cpu()  # (T, V)

    def _choice(self, index: int, prompt: str, req: dict) -> dict:
        max_tokens = int(req.get("max_tokens", 16))
        echo, k = bool(req.get("echo", False)), req.get("logprobs")
        temperature = float(req.get("temperature", 1.0))
        if max_tokens < 0 or (max_tokens == 0 and not echo):
            raise ValueError(f"max_tokens={max_tokens} is invalid; use >= 1, or 0 together with echo")
        ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise ValueError("the prompt is empty")
        from rlaif_fast.ops.model import context_length

        limit = context_length(self.model.config)
        if limit is not None and len(ids) + max_tokens > limit:  # as vLLM: a 400, not a dropped connection
            raise ValueError(
                f"this model's maximum context length is {limit} tokens; the request needs {len(ids) + max_tokens} "
                f"({len(ids)} in the prompt, {max_tokens} in the completion)"
            )
        n_prompt, gen_lp = len(ids), []
        with self._lock:
            for _ in range(max_tokens):
                lp = self._logprobs(ids)[-1]  # (V,)
                nxt = (
                    int(lp.argmax())
                    if temperature == 0
                    else int(torch.multinomial((lp / temperature).softmax(-1), 1))
                )
                ids.append(nxt)
                gen_lp.append(float(lp[nxt]))
                if nxt == self.tokenizer.eos_token_id:
                    break
            full = self._logprobs(ids) if (k is not None and echo) else None
        text = self._decode(ids)[len(self._decode(ids[:n_prompt])) :]  # keeps a first token's leading space
        choice = {"index": index, "text": (prompt + text) if echo else text, "finish_reason": "length"}
        if k is not None:
            choice["logprobs"] = self._logprob_block(ids, n_prompt if not echo else 0, full, int(k), gen_lp)
        return choice

    def _decode(self, ids: list[int]) -> str:
        """As vLLM detokenizes: special tokens skipped, no clean-up of spaces."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _logprob_block(self, ids, start, full, k, gen_lp) -> dict:
        # a token's text is what it adds to the decoded prefix (a lone SentencePiece "▁had" decodes to "had")
        prefixes = [self._decode(ids[:i]) for i in range(start, len(ids) + 1)]
        tokens = [b[len(a) :] for a, b in zip(prefixes, prefixes[1:])]
        offsets = [len(a) - len(prefixes[0]) for a in prefixes[:-1]]
        if full is None:  # no echo: generated tokens only, log-probs from the decode loop
            token_lps, tops = gen_lp, [None] * len(gen_lp)
        else:
            token_lps = [None] + [float(full[i - 1, ids[i]]) for i in range(1, len(ids))]
            tops = [None]
            for i in range(1, len(ids)):
                v, j = full[i - 1].topk(k) if k > 0 else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
                tops.append({self.tokenizer.decode([int(t)]): float(x) for x, t in zip(v, j)})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def complete(self, req: dict) -> dict:
        prompts = req["prompt"]
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a string or a list of strings")
        choices = [self._choice(i, p, req) for i, p in enumerate(prompts)]
        return {
            "id": f"cmpl-{time.time_ns()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
        }


def main(argv: list[str] | None = None) -> int:
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(
        prog="python -m rlaif_fast.feedback.serve", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="local directory of a transformers causal LM")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default=None, help="name of the environment variable holding the API key")
    a = p.parse_args(argv)
    key = os.environ.get(a.api_key_env) if a.api_key_env else None
    srv = CompletionServer(
        AutoModelForCausalLM.from_pretrained(a.model),
        AutoTokenizer.from_pretrained(a.model),
        host=a.host,
        port=a.port,
        api_key=key,
        model_name=a.model,
        verbose=True,
    )
    print(f"serving {a.model} at {srv.url}", flush=True)
    try:
        srv._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
