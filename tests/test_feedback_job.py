"""The labeling job: input formats, malformed lines, failures, and kill-and-resume with no pair lost or
labeled twice (an injected interrupt in-process, and a SIGKILLed `rlaif-fast label` subprocess)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from itertools import islice

import pytest
import torch

from rlaif_fast.feedback import (
    HFBackend,
    LabelJobConfig,
    OpenAICompatibleBackend,
    PairwiseLabeler,
    read_pairs,
    run_label_job,
)
from rlaif_fast.feedback.job import main as label_main
from rlaif_fast.feedback.pairs import PairFormatError, split_dialogue
from tests.test_feedback_labelers import FixedBackend, gpt2_tokenizer, tiny_gpt2

HH = "hh_rlhf_harmless_base_test/test.jsonl.gz"


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def hh_rows(shared_data, n):
    with gzip.open(shared_data / HH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, n)]


def read_out(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_three_input_formats_and_hh_split(tmp_path, shared_data):
    rows = [
        {"prompt": "P", "chosen": "good", "rejected": "bad"},
        {"id": "x7", "context": "C", "response_a": "one", "response_b": "two"},
        *hh_rows(shared_data, 2),
    ]
    pairs = list(read_pairs(write_jsonl(tmp_path / "in.jsonl", rows)))
    assert (pairs[0].context, pairs[0].response_a, pairs[0].response_b, pairs[0].human_a) == (
        "P",
        "good",
        "bad",
        True,
    )
    assert pairs[1].id == "x7" and pairs[1].human_a is None
    hh = pairs[2]
    assert hh.context.startswith("\n\nHuman: what are some pranks") and hh.context.endswith("\n\nAssistant:")
    assert hh.response_a.startswith(" No, sorry!") and hh.response_b.startswith(" There are lots of funny")
    assert (
        hh.context + hh.response_a == rows[2]["chosen"] and hh.context + hh.response_b == rows[2]["rejected"]
    )
    # content ids are stable across reads (resume depends on it) and distinct
    assert [p.id for p in read_pairs(tmp_path / "in.jsonl")] == [p.id for p in pairs]
    assert len({p.id for p in pairs}) == 4
    # the gzipped real file streams directly
    assert sum(1 for _ in islice(read_pairs(shared_data / HH), 50)) == 50
    with pytest.raises(ValueError, match="share no"):
        split_dialogue("Human: a", "Human: b")


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "P", "chosen": "a", "rejected": "b"},
            '{"prompt": "P", "chosen": ',
            {"foo": 1},
            "",
            {"context": "c", "response_a": "", "response_b": "b"},
            {"context": "c", "response_a": "a", "response_b": "b"},
        ],
    )
    errors = []
    assert len(list(read_pairs(path, errors=errors))) == 2
    assert [e.line_no for e in errors] == [2, 3, 5]
    assert "match no known shape" in errors[1].reason and "response_a is empty" in errors[2].reason
    with pytest.raises(PairFormatError, match=r"in\.jsonl:2: "):
        list(read_pairs(path, strict=True))


class CountingBackend:
    """Wraps a backend; raises KeyboardInterrupt on call ``interrupt_at`` and NaN rows on ``nan_at``."""

    def __init__(self, inner, interrupt_at=None, nan_at=None):
        self.inner, self.calls, self.interrupt_at, self.nan_at = inner, 0, interrupt_at, nan_at

    def check_candidates(self, *a, **k):
        return self.inner.check_candidates(*a, **k)

    def candidate_logprobs(self, prompts, candidates):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        out = self.inner.candidate_logprobs(prompts, candidates)
        if self.calls == self.nan_at:
            out[:2] = float("nan")  # the first pair of this batch fails (both of its orders)
        return out


def _cfg(tmp_path, inp, out, **kw):
    return LabelJobConfig(
        input=str(inp),
        out=str(out),
        labeler="hf:unused",
        template="harmlessness",
        batch_size=3,
        progress=False,
        **kw,
    )


@pytest.mark.filterwarnings("ignore:a prompt's preamble")  # long HH turns at max_length=256: expected
def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path, shared_data):
    inp = write_jsonl(tmp_path / "in.jsonl", hh_rows(shared_data, 11))
    backend = HFBackend(tiny_gpt2(n_positions=512), gpt2_tokenizer(shared_data), batch_size=6, max_length=256)
    ref = run_label_job(_cfg(tmp_path, inp, tmp_path / "ref.jsonl"), backend)
    assert ref["new"] == 11 and ref["failed"] == 0 and ref["labeled"] == 11
    expected = {r["id"]: r for r in read_out(tmp_path / "ref.jsonl")}

    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):  # interrupted during its third batch
        run_label_job(_cfg(tmp_path, inp, out), CountingBackend(backend, interrupt_at=3))
    assert len(read_out(out)) == 6
    with open(out, "a", encoding="utf-8") as f:  # and a kill in the middle of writing a record
        f.write('{"id": "torn", "p_a": 0.')
    # a run where the first pair of its second batch fails: counted, not written
    summary = run_label_job(_cfg(tmp_path, inp, out), CountingBackend(backend, nan_at=2))
    assert summary["skipped_done"] == 6 and summary["failed"] == 1 and summary["new"] == 4
    final = run_label_job(_cfg(tmp_path, inp, out), backend)  # the rerun picks up the failed pair
    assert final["new"] == 1 and final["skipped_done"] == 10 and final["failed"] == 0
    got = read_out(out)
    assert sorted(r["id"] for r in got) == sorted(expected)  # each pair exactly once
    for r in got:
        assert r["p_a"] == pytest.approx(expected[r["id"]]["p_a"], abs=1e-5)
        assert 0.0 <= r["p_a"] <= 1.0 and r["human_a"] is True
    assert 0.0 <= final["consistency_rate"] <= 1.0 and 0.0 <= final["ai_human_alignment"] <= 1.0
    assert final["position_bias_rate"] == pytest.approx(1 - final["consistency_rate"])


def test_cli_strict_and_summary(tmp_path, shared_data, capsys):
    model_dir = tmp_path / "labeler"
    tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer(shared_data).save_pretrained(model_dir)
    inp = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "Say hi", "chosen": "hi", "rejected": "go away"},
            "not json",
            {"context": "Q", "response_a": "yes", "response_b": "no"},
        ],
    )
    args = [
        "--in",
        str(inp),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--labeler",
        f"hf:{model_dir}",
        "--no-progress",
    ]
    assert label_main(args + ["--strict"]) == 2
    assert "in.jsonl:2: " in capsys.readouterr().err
    assert label_main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["new"] == 2 and summary["malformed_lines"] == [2] and "in.jsonl:2" in captured.err
    assert label_main(args[:-1] + ["--batch-size", "0"]) == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkilled_cli_job_resumes(tmp_path, shared_data):
    model_dir = tmp_path / "labeler"
    tiny_gpt2(n_positions=512).save_pretrained(model_dir)
    gpt2_tokenizer(shared_data).save_pretrained(model_dir)
    inp = write_jsonl(tmp_path / "in.jsonl", hh_rows(shared_data, 40))
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "rlaif_fast.cli",
        "label",
        "--in",
        str(inp),
        "--out",
        str(out),
        "--labeler",
        f"hf:{model_dir}",
        "--template",
        "harmlessness",
        "--batch-size",
        "2",
        "--max-length",
        "256",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(read_out(out)) < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(read_out(out))
    assert 4 <= n_before < 40, "the job must have been killed midway"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped_done"] == n_before and summary["new"] == 40 - n_before
    ids = [r["id"] for r in read_out(out)]
    assert len(ids) == len(set(ids)) == 40
    assert torch.tensor([r["p_a"] for r in read_out(out)]).isfinite().all()


def test_make_backend_specs(shared_data, monkeypatch):
    from rlaif_fast.feedback import make_backend

    monkeypatch.setenv("MY_KEY", "sk-from-env")
    cfg = LabelJobConfig(
        input="a.jsonl", out="b.jsonl", labeler="http://127.0.0.1:9/v1", api_key_env="MY_KEY"
    )
    http = make_backend(cfg.labeler, cfg)
    assert (
        isinstance(http, OpenAICompatibleBackend)
        and http.on_error == "nan"
        and http._api_key == "sk-from-env"
    )
    llama = make_backend(f"llama2c:{shared_data / 'stories260K' / 'stories260K.bin'}")
    assert isinstance(llama, HFBackend) and llama.max_length == 512
    (lab,) = PairwiseLabeler(llama, "summarization").label(
        ["Tom had a ball."], ["Tom had a ball."], ["A cat."]
    )
    assert 0.0 <= lab.p_a <= 1.0
    with pytest.raises(ValueError, match="need an existing llama2.c .bin"):
        make_backend(f"llama2c:{shared_data}")
    with pytest.raises(ValueError, match="labeler='gpt2'"):
        LabelJobConfig(input="a", out="b", labeler="gpt2")


SCORE_ROWS = [
    {"prompt": "Say hi", "response": "hi there"},
    {"id": "c1", "context": "Q: 2+2?", "response": "4"},
    {"prompt": "P", "chosen": "good answer", "rejected": "bad answer"},
    '{"prompt": "P", "response": ',
    {"context": "c", "response": "  "},
    {"context": "c", "response_a": "one", "response_b": "two"},
    {"prompt": "Say bye", "response": "bye"},
]


def test_score_mode_reads_single_responses_and_pairs_per_response(tmp_path):
    from rlaif_fast.feedback.job import read_responses

    errors = []
    items = list(read_responses(write_jsonl(tmp_path / "in.jsonl", SCORE_ROWS), errors=errors))
    assert [e.line_no for e in errors] == [4, 5] and "response is empty" in errors[1].reason
    assert [(x.context, x.response) for x in items[:4]] == [
        ("Say hi", "hi there"),
        ("Q: 2+2?", "4"),
        ("P", "good answer"),
        ("P", "bad answer"),
    ]
    assert items[1].id == "c1" and items[2].id == items[2].pair_id + ":a" and items[3].side == "b"
    assert (items[2].human_chosen, items[3].human_chosen, items[4].human_chosen) == (True, False, None)
    assert len({x.id for x in items}) == len(items) == 7
    assert [x.id for x in read_responses(tmp_path / "in.jsonl")] == [x.id for x in items]  # stable ids


def test_score_mode_kill_and_resume_loses_and_duplicates_nothing(tmp_path, shared_data):
    from rlaif_fast.feedback import ScoreLabeler

    inp = write_jsonl(tmp_path / "in.jsonl", SCORE_ROWS)
    backend = HFBackend(tiny_gpt2(), gpt2_tokenizer(shared_data), batch_size=4)
    cfg = lambda out: _cfg(tmp_path, inp, out, mode="score")  # noqa: E731
    ref = run_label_job(cfg(tmp_path / "ref.jsonl"), backend)
    assert ref["new"] == 7 and ref["failed"] == 0 and ref["malformed_lines"] == [4, 5]
    expected = {r["id"]: r for r in read_out(tmp_path / "ref.jsonl")}
    direct = ScoreLabeler(backend, "harmlessness").score(["Say hi"], ["hi there"])[0]
    assert expected[next(iter(expected))]["score"] == pytest.approx(direct, abs=1e-6)
    assert ref["mean_score"] == pytest.approx(sum(r["score"] for r in expected.values()) / 7)

    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):  # interrupted during its second batch of 3
        run_label_job(cfg(out), CountingBackend(backend, interrupt_at=2))
    assert len(read_out(out)) == 3
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": "torn", "score": 0.')
    summary = run_label_job(cfg(out), CountingBackend(backend, nan_at=1))  # its first 2 responses fail
    assert summary["skipped_done"] == 3 and summary["failed"] == 2 and summary["new"] == 2
    final = run_label_job(cfg(out), backend)
    assert final["new"] == 2 and final["skipped_done"] == 5 and final["failed"] == 0
    got = read_out(out)
    assert sorted(r["id"] for r in got) == sorted(expected)
    for r in got:
        assert r["score"] == pytest.approx(expected[r["id"]]["score"], abs=1e-5) and -1 <= r["score"] <= 1
    assert final["labeled"] == 7 and final["mean_score"] == pytest.approx(ref["mean_score"], abs=1e-5)
    sides = {r["side"]: r for r in got if r.get("pair_id") and "human_chosen" in r}
    assert sides["a"]["human_chosen"] is True and sides["b"]["human_chosen"] is False


def test_score_mode_cli_and_bad_settings(tmp_path, shared_data, capsys):
    model_dir = tmp_path / "labeler"
    tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer(shared_data).save_pretrained(model_dir)
    inp = write_jsonl(tmp_path / "in.jsonl", SCORE_ROWS)
    args = ["--in", str(inp), "--out", str(tmp_path / "o.jsonl"), "--labeler", f"hf:{model_dir}"]
    args += ["--mode", "score", "--template", "helpfulness", "--no-progress"]
    assert label_main(args + ["--strict"]) == 2
    assert "in.jsonl:4: " in capsys.readouterr().err
    assert label_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["new"] == 7 and -1.0 <= summary["mean_score"] <= 1.0 and "responses_per_s" in summary
    assert label_main(args[:-5] + ["--mode", "scores"]) == 2
    assert "mode='scores' is not supported" in capsys.readouterr().err
    assert label_main(args + ["--chain-of-thought"]) == 2
    assert "drop --chain-of-thought for --mode score" in capsys.readouterr().err


# -------------------- resuming into an output of the other mode, byte-order marks


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
