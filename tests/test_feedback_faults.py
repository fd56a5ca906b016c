"""The HTTP labeler and the label job against faulty and foreign servers (issue 11), each a local fake on
127.0.0.1 that behaves as a real server was seen to: llama-cpp-python (one prompt per request,
``max_tokens=0`` = unlimited, ``text_offset`` shifted by SentencePiece's leading space, ``repeat_penalty``
1.1 by default), ``transformers serve`` (no list prompts, echo and logprobs ignored), a prompt_logprobs-only
server, TGI's ``/generate``; and faults: malformed replies, a dripping reply, redirects, 4xx/5xx bodies,
locks, provenance, OS errors, bad input lines. Every wait is bounded.

The fake "model" reads characters: the log-prob of character ``c`` at position ``i`` is ``_lp(i, c)``, so the
exact candidate log-prob is known and any off-by-one in locating the candidate changes the number.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rlaif_fast.feedback import LabelJobConfig, OpenAICompatibleBackend, PairwiseLabeler, run_label_job
from rlaif_fast.feedback import job as job_mod
from rlaif_fast.feedback.http_backend import BackendError, ProtocolError, locate_candidate
from rlaif_fast.feedback.job import main as label_main
from tests.test_feedback_labelers import FixedBackend

KEY = "sk-fault-test-1234"


def _lp(i: int, c: str) -> float:
    return -(0.5 + ((ord(c) * 31 + i * 17) % 97) / 10)


def expected(prompt: str, cand: str) -> float:
    return sum(_lp(len(prompt) + j, c) for j, c in enumerate(cand))


class FakeServer:
    """A threaded HTTP server; ``mode`` picks the protocol, ``script`` (a list of callables) overrides replies.

    Modes: "vllm" (list prompts, echo, logprobs), "llamacpp", "tfserve", "plp" (prompt_logprobs only), "tgi".
    """

    def __init__(self, mode: str = "vllm", *, api_key: str | None = None, max_prompt: int | None = None):
        self.mode, self.api_key, self.max_prompt = mode, api_key, max_prompt
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.script: list = []  # callables (handler) -> True when they answered, consumed one per request
        owner = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.auth.append(self.headers.get("Authorization"))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                owner.bodies.append(body)
                if owner.script:
                    if owner.script.pop(0)(self):
                        return
                owner.answer(self, body)

            def do_GET(self):
                self.send(404, {"error": "no"})

            def send(self, status, obj, headers=()):
                data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- the fake model ----
    def _gen(self, body: dict, n: int) -> str:
        penalized = self.mode == "llamacpp" and body.get("repeat_penalty", 1.1) != 1.0
        penalized |= body.get("repetition_penalty", 1.0) != 1.0 or body.get("frequency_penalty", 0) != 0
        if body.get("temperature", 1.0) != 0:
            return "?" * n
        return ("xy" * n)[:n] if penalized else "x" * n

    def _tokens(self, text: str):
        toks = list(text)
        if self.mode == "llamacpp" and toks:
            toks[0] = " " + toks[0]  # SentencePiece's dummy prefix: offsets shifted by one
        offs, pos = [], 0
        for t in toks:
            offs.append(pos)
            pos += len(t)
        lps = [None] + [_lp(i, c) for i, c in enumerate(text)][1:]
        return toks, offs, lps

    def _choice(self, i: int, prompt: str, body: dict) -> dict:
        mt = body.get("max_tokens", 16)
        if self.mode == "llamacpp" and (mt is None or mt <= 0):
            mt = 50  # "until the context is full"
        gen = self._gen(body, mt)
        echo = body.get("echo") and self.mode in ("vllm", "llamacpp")
        ch = {"index": i, "text": prompt + gen if echo else gen, "finish_reason": "length"}
        if body.get("logprobs") is not None and self.mode in ("vllm", "llamacpp"):
            full = prompt + gen if echo else gen
            toks, offs, lps = self._tokens(full)
            if not echo:
                lps = [_lp(len(prompt) + j, c) for j, c in enumerate(gen)]
            ch["logprobs"] = {
                "tokens": toks,
                "text_offset": offs,
                "token_logprobs": lps,
                "top_logprobs": None,
            }
        if self.mode == "plp" and body.get("prompt_logprobs") is not None:
            ch["prompt_logprobs"] = [None] + [
                {str(ord(c)): {"logprob": _lp(j, c), "rank": 1, "decoded_token": c}}
                for j, c in enumerate(prompt)
            ][1:]
        return ch

    def answer(self, h, body: dict):
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return h.send(401, {"error": {"message": "bad key"}})
        if h.path.endswith("/generate"):
            if self.mode != "tgi":
                return h.send(404, {"error": "not found"})
            text = body["inputs"]
            prefill = [{"id": 0, "text": text[0], "logprob": None}]
            prefill += [{"id": ord(c), "text": c, "logprob": _lp(j, c)} for j, c in enumerate(text)][1:]
            return h.send(200, {"generated_text": "x", "details": {"prefill": prefill, "tokens": []}})
        if self.mode == "tgi":
            return h.send(422, {"error": "Input validation error: `echo` is not supported"})
        extra = set(body) - {"model", "prompt", "max_tokens", "temperature", "top_p", "echo", "logprobs"}
        extra -= {"frequency_penalty", "presence_penalty", "stop", "seed", "n"}
        if self.mode == "tfserve" and extra:  # as transformers serve 5.19 answers
            return h.send(422, {"detail": f"Unexpected fields in the request: {sorted(extra)}"})
        prompt = body.get("prompt")
        if isinstance(prompt, list) and self.mode in ("llamacpp", "tfserve") and len(prompt) > 1:
            if self.mode == "llamacpp":
                return h.send(500, {"error": {"message": "", "type": "internal_server_error"}})
            return h.send(400, {"error": "prompt must be a string"})
        if self.mode == "tfserve" and body.get("max_tokens") == 0:
            return h.send(500, {"error": "max_new_tokens must be > 0"})
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if self.max_prompt is not None and any(len(p) > self.max_prompt for p in prompts):
            return h.send(400, {"error": {"message": f"context length exceeded 777 ({self.max_prompt} max)"}})
        h.send(200, {"choices": [self._choice(i, p, body) for i, p in enumerate(prompts)]})


@pytest.fixture
def fake():
    servers = []

    def make(*a, **kw):
        servers.append(FakeServer(*a, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _client(srv, **kw):
    kw = {"timeout": 5.0, "max_retries": 1, "backoff": 0.01, "concurrency": 2, **kw}
    return OpenAICompatibleBackend(srv.url, "m", **kw)


CANDS = ["1", "2", "10"]
PROMPT = "Which is better?\nPreferred="


@pytest.mark.parametrize(
    "mode, route", [("vllm", "list"), ("llamacpp", "single"), ("plp", "prompt_logprobs"), ("tgi", "tgi")]
)
def test_every_route_gives_the_exact_candidate_logprobs(fake, mode, route):
    srv = fake(mode)
    client = _client(srv)
    got = client.candidate_logprobs([PROMPT, "Q=" + PROMPT], CANDS)
    assert client.route == route
    want = [[expected(p, c) for c in CANDS] for p in (PROMPT, "Q=" + PROMPT)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)
    n = len(srv.bodies)
    client.candidate_logprobs([PROMPT], CANDS)  # the probe is cached: no second probe
    per_prompt = 1 if route in ("list", "prompt_logprobs") else len(CANDS)
    assert len(srv.bodies) - n == per_prompt
    # never max_tokens=0 (llama.cpp: unlimited), always greedy
    completions = [b for b in srv.bodies if "prompt" in b]
    assert all(b["max_tokens"] == 1 and b["temperature"] == 0 for b in completions)


def test_llamacpp_like_server_gets_one_prompt_per_request(fake):
    srv = fake("llamacpp")
    client = _client(srv, max_retries=0)
    (lab,) = PairwiseLabeler(client, "summarization").label(["ctx"], ["a"], ["b"])
    assert 0 <= lab.p_a <= 1 and client.route == "single"
    after_probe = [b for b in srv.bodies if "prompt" in b][2:]  # the list attempt, then the single one
    assert after_probe and all(isinstance(b["prompt"], str) for b in after_probe)


def test_rationales_are_greedy_with_every_repetition_penalty_off(fake):
    srv = fake("llamacpp")
    out = _client(srv).generate(["Why?"], max_new_tokens=6)
    assert out == ["x" * 6]  # "xyxyxy" = llama.cpp's default repeat_penalty 1.1 applied
    b = srv.bodies[-1]
    assert b["temperature"] == 0 and b["repeat_penalty"] == 1.0 and b["repetition_penalty"] == 1.0
    assert b["frequency_penalty"] == 0 and b["presence_penalty"] == 0


def test_a_server_without_prompt_logprobs_is_refused_naming_its_replies(fake, tmp_path, capsys):
    srv = fake("tfserve")
    with pytest.raises(ProtocolError, match="prompt must be a string") as exc:
        _client(srv).candidate_logprobs([PROMPT], ["1", "2"])
    assert "ignores echo" in str(exc.value) and "no candidate log-probs by any route" in str(exc.value)
    assert all(b.get("max_tokens") != 0 for b in srv.bodies)
    # the job stops before the first pair, exit 2, the reason on one line
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"context": "c", "response_a": "a", "response_b": "b"}) + "\n")
    rc = label_main(
        ["--in", str(inp), "--out", str(tmp_path / "o.jsonl"), "--labeler", srv.url, "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "prompt must be a string" in err and err.count("\n") == 1
    assert (tmp_path / "o.jsonl").read_text() == ""
    # generation still works there: the non-OpenAI penalty fields it refuses by name are dropped
    client = _client(srv)
    assert client.generate(["Why?"], max_new_tokens=3) == ["xxx"]
    assert client.dropped_fields == {"repetition_penalty", "repeat_penalty"}
    assert "repeat_penalty" not in srv.bodies[-1] and srv.bodies[-1]["temperature"] == 0


def test_locating_the_candidate_by_tokens_not_offsets():
    # llama.cpp: leading space on the first token, offsets shifted by one; a generated token after
    toks = [" Q", "=", "1", "0", " The"]
    assert locate_candidate(toks, "Q=", "10", " The") == [2, 3]
    # a BOS text before the prompt, and byte pieces that do not spell the prompt: aligned from the end
    assert locate_candidate(["<s>", "Q", "=", "1"], "Q=", "1", "") == [3]
    assert locate_candidate(["\ufffd", "=", "1", "0", "x"], "é=", "10", "x") == [2, 3]
    assert locate_candidate([None, "=", "1"], "Q=", "1") == [2]
    with pytest.raises(ValueError, match="no token ends where the candidate"):
        locate_candidate(["Q", "=1", "0x"], "Q=", "10", "x")


def test_malformed_replies_are_failures_not_tracebacks(fake):
    srv = fake("vllm")
    client = _client(srv, on_error="nan", max_retries=1)
    client.probe()
    for _ in range(2):
        srv.script.append(lambda h: h.send(200, {"choices": [1, 2]}) or True)
    rows = client.candidate_logprobs([PROMPT], ["1", "2"])
    assert torch.isnan(rows).all() and "not a list of objects" in client.first_error
    srv.script.extend([lambda h: h.send(200, {"choices": [{"text": 5}]}) or True] * 2)
    assert client.generate(["x"], max_new_tokens=2) == [None]
    srv.script.extend([lambda h: h.send(200, [1, 2]) or True] * 2)
    with pytest.raises(BackendError, match="not a JSON object"):
        _client(srv, max_retries=1, route="list").candidate_logprobs([PROMPT], ["1"])


def test_the_timeout_bounds_the_whole_request(fake):
    srv = fake("vllm")

    def drip(h):  # headers, then one byte every 0.2 s: no single read ever waits a second
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        try:
            for _ in range(50):  # bounded: 10 s at most
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass
        return True

    srv.script.append(drip)
    client = _client(srv, timeout=1.0, max_retries=0, route="list")
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"timed out after 1 s \(the whole request\)"):
        client.candidate_logprobs([PROMPT], ["1"])
    assert time.monotonic() - t0 < 3.0


def test_the_api_key_never_follows_a_redirect_to_another_origin(fake):
    a, b = fake("vllm", api_key=KEY), fake("vllm")
    other = b.url + "/completions"
    a.script.append(lambda h: h.send(302, {}, headers=[("Location", other)]) or True)
    with pytest.raises(BackendError, match=r"HTTP 302: redirected to .*/v1/completions"):
        _client(a, api_key=KEY, route="list").candidate_logprobs([PROMPT], ["1"])
    a.script.append(lambda h: h.send(307, {}, headers=[("Location", other)]) or True)
    got = _client(a, api_key=KEY, route="list").candidate_logprobs([PROMPT], ["1"])  # re-POSTed, no key
    assert got[0, 0].item() == pytest.approx(expected(PROMPT, "1"))
    assert b.auth and all(x is None for x in b.auth)
    a.script.append(lambda h: h.send(307, {}, headers=[("Location", "/v1/completions?again=1")]) or True)
    _client(a, api_key=KEY, route="list").candidate_logprobs(
        [PROMPT], ["1"]
    )  # same origin: the key goes along
    assert a.auth[-1] == f"Bearer {KEY}"


def test_a_5xx_reply_body_is_named_in_the_error(fake):
    srv = fake("vllm")
    srv.script.extend([lambda h: h.send(503, {"error": "overloaded: queue full 123"}) or True] * 2)
    with pytest.raises(BackendError, match="HTTP 503: .*queue full 123"):
        _client(srv, route="list").candidate_logprobs([PROMPT], ["1"])


# ---- the label job ----


def _write(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def _rows(n, ctx="c"):
    return [
        {"id": f"p{i}", "context": f"{ctx}{i}", "response_a": f"a{i}", "response_b": f"b{i}"}
        for i in range(n)
    ]


def _cfg(tmp_path, **kw):
    kw = {
        "input": str(tmp_path / "in.jsonl"),
        "out": str(tmp_path / "out.jsonl"),
        "labeler": "hf:unused",
        **kw,
    }
    return LabelJobConfig(progress=False, **kw)


def test_the_job_prints_the_first_failure_once_and_gives_up(fake, tmp_path, capsys):
    srv = fake("vllm", max_prompt=200)  # the probe fits; every real prompt is "too long"
    _write(tmp_path / "in.jsonl", _rows(40, ctx="long context " * 30))
    args = ["--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--labeler", srv.url]
    args += ["--batch-size", "2", "--give-up-after", "4", "--max-retries", "0", "--no-progress"]
    assert label_main(args) == 1
    cap = capsys.readouterr()
    summary = json.loads(
        cap.out.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"non-JSON {c}")
    )
    assert summary["failed"] == 4 and summary["new"] == 0 and summary["stopped_early"] is True
    assert cap.err.count("context length exceeded 777") == 1 and "HTTP 400" in cap.err
    assert summary["consistency_rate"] is None and "context length exceeded 777" in summary["first_error"]
    assert len(srv.bodies) <= 1 + 4 * 2  # the probe, then 2 requests per pair, nothing after giving up


def test_an_unreachable_server_stops_the_job_before_any_pair(tmp_path, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    _write(tmp_path / "in.jsonl", _rows(3))
    args = ["--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert label_main(args + ["--labeler", f"http://127.0.0.1:{port}/v1", "--max-retries", "0"]) == 1
    err = capsys.readouterr().err
    assert "Connection refused" in err and err.count("\n") == 1


def test_a_wrong_key_stops_the_job_naming_the_reply(fake, tmp_path, capsys, monkeypatch):
    srv = fake("vllm", api_key=KEY)
    monkeypatch.setenv("FAULT_TEST_KEY", "sk-wrong")
    _write(tmp_path / "in.jsonl", _rows(3))
    args = ["--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--labeler", srv.url]
    assert label_main(args + ["--api-key-env", "FAULT_TEST_KEY", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "bad key" in err and err.count("\n") == 1 and "sk-wrong" not in err
    assert len(srv.bodies) == 1  # one probe request, not one per pair


def test_a_second_job_on_the_same_out_is_refused(tmp_path):
    _write(tmp_path / "in.jsonl", _rows(3))
    out = tmp_path / "out.jsonl"
    with open(out, "a") as held:  # another job holds the lock
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another job is writing --out"):
            run_label_job(_cfg(tmp_path), FixedBackend())
    assert out.read_text() == ""
    assert run_label_job(_cfg(tmp_path), FixedBackend())["new"] == 3  # released: the job runs


def test_resuming_with_another_labeler_or_template_is_refused(tmp_path):
    _write(tmp_path / "in.jsonl", _rows(4))
    assert run_label_job(_cfg(tmp_path, limit=2), FixedBackend())["new"] == 2
    rec = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert rec["labeled_by"]["template"] == "summarization" and rec["labeled_by"]["mode"] == "pairwise"
    before = (tmp_path / "out.jsonl").read_text()
    with pytest.raises(
        ValueError, match=r"out\.jsonl:1 was labeled with template='summarization'.*'helpfulness'"
    ):
        run_label_job(_cfg(tmp_path, template="helpfulness"), FixedBackend())
    with pytest.raises(ValueError, match=r"labeler=.*unused.*other"):
        run_label_job(_cfg(tmp_path, labeler="hf:other"), FixedBackend())
    with pytest.raises(ValueError, match="chain_of_thought=False"):
        run_label_job(_cfg(tmp_path, chain_of_thought=True), FixedBackend())
    tpl = tmp_path / "t.txt"  # a template file edited between runs: same name, another text
    for i, ending in enumerate(["Preferred=", "Better="]):
        tpl.write_text("{context}\n1: {first}\n2: {second}\n" + ending)
        cfg = _cfg(tmp_path, template=str(tpl), out=str(tmp_path / "t.jsonl"), limit=1 + i)
        if i == 0:
            run_label_job(cfg, FixedBackend())
        else:
            with pytest.raises(ValueError, match=r"t\.txt \(text sha1 \w+\)"):
                run_label_job(cfg, FixedBackend())
    assert (tmp_path / "out.jsonl").read_text() == before
    done = run_label_job(_cfg(tmp_path), FixedBackend())
    assert done["skipped_done"] == 2 and done["new"] == 2


def test_a_last_record_without_its_newline_is_kept(tmp_path, capsys):
    _write(tmp_path / "in.jsonl", _rows(3))
    out = tmp_path / "out.jsonl"
    run_label_job(_cfg(tmp_path, limit=2), FixedBackend())
    out.write_bytes(out.read_bytes().rstrip(b"\n"))  # e.g. written by another tool
    s = run_label_job(_cfg(tmp_path), FixedBackend())
    assert s["skipped_done"] == 2 and s["new"] == 1 and s["labeled"] == 3
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == ["p0", "p1", "p2"]
    out.write_bytes(out.read_bytes() + b'{"id": "p9", "p_a": 0.')  # torn by a kill: cut, said so
    run_label_job(_cfg(tmp_path), FixedBackend())
    assert "cut a torn last line" in capsys.readouterr().err and len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "content, match",
    [
        (
            b'{"id": "p0", "p_a": 0.5}\ngarbage\n{"id": "p1", "p_a": 0.5}\n',
            r"out\.jsonl:2 is not a JSON record",
        ),
        (b'{"p_a": 0.5}\n', r"out\.jsonl:1 is a record without an 'id'"),
    ],
)
def test_a_damaged_output_names_file_and_line(tmp_path, content, match, capsys):
    _write(tmp_path / "in.jsonl", _rows(2))
    (tmp_path / "out.jsonl").write_bytes(content)
    args = ["--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--labeler", "hf:x"]
    assert label_main(args + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match=match):
        run_label_job(_cfg(tmp_path), FixedBackend())


def test_os_errors_are_one_line_naming_the_path_before_the_model_loads(tmp_path, capsys, monkeypatch):
    _write(tmp_path / "in.jsonl", _rows(2))
    monkeypatch.setattr(
        job_mod, "make_backend", lambda *a: pytest.fail("the labeler loaded before the check")
    )
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--out", str(tmp_path / "outdir")], "is a directory"),
        (["--out", str(tmp_path / "afile" / "o.jsonl")], "Not a directory"),
        (["--in", str(tmp_path), "--out", str(tmp_path / "o.jsonl")], "is not a file"),
    ]
    for extra, what in cases:
        args = ["--in", str(tmp_path / "in.jsonl"), "--labeler", "hf:model", "--no-progress", *extra]
        assert label_main(args) == 2
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1 and str(tmp_path) in err, err
    # disk full while writing a batch: one line naming the output, exit 1, nothing half-counted
    monkeypatch.setattr(job_mod, "make_backend", lambda *a: FixedBackend())

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job_mod.os, "fsync", full)
    args = ["--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o2.jsonl"), "--labeler", "hf:m"]
    assert label_main(args + ["--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "o2.jsonl" in err and err.count("\n") == 1


def test_bad_input_lines_are_skipped_with_file_and_line(tmp_path, capsys):
    rows = [
        {"id": 7, "context": "c", "response_a": "a", "response_b": "b"},
        {"id": "7", "context": "c", "response_a": "a", "response_b": "b"},  # another pair: ids as given
        b'{"context": "caf\xe9", "response_a": "a", "response_b": "b"}',  # latin-1, not UTF-8
        b'{"context": "c", "response_a": "a", "response_b": "b", "human_a": NaN}',
        {"id": None, "context": "c", "response_a": "a", "response_b": "b"},
        {"context": "d", "response_a": "a", "response_b": "b", "human_a": False},
    ]
    _write(tmp_path / "in.jsonl", rows)
    s = run_label_job(_cfg(tmp_path), FixedBackend())
    assert s["new"] == 3 and s["duplicates"] == 0 and s["malformed_lines"] == [3, 4, 5]
    err = capsys.readouterr().err
    assert (
        "in.jsonl:3: not UTF-8" in err
        and "in.jsonl:4: human_a must be" in err
        and "in.jsonl:5: id is null" in err
    )
    got = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in got[:2]] == [7, "7"] and got[2]["human_a"] is False
    again = run_label_job(_cfg(tmp_path), FixedBackend())  # resume: 7 and "7" are both done
    assert again["new"] == 0 and again["skipped_done"] == 3
    # an output written before ids kept their type ("id": "7" for 7, no labeled_by): 7 is not labeled twice
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text(json.dumps({"id": "7", "p_a": 0.5, "consistent": True, "entropy": 0.69}) + "\n")
    s = run_label_job(_cfg(tmp_path, out=str(legacy), limit=1), FixedBackend())
    assert s["skipped_done"] == 2 and s["new"] == 1  # 7 and "7" were both keyed "7" then


def test_a_truncated_gz_labels_what_it_can_and_names_where_it_broke(tmp_path, capsys):
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in _rows(400)))
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(data[: len(data) // 2])
    s = run_label_job(_cfg(tmp_path, input=str(gz), out=str(tmp_path / "o.jsonl")), FixedBackend())
    assert 0 < s["new"] < 400 and "in.jsonl.gz:" in s["input_error"] and "truncated" in s["input_error"]
    broke_at = int(s["input_error"].split("in.jsonl.gz:")[1].split(":")[0])
    assert s["new"] + len(s["malformed_lines"]) == broke_at - 1  # every line before the break was read
    assert "stopped reading at" in capsys.readouterr().err
    lines = (tmp_path / "o.jsonl").read_text().splitlines()
    assert len(lines) == s["new"] and all(math.isfinite(json.loads(x)["p_a"]) for x in lines)
