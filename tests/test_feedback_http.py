"""OpenAICompatibleBackend against a real HTTP server on 127.0.0.1 (rlaif_fast.feedback.serve) serving
a tiny HF model: same labels as HFBackend, injected 500s / timeouts / malformed JSON, retries, counting."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import urllib.error
import urllib.request

import pytest
import torch

from rlaif_fast.feedback import (
    BackendError,
    HFBackend,
    LabelJobConfig,
    OpenAICompatibleBackend,
    PairwiseLabeler,
    ScoreLabeler,
    run_label_job,
)
from rlaif_fast.feedback.serve import CompletionServer
from tests.test_feedback_labelers import (
    CONTEXTS,
    RESP_A,
    RESP_B,
    _stories,
    gpt2_tokenizer,
    tiny_gpt2,
)

KEY = "sk-test-secret-4242"


@pytest.fixture(scope="module")
def model_and_tok():
    from pathlib import Path

    from tests.conftest import SHARED_DATA

    if not Path(SHARED_DATA).is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return tiny_gpt2(), gpt2_tokenizer(SHARED_DATA)


@pytest.fixture
def server(model_and_tok):
    model, tok = model_and_tok
    with CompletionServer(model, tok, api_key=KEY, model_name="tiny", hang_s=2.0) as srv:
        yield srv


def _client(srv, **kw):
    kw = {"timeout": 30.0, "max_retries": 2, "backoff": 0.01, "concurrency": 4, **kw}
    return OpenAICompatibleBackend(srv.url, "tiny", api_key=KEY, **kw)


def test_echo_logprobs_follow_vllm_semantics(server, model_and_tok):
    model, tok = model_and_tok
    body = json.dumps(
        {"model": "tiny", "prompt": ["Hello world", "Hi"], "max_tokens": 0, "echo": True, "logprobs": 2}
    ).encode()
    req = urllib.request.Request(
        server.url + "/completions",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        out = json.loads(resp.read())
    c0 = out["choices"][0]
    lp = c0["logprobs"]
    assert c0["text"] == "Hello world" and lp["tokens"] == ["Hello", " world"] and lp["text_offset"] == [0, 5]
    assert (
        lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["top_logprobs"][1]) == 2
    )
    ids = tok("Hello world")["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, 0].float(), -1)[ids[1]].item()
    assert lp["token_logprobs"][1] == pytest.approx(ref, abs=1e-5)
    assert out["choices"][1]["index"] == 1


def test_http_labels_equal_hf_labels(server, model_and_tok):
    model, tok = model_and_tok
    http = PairwiseLabeler(_client(server), "summarization").label(CONTEXTS, RESP_A, RESP_B)
    local = PairwiseLabeler(HFBackend(model, tok), "summarization").label(CONTEXTS, RESP_A, RESP_B)
    for h, lo in zip(http, local):
        assert h.p_a == pytest.approx(lo.p_a, abs=2e-5) and h.consistent == lo.consistent
    scores = ScoreLabeler(_client(server), "summarization")(CONTEXTS[:1], RESP_A[:1])
    ref = ScoreLabeler(HFBackend(model, tok), "summarization")(CONTEXTS[:1], RESP_A[:1])
    assert scores[0] == pytest.approx(ref[0], abs=2e-5) and -1 <= scores[0] <= 1


@pytest.mark.parametrize("fault", ["500", "timeout", "malformed"])
def test_injected_faults_are_retried(server, fault):
    client = _client(server, concurrency=1, timeout=1.0)  # the server hangs 2 s on "timeout"
    server.inject(fault, fault)  # two failures, then success on the third attempt
    (lab,) = PairwiseLabeler(client, "summarization").label(["c"], ["a"], ["b"])
    assert 0.0 <= lab.p_a <= 1.0
    assert client.stats["retries"] == 2 and client.stats["failures"] == 0


def test_exhausted_retries_raise_or_count(server):
    client = _client(server, concurrency=1)
    client.probe()  # the route probe runs once, before the faults below
    server.inject(*["500"] * 3)
    with pytest.raises(BackendError, match="failed after 3 attempts: HTTP 500"):
        client.candidate_logprobs(["x"], ["1", "2"])
    nan_client = _client(server, concurrency=1, on_error="nan")
    nan_client.probe()
    server.inject(*["500"] * 3)
    rows = nan_client.candidate_logprobs(["x", "y"], ["1", "2"])  # first prompt fails, second succeeds
    assert torch.isnan(rows[0]).all() and torch.isfinite(rows[1]).all()
    assert nan_client.stats["failures"] == 1
    labels = PairwiseLabeler(nan_client, "summarization").label(["c"], ["a"], ["b"])
    assert 0 <= labels[0].p_a <= 1
    bad_client = _client(server, concurrency=1, on_error="nan", max_retries=0)
    bad_client.probe()
    server.inject(*["500"] * 3)
    bad = PairwiseLabeler(bad_client, "summarization")
    assert math.isnan(bad.label(["c"], ["a"], ["b"])[0].p_a)


def test_wrong_key_is_not_retried_and_never_logged(server, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    wrong = OpenAICompatibleBackend(server.url, "tiny", api_key="sk-wrong-key", max_retries=3, backoff=0.01)
    with pytest.raises(BackendError, match="HTTP 401") as exc:
        wrong.candidate_logprobs(["x"], ["1"])
    assert wrong.stats["requests"] == 1  # a 4xx is not retried
    assert "sk-wrong-key" not in str(exc.value) and "sk-wrong-key" not in repr(wrong)
    _client(server).candidate_logprobs(["x"], ["1"])
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text, repr(_client(server))):
        assert KEY not in text and "sk-wrong-key" not in text


def test_bad_backend_arguments():
    with pytest.raises(ValueError, match="must start with http"):
        OpenAICompatibleBackend("localhost:8000", "m")
    with pytest.raises(ValueError, match="on_error='skip'"):
        OpenAICompatibleBackend("http://127.0.0.1:1/v1", "m", on_error="skip")
    with pytest.raises(ValueError, match="unknown injected failures"):
        CompletionServer(torch.nn.Linear(1, 1), None, failures=["404"])


def test_label_job_over_http_counts_failures_and_resumes(server, tmp_path, monkeypatch):

    monkeypatch.setenv("TEST_LABELER_KEY", KEY)
    inp = tmp_path / "in.jsonl"
    rows = [{"context": f"Question {i}?", "response_a": f"yes {i}", "response_b": "no"} for i in range(5)]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = LabelJobConfig(
        input=str(inp),
        out=str(tmp_path / "out.jsonl"),
        labeler=server.url,
        model="tiny",
        api_key_env="TEST_LABELER_KEY",
        max_retries=0,
        batch_size=2,
        progress=False,
    )
    from rlaif_fast.feedback import make_backend

    backend = make_backend(cfg.labeler, cfg)
    backend.probe()  # the route probe runs once, before the fault below
    server.inject("500")  # one request (one order of one pair) fails with no retry left
    first = run_label_job(cfg, backend)
    assert first["failed"] == 1 and first["new"] == 4
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(0 <= json.loads(x)["p_a"] <= 1 for x in lines)  # no partial record
    second = run_label_job(cfg)  # the rerun labels only the failed pair
    assert second["new"] == 1 and second["skipped_done"] == 4 and second["labeled"] == 5


# -------------------- dropped connections and failed rationales


class _TruncatingServer:
    """A raw socket server that promises a 500-byte body, sends 13 bytes and closes the connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                # read the whole request first: closing with unread bytes makes the kernel send a reset,
                # and the client would see ConnectionResetError instead of the truncated body
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                length = next(
                    (
                        int(x.split(b":")[1])
                        for x in head.split(b"\r\n")
                        if x.lower().startswith(b"content-length")
                    ),
                    0,
                )
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests += 1
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                    b'{"choices": ['
                )

    def close(self):
        self.sock.close()


