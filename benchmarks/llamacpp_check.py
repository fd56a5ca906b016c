"""The HTTP labeler against llama-cpp-python's server on the real stories260K model (issue 11): `make llamacpp-check`.

Two steps, in two environments (llama-cpp-python is a ~25-minute source build, kept out of .venv):

    LLAMACPP_PY=/path/to/llamacpp-venv/bin/python
    $LLAMACPP_PY benchmarks/llamacpp_check.py convert --out build/stories260K.gguf     # needs numpy + gguf
    .venv/bin/python benchmarks/llamacpp_check.py check --gguf build/stories260K.gguf --server-python $LLAMACPP_PY

``convert`` writes ../shared/data/stories260K as GGUF with numpy alone: llama2.c keeps Meta's interleaved
RoPE pairs, which is what llama.cpp's LLAMA architecture rotates, so wq/wk are written as stored (the HF
loader, rlaif_fast/models/llama2c.py, permutes them to HF's rotate-half layout instead); the tok512 pieces
become a SentencePiece ("llama") vocabulary (" " -> "▁", byte pieces typed BYTE, <s>/</s> CONTROL).

``check`` starts ``python -m llama_cpp.server`` on 127.0.0.1 (f32 KV cache, one thread), waits for it with
a bounded timeout, and compares, on the same weights, the labels of ``OpenAICompatibleBackend`` (through
the route its probe picks) with ``HFBackend`` on ``llama2c:stories260K.bin``: per-candidate log-prob
differences, pairwise p_a (both orders), chain-of-thought rationales and labels, d-RLAIF scores. It prints
one JSON line of figures and exits 1 when they disagree beyond tolerance. The server is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "data" / "stories260K"


def convert(bin_path: Path, tok_path: Path, out: Path) -> None:
    import gguf
    import numpy as np

    raw = bin_path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", raw)
    shared, vocab = vocab > 0, abs(vocab)
    head = dim // n_heads
    kv_dim = n_kv * head
    f = np.frombuffer(raw, dtype="<f4", offset=28)
    at = 0

    def take(*shape):
        nonlocal at
        n = int(np.prod(shape))
        a = f[at : at + n].reshape(shape).copy()
        at += n
        return a

    tok = take(vocab, dim)
    rms_att, wq, wk = take(n_layers, dim), take(n_layers, dim, dim), take(n_layers, kv_dim, dim)
    wv, wo, rms_ffn = take(n_layers, kv_dim, dim), take(n_layers, dim, dim), take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, head // 2)  # RoPE tables: recomputed by llama.cpp
    take(seq_len, head // 2)
    wcls = tok if shared else take(vocab, dim)

    # tokenizer: int32 max_len, then (float score, int32 len, bytes) per piece
    traw = tok_path.read_bytes()
    pos, pieces, scores, types = 4, [], [], []
    while pos < len(traw):
        score, n = struct.unpack_from("<fi", traw, pos)
        piece = traw[pos + 8 : pos + 8 + n].decode("utf-8")
        pos += 8 + n
        i = len(pieces)
        if i == 0:
            piece, kind = "<unk>", gguf.TokenType.UNKNOWN
        elif i in (1, 2):
            piece, kind = ("<s>", "</s>")[i - 1], gguf.TokenType.CONTROL
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            kind = gguf.TokenType.BYTE
        else:
            piece, kind = piece.replace(" ", "\u2581"), gguf.TokenType.NORMAL
        pieces.append(piece)
        scores.append(score)
        types.append(kind)

    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("stories260K")
    w.add_context_length(seq_len)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all f32
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_tensor("token_embd.weight", tok)
    w.add_tensor("output_norm.weight", rms_final)
    w.add_tensor("output.weight", wcls)
    for i in range(n_layers):
        b = f"blk.{i}."
        for name, arr in (
            ("attn_norm", rms_att[i]), ("attn_q", wq[i]), ("attn_k", wk[i]), ("attn_v", wv[i]),
            ("attn_output", wo[i]), ("ffn_norm", rms_ffn[i]), ("ffn_gate", w1[i]), ("ffn_down", w2[i]),
            ("ffn_up", w3[i]),
        ):  # fmt: skip
            w.add_tensor(b + name + ".weight", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size} bytes)")


CONTEXTS = [
    "Tom had a red ball. He played with it in the park every day.",
    "Lily saw a big dog. The dog was friendly and wanted to play.",
    "Once upon a time there was a little girl who loved to sing.",
    "Ben and his mom went to the shop to buy some milk.",
    "The sun was hot, so Sue went to swim in the lake.",
    "A little bird could not fly. Its friend the cat helped it.",
]
RESP_A = ["Tom played with his ball.", "Lily played with a dog.", "A girl loved to sing.",
          "Ben and mom bought milk.", "Sue swam in the lake.", "A cat helped a bird."]  # fmt: skip
RESP_B = ["The dog was sad.", "Tom had a car.", "The sun was cold.", "A bird sang.", "Lily ate a cake.",
          "Ben went to bed."]  # fmt: skip


def check(gguf_path: Path, server_python: str, timeout_s: float) -> int:
    import torch

    from rlaif_fast.feedback import OpenAICompatibleBackend, PairwiseLabeler, ScoreLabeler
    from rlaif_fast.feedback.job import make_backend
    from rlaif_fast.feedback.server_process import ServerError, ServerProcess, free_port

    port = free_port()
    cmd = [server_python, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", "512", "--type_k", "0", "--type_v", "0", "--n_threads", "1"]
    cmd += ["--model_alias", "stories260K"]
    server = ServerProcess(
        cmd,
        f"http://127.0.0.1:{port}/v1/models",
        log_path=gguf_path.with_suffix(".server.log"),
        timeout_s=timeout_s,
        poll_s=0.5,
        stop_timeout_s=20,
        name="llama_cpp.server",
    )
    try:
        server.start()
    except ServerError as exc:  # exited or not up in time: the message quotes the server's log
        raise SystemExit(str(exc)) from None
    try:
        startup = server.startup_s
        url = f"http://127.0.0.1:{port}/v1"
        http = OpenAICompatibleBackend(url, "stories260K", timeout=120, concurrency=1)
        local = make_backend(f"llama2c:{STORIES / 'stories260K.bin'}")
        t1 = time.monotonic()
        route = http.probe()
        probe_s = time.monotonic() - t1

        # raw candidate log-probs: the server's are full log-softmax values, HFBackend's are up to a per-row
        # constant (the first token's normalizer), so compare differences to the first candidate
        cands = ["1", "2", "10"]
        prompts = [c + "\nRating=" for c in CONTEXTS]
        lh, ll = http.candidate_logprobs(prompts, cands), local.candidate_logprobs(prompts, cands)
        rel_diff = ((lh - lh[:, :1]) - (ll - ll[:, :1])).abs().max().item()
        t2 = time.monotonic()
        hp = PairwiseLabeler(http, "summarization").label(CONTEXTS, RESP_A, RESP_B)
        pair_s = time.monotonic() - t2
        lp = PairwiseLabeler(local, "summarization").label(CONTEXTS, RESP_A, RESP_B)
        p_diff = max(max(abs(h.p_a_ab - lo.p_a_ab), abs(h.p_a_ba - lo.p_a_ba)) for h, lo in zip(hp, lp))
        decisions = sum(h.preferred == lo.preferred for h, lo in zip(hp, lp))
        kw = {"chain_of_thought": True, "max_rationale_tokens": 12}
        hc = PairwiseLabeler(http, "summarization", **kw).label(CONTEXTS[:3], RESP_A[:3], RESP_B[:3])
        lc = PairwiseLabeler(local, "summarization", **kw).label(CONTEXTS[:3], RESP_A[:3], RESP_B[:3])
        same_rationales = sum(h.rationales == lo.rationales for h, lo in zip(hc, lc))
        cot_diff = max(abs(h.p_a - lo.p_a) for h, lo in zip(hc, lc))
        # the same pairs through `rlaif-fast label` (the job: probe, locked output, summary)
        import tempfile

        from rlaif_fast.feedback.job import main as label_main

        with tempfile.TemporaryDirectory() as tmp:
            inp, outp = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
            rows = [{"id": i, "context": c, "response_a": a, "response_b": b}
                    for i, (c, a, b) in enumerate(zip(CONTEXTS, RESP_A, RESP_B))]  # fmt: skip
            inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            rc = label_main(["--in", str(inp), "--out", str(outp), "--labeler", url, "--model", "stories260K",
                             "--concurrency", "1", "--no-progress"])  # fmt: skip
            job = {r["id"]: r["p_a"] for r in map(json.loads, outp.read_text().splitlines())}
        job_diff = (
            max(abs(job[i] - lo.p_a) for i, lo in enumerate(lp)) if len(job) == len(lp) else float("inf")
        )
        hs = ScoreLabeler(http, "summarization").score(CONTEXTS, RESP_A)
        ls = ScoreLabeler(local, "summarization").score(CONTEXTS, RESP_A)
        s_diff = max(abs(a - b) for a, b in zip(hs, ls))
        out = {
            "server": "llama-cpp-python " + _version(server_python),
            "model": "stories260K (GGUF f32, f32 KV cache)",
            "route": route,
            "probe_replies": http.probe_replies,
            "startup_s": round(startup, 1),
            "probe_s": round(probe_s, 2),
            "candidate_logprob_rel_max_diff": rel_diff,
            "pairs": len(hp),
            "pairwise_p_max_diff": p_diff,
            "pairwise_same_decisions": decisions,
            "pairwise_http_s": round(pair_s, 2),
            "label_job_exit": rc,
            "label_job_p_a_max_diff": job_diff,
            "cot_same_rationales": f"{same_rationales}/{len(hc)}",
            "cot_p_a_max_diff": cot_diff,
            "cot_rationale_example": [hc[0].rationales[0], lc[0].rationales[0]],
            "score_max_diff": s_diff,
            "requests": http.stats,
        }
        print(json.dumps(out))
        ok = rel_diff < 1e-3 and p_diff < 1e-4 and decisions == len(hp) and same_rationales == len(hc)
        ok = ok and cot_diff < 1e-4 and s_diff < 1e-4 and bool(torch.isfinite(lh).all())
        ok = ok and rc == 0 and job_diff < 1e-4
        print("llamacpp-check:", "OK" if ok else "MISMATCH", file=sys.stderr)
        return 0 if ok else 1
    finally:
        server.stop()


def _version(python: str) -> str:
    try:
        return subprocess.run(
            [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="stories260K (llama2.c) -> GGUF")
    c.add_argument("--bin", type=Path, default=STORIES / "stories260K.bin")
    c.add_argument("--tok", type=Path, default=STORIES / "tok512.bin")
    c.add_argument("--out", type=Path, required=True)
    k = sub.add_parser("check", help="labels over llama_cpp.server vs HFBackend on the same weights")
    k.add_argument("--gguf", type=Path, required=True)
    k.add_argument("--server-python", required=True, help="the python that has llama_cpp[server]")
    k.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server")
    a = ap.parse_args(argv)
    if a.cmd == "convert":
        convert(a.bin, a.tok, a.out)
        return 0
    return check(a.gguf, a.server_python, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
