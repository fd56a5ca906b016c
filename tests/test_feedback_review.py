"""Review regressions for rlaif_fast.feedback: a truncated HTTP body, resuming with another --mode,
chain of thought whose rationale request failed, and a UTF-8 BOM at the start of an input file."""

from __future__ import annotations

import json
import math
import socket
import threading

import pytest
import torch

from rlaif_fast.feedback import (
    BackendError,
    LabelJobConfig,
    OpenAICompatibleBackend,
    PairwiseLabeler,
    run_label_job,
)
from rlaif_fast.feedback.pairs import read_pairs
from tests.test_feedback_labelers import FixedBackend


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
                conn.recv(65536)
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


class _FlakyRationales(FixedBackend):
    """FixedBackend plus ``generate``: the rationale request of prompt ``fail`` failed (on_error="nan")."""

    def __init__(self, fail: int):
        self.fail = fail

    def generate(self, prompts, *, max_new_tokens=64):
        return [None if i == self.fail else f"rationale {i}" for i in range(len(prompts))]


def test_chain_of_thought_with_a_failed_rationale_marks_the_pair_failed():
    labeler = PairwiseLabeler(_FlakyRationales(fail=3), "summarization", chain_of_thought=True)
    labs = labeler.label(["c0", "c1"], ["a0", "a1"], ["b0", "b1"])  # prompt 3 = pair 1, order (b, a)
    assert 0.0 <= labs[0].p_a <= 1.0 and labs[0].rationales == ("rationale 0", "rationale 1")
    assert math.isnan(labs[1].p_a)  # not a label computed after an empty rationale: the job retries it


def test_the_http_backend_reports_a_failed_rationale_as_none(monkeypatch):
    client = OpenAICompatibleBackend("http://127.0.0.1:1/v1", "m", on_error="nan", max_retries=0, timeout=1.0)
    assert client.generate(["x"], max_new_tokens=2) == [None]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class _CheckFree(FixedBackend):
    def generate(self, prompts, *, max_new_tokens=64):
        return ["r"] * len(prompts)


def test_resuming_into_an_output_of_the_other_mode_fails_before_labeling(tmp_path):
    rows = [{"context": f"c{i}", "response_a": f"a{i}", "response_b": f"b{i}"} for i in range(3)]
    inp = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cfg = lambda mode: LabelJobConfig(  # noqa: E731
        input=str(inp), out=str(out), labeler="hf:unused", mode=mode, progress=False
    )
    assert run_label_job(cfg("pairwise"), _CheckFree())["new"] == 3
    before = out.read_text()
    with pytest.raises(ValueError, match=r"out\.jsonl.*pairwise.*--mode score"):
        run_label_job(cfg("score"), _CheckFree())
    assert out.read_text() == before  # nothing appended: the file stays one mode
    out2 = tmp_path / "scores.jsonl"
    assert (
        run_label_job(
            LabelJobConfig(input=str(inp), out=str(out2), labeler="hf:unused", mode="score", progress=False),
            _CheckFree(),
        )["new"]
        == 6
    )
    with pytest.raises(ValueError, match=r"scores\.jsonl.*score.*--mode pairwise"):
        run_label_job(
            LabelJobConfig(input=str(inp), out=str(out2), labeler="hf:unused", progress=False), _CheckFree()
        )


def test_input_with_a_utf8_bom_loses_no_pair(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [
        {"prompt": "p", "chosen": "é ok", "rejected": "no"},
        {"prompt": "q", "chosen": "yes", "rejected": "no"},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8-sig")
    errors = []
    pairs = list(read_pairs(path, errors=errors))
    assert errors == [] and [p.response_a for p in pairs] == ["é ok", "yes"]