def test_a_connection_dropped_mid_body_is_retried_then_counted():
    srv = _TruncatingServer()
    try:
        kw = {"max_retries": 2, "backoff": 0.01, "timeout": 5.0, "concurrency": 1}
        with pytest.raises(BackendError, match="failed after 3 attempts: IncompleteRead"):
            OpenAICompatibleBackend(srv.url, "m", **kw).candidate_logprobs(["x"], ["1", "2"])
        assert srv.requests == 3
        nan_client = OpenAICompatibleBackend(srv.url, "m", on_error="nan", **kw)
        rows = nan_client.candidate_logprobs(["x"], ["1", "2"])  # the labeling job's setting: a NaN row
        assert torch.isnan(rows).all() and nan_client.stats["failures"] == 1
        assert nan_client.generate(["x"], max_new_tokens=2) == [None]
    finally:
        srv.close()


def test_the_http_backend_reports_a_failed_rationale_as_none(monkeypatch):
    client = OpenAICompatibleBackend("http://127.0.0.1:1/v1", "m", on_error="nan", max_retries=0, timeout=1.0)
    assert client.generate(["x"], max_new_tokens=2) == [None]


# -------------------- served models: sentencepiece, echo tokens, long prompts


def test_served_sentencepiece_labeler_scores_like_the_local_one(shared_data):
    """tok512 (SentencePiece-style) decodes a lone "▁had" as "had": per-token text offsets fell behind the
    prompt, so the client found no candidate token (or only part of "10") after the prompt."""
    model, tok = _stories(shared_data)
    ctx, resp = ["Tom had a red ball and he liked to play with it every day."], ["Tom had a ball."]
    with CompletionServer(model, tok) as srv:
        http = OpenAICompatibleBackend(srv.url, "local", max_retries=0)
        got = ScoreLabeler(http, "summarization").score(ctx, resp)
    ref = ScoreLabeler(HFBackend(model, tok), "summarization").score(ctx, resp)
    assert got[0] == pytest.approx(ref[0], abs=2e-5)


def test_served_echo_tokens_concatenate_to_the_text(shared_data):
    model, tok = _stories(shared_data)
    with CompletionServer(model, tok) as srv:
        body = {
            "prompt": "Tom had a red ball.",
            "max_tokens": 2,
            "echo": True,
            "logprobs": 0,
            "temperature": 0,
        }
        req = urllib.request.Request(
            srv.url + "/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            ch = json.loads(resp.read())["choices"][0]
    lp = ch["logprobs"]
    assert "".join(lp["tokens"]) == ch["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]


def test_a_prompt_longer_than_the_served_model_gets_a_400(shared_data):
    """GPT-2 has n_positions learned positions: a longer prompt raised IndexError in the request thread and the
    connection dropped without an answer, which the client retries as a transient failure."""
    model, tok = tiny_gpt2(n_positions=32), gpt2_tokenizer(shared_data)
    with CompletionServer(model, tok) as srv:
        body = {"prompt": "word " * 40, "max_tokens": 0, "echo": True, "logprobs": 0}
        req = urllib.request.Request(
            srv.url + "/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=30)
        assert exc.value.code == 400 and b"32" in exc.value.read()
        body = {"prompt": "word " * 20, "max_tokens": 20}  # fits, but its completion would not
        req = urllib.request.Request(
            srv.url + "/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=30)
        assert exc.value.code == 400
