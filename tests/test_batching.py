"""rlaif_fast.batching on both backends (C++ extension and pure-Python fallback) against the reference.

Every test takes the ``impl`` fixture, so it runs once with ``rlaif_fast._C`` and once with the
fallback. Rollouts are random with long-tailed lengths, empty responses and single-token prompts.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_package import _run

from rlaif_fast import batching
from rlaif_fast.reference import batching as ref


def extension():
    """The built extension; a missing build fails the test unless the fallback was chosen on purpose."""
    try:
        return importlib.import_module("rlaif_fast._C")
    except ImportError as exc:
        if os.environ.get(batching.NO_EXT_VAR) == "1":
            pytest.skip(f"{batching.NO_EXT_VAR}=1: the C++ backend is switched off on purpose")
        pytest.fail(f"rlaif_fast._C does not import ({exc}); build it: python setup.py build_ext --inplace")


@pytest.fixture(params=["cpp", "python"])
def impl(request, monkeypatch):
    """Forces one backend by swapping the module's extension handle."""
    monkeypatch.setattr(batching, "_C", extension() if request.param == "cpp" else None)
    assert batching.backend() == request.param
    return request.param


def make_rollouts(seed: int, n: int, vocab: int = 50_000):
    """Long-tailed (Pareto) lengths; a few single-token prompts and empty responses for sure."""
    rng = np.random.default_rng(seed)
    p_len = np.minimum(1 + (rng.pareto(1.5, n) * 6).astype(int), 120)
    r_len = np.minimum((rng.pareto(1.2, n) * 10).astype(int), 250)
    p_len[:3] = 1
    r_len[1:4] = 0
    prompts = [rng.integers(0, vocab, k).tolist() for k in p_len]
    responses = [rng.integers(0, vocab, k).tolist() for k in r_len]
    return prompts, responses


def as_kind(seqs: list[list[int]], kind: str):
    if kind == "numpy":
        return [np.asarray(s, dtype=np.int32) for s in seqs]
    if kind == "torch":
        return [torch.tensor(s, dtype=torch.int64) for s in seqs]
    if kind == "tuple":
        return tuple(tuple(s) for s in seqs)
    return seqs


def expected_kept(p: list[int], r: list[int], max_len, truncation):
    """What survives truncation, written independently of both implementations."""
    if max_len is None or len(p) + len(r) <= max_len:
        return p, r
    if truncation == "left":
        return p[len(p) + len(r) - max_len :], r
    seq = (p + r)[:max_len]
    return seq[: min(len(p), max_len)], seq[min(len(p), max_len) :]


def ref_padded(prompts, responses, pad_id, side, max_len, truncation):
    out = ref.pad_rollouts(prompts, responses, pad_id, side, max_len, truncation)
    dtypes = {"response_mask": torch.bool}
    return {k: torch.tensor(v, dtype=dtypes.get(k, torch.int64)) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ pad


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["list", "numpy", "torch", "tuple"])
def test_pad_matches_reference(impl, side, kind):
    prompts, responses = make_rollouts(1, 37)
    out = batching.pad_rollouts(as_kind(prompts, kind), as_kind(responses, kind), 7, padding_side=side)
    want = ref_padded(prompts, responses, 7, side, None, "error")
    for name, value in want.items():
        got = getattr(out, name)
        assert got.dtype == value.dtype, name
        assert torch.equal(got, value), name


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    ("max_len", "truncation"), [(None, "error"), (300, "error"), (40, "left"), (40, "right")]
)
def test_pad_layout(impl, side, max_len, truncation):
    prompts, responses = make_rollouts(2, 53)
    if truncation == "left":  # left truncation refuses to cut into a response: keep them short enough
        responses = [r[: max_len - 1] for r in responses]
    out = batching.pad_rollouts(
        prompts, responses, 3, padding_side=side, max_len=max_len, truncation=truncation
    )
    kept = [expected_kept(p, r, max_len, truncation) for p, r in zip(prompts, responses)]
    width = max(len(p) + len(r) for p, r in kept)
    assert out.input_ids.shape == (len(prompts), width)
    for i, (p, r) in enumerate(kept):
        n = len(p) + len(r)
        real = slice(width - n, width) if side == "left" else slice(0, n)
        pads = slice(0, width - n) if side == "left" else slice(n, width)
        assert out.input_ids[i, real].tolist() == p + r
        assert (out.input_ids[i, pads] == 3).all()
        assert out.attention_mask[i].sum() == n and (out.attention_mask[i, real] == 1).all()
        assert out.position_ids[i, real].tolist() == list(range(n))
        assert (out.position_ids[i, pads] == 0).all()
        assert out.response_mask[i, real].tolist() == [False] * len(p) + [True] * len(r)
        assert not out.response_mask[i, pads].any()
        assert (out.prompt_lengths[i], out.response_lengths[i]) == (len(p), len(r))
    # and the same tensors as the reference
    want = ref_padded(prompts, responses, 3, side, max_len, truncation)
    for name, value in want.items():
        assert torch.equal(getattr(out, name), value), name


def test_pad_2d_input_and_to(impl):
    prompts = torch.arange(12).reshape(3, 4)
    responses = np.arange(6).reshape(3, 2)
    out = batching.pad_rollouts(prompts, responses, 0, padding_side="right")
    assert out.input_ids.tolist() == [[0, 1, 2, 3, 0, 1], [4, 5, 6, 7, 2, 3], [8, 9, 10, 11, 4, 5]]
    moved = out.to("cpu")
    assert isinstance(moved, batching.PaddedBatch) and torch.equal(moved.position_ids, out.position_ids)


def test_concurrent_calls_agree(impl):
    """The C++ loops run without the GIL: calls from several threads must not share state."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [make_rollouts(10 + t, 29) for t in range(4)]
    want = [batching.pad_rollouts(p, r, 1, padding_side="right").input_ids for p, r in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(
            pool.map(lambda pr: batching.pad_rollouts(*pr, 1, padding_side="right").input_ids, batches)
        )
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_large_token_ids_survive(impl):
    big = 2**40 + 3  # beyond int32: ids are int64 end to end
    out = batching.pad_rollouts([[big, 1]], [np.array([big], dtype=np.uint64)], 0)
    assert out.input_ids.tolist() == [[big, 1, big]]
    assert batching.pack_rollouts([[big]], [[]]).input_ids.tolist() == [[big]]


def test_cpp_results_are_zero_copy():
    ext = extension()
    for arrays in (
        ext.pad_rollouts([[1, 2]], [[3]], 0, "left", -1, "error"),
        ext.pack_rollouts([[1, 2]], [[3]]),
    ):
        for arr in arrays[:4]:
            # owned by the capsule that frees the C++ buffer, and wrapped by torch without a copy
            assert type(arr.base).__name__ == "PyCapsule" and not arr.flags.owndata
            assert torch.from_numpy(arr).data_ptr() == arr.ctypes.data


# ----------------------------------------------------------------------------------------------- pack


@pytest.mark.parametrize("kind", ["list", "numpy", "torch"])
def test_pack_matches_reference_and_round_trips(impl, kind):
    prompts, responses = make_rollouts(3, 41)
    out = batching.pack_rollouts(as_kind(prompts, kind), as_kind(responses, kind))
    want = ref.pack_rollouts(prompts, responses)
    assert torch.equal(out.input_ids, torch.tensor([want["input_ids"]]))
    assert torch.equal(out.position_ids, torch.tensor([want["position_ids"]]))
    assert torch.equal(out.response_mask, torch.tensor([want["response_mask"]], dtype=torch.bool))
    assert out.cu_seqlens.dtype == torch.int32
    assert out.cu_seqlens.tolist() == want["cu_seqlens"]
    assert out.max_seqlen == want["max_seqlen"] == max(len(p) + len(r) for p, r in zip(prompts, responses))
    pieces = batching.unpack(out.input_ids, out.cu_seqlens)
    assert [x.tolist() for x in pieces] == [p + r for p, r in zip(prompts, responses)]
    for piece, p in zip(batching.unpack(out.position_ids, out.cu_seqlens), prompts):
        assert piece.tolist() == list(range(piece.numel())) and piece.numel() >= len(p)


def test_unpack_values_with_trailing_dims(impl):
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)  # the middle sequence is empty
    values = torch.randn(1, 7, 5)
    pieces = batching.unpack(values, cu)
    assert [tuple(p.shape) for p in pieces] == [(3, 5), (0, 5), (4, 5)]
    assert torch.equal(torch.cat(pieces), values[0])
    assert pieces[2].data_ptr() == values[0, 3].data_ptr()  # views, not copies
    with pytest.raises(ValueError, match=r"ends at 7"):
        batching.unpack(torch.zeros(6), cu)
    with pytest.raises(ValueError, match=r"never decrease"):
        batching.unpack(torch.zeros(7), [0, 5, 3, 7])


# -------------------------------------------------------------------------------------------- balance


def check_plan(plan: batching.MicroBatchPlan, lengths: list[int], max_tokens: int, num_ranks: int):
    """The plan's invariants, recomputed from scratch."""
    assert len(plan.microbatches) == num_ranks
    assert len({len(rank) for rank in plan.microbatches}) == 1, "ranks have different step counts"
    seen = sorted(i for rank in plan.microbatches for mb in rank for i in mb)
    assert seen == list(range(len(lengths))), "an index is missing or repeated"
    padded = 0
    for rank in plan.microbatches:
        for mb in rank:
            if mb:
                size = len(mb) * max(lengths[i] for i in mb)
                assert size <= max_tokens, f"micro-batch {mb} costs {size} > {max_tokens}"
                padded += size
    assert plan.padded_tokens == padded
    assert plan.padding == padded - sum(lengths)
    assert plan.strategy in ("global", "per_rank")
    rank_tokens = [sum(lengths[i] for mb in rank for i in mb) for rank in plan.microbatches]
    assert plan.rank_tokens == rank_tokens
    assert plan.imbalance == pytest.approx(max(rank_tokens) / (sum(rank_tokens) / num_ranks))


@pytest.mark.parametrize(
    ("n", "max_tokens", "num_ranks"), [(1, 10, 1), (3, 64, 8), (97, 512, 3), (600, 2048, 8)]
)
def test_balance_invariants_and_reference(impl, n, max_tokens, num_ranks):
    rng = np.random.default_rng(n)
    lengths = np.minimum(1 + (rng.pareto(1.3, n) * 40).astype(int), max_tokens).tolist()
    if n > 3:
        lengths[5] = 0  # a zero-length sequence is legal and must still be placed once
    plan = batching.balanced_microbatches(lengths, max_tokens=max_tokens, num_ranks=num_ranks)
    check_plan(plan, lengths, max_tokens, num_ranks)
    want = ref.balanced_microbatches(lengths, max_tokens, num_ranks)
    assert plan.microbatches == want["microbatches"]
    assert plan == batching.balanced_microbatches(
        np.asarray(lengths), max_tokens=max_tokens, num_ranks=num_ranks
    )
    if n < num_ranks:
        assert plan.num_empty == num_ranks - n  # one step, some ranks without a sequence


def test_balance_extension_equals_reference_fuzz():
    """Plans depend on every tie-break: the C++ port must agree with the reference on odd inputs
    (zero lengths, one rank, more ranks than sequences, budgets near the longest sequence)."""
    ext = extension()
    rng = np.random.default_rng(1)
    for _ in range(60):
        n, k, max_tokens = int(rng.integers(1, 200)), int(rng.integers(1, 9)), int(rng.integers(50, 3000))
        lengths = np.minimum((rng.pareto(1.2, n) * rng.integers(5, 200)).astype(np.int64), max_tokens)
        lengths[: int(rng.integers(0, 3)) * n // 5] = 0
        plan, rank_tokens, rank_padded, strategy = ext.balanced_microbatches(lengths, max_tokens, k)
        want = ref.balanced_microbatches(lengths.tolist(), max_tokens, k)
        assert plan == want["microbatches"], (n, k, max_tokens)
        assert (rank_tokens, rank_padded, strategy) == (
            want["rank_tokens"],
            want["rank_padded_tokens"],
            want["strategy"],
        )


def test_balance_quality_long_tailed(impl):
    """The issue's goals on the benchmark's workload: 4096 rollouts, prompts 16-512 and responses
    1-2048 tokens (log-normal, clipped), 16384-token micro-batches, 8 ranks."""
    rng = np.random.default_rng(0)
    prompts = np.clip(rng.lognormal(np.log(64), 0.9, 4096), 16, 512).astype(np.int64)
    responses = np.clip(rng.lognormal(np.log(150), 1.1, 4096), 1, 2048).astype(np.int64)
    lengths = torch.from_numpy(prompts + responses)
    plan = batching.balanced_microbatches(lengths, max_tokens=16384, num_ranks=8)
    check_plan(plan, lengths.tolist(), 16384, 8)
    assert plan.imbalance <= 1.02
    assert plan.padding_fraction <= 0.05
    assert plan.num_empty == 0


@pytest.mark.parametrize(
    ("lengths", "max_tokens", "strategy"),
    [([300] * 16, 4096, "global"), ([50, 40, 30, 20, 10, 5], 100, "per_rank")],
)
def test_balance_picks_the_cheaper_strategy(impl, lengths, max_tokens, strategy):
    plan = batching.balanced_microbatches(lengths, max_tokens=max_tokens, num_ranks=2)
    check_plan(plan, lengths, max_tokens, 2)
    assert plan.strategy == strategy
    busiest = {
        name: max(sum(ref.padded_size(lengths, mb) for mb in rank) for rank in make(lengths, max_tokens, 2))
        for name, make in (("global", ref.global_plan), ("per_rank", ref.per_rank_plan))
    }
    assert max(plan.rank_padded_tokens) == min(busiest.values()) == busiest[strategy]
    if strategy == "global":  # 13 + 3 sequences after the cut; single-sequence moves make it 8 + 8
        assert plan.rank_tokens == [2400, 2400]


def test_balance_splits_the_fullest(impl):
    # one micro-batch holds all three; two ranks need two, so the fullest is split, never emptied
    plan = batching.balanced_microbatches([10, 10, 10], max_tokens=30, num_ranks=2)
    check_plan(plan, [10, 10, 10], 30, 2)
    assert plan.microbatches == [[[0, 1]], [[2]]] and plan.num_empty == 0


def test_balance_empty_steps_only_when_short_of_sequences(impl):
    plan = batching.balanced_microbatches([7, 3], max_tokens=100, num_ranks=4)
    check_plan(plan, [7, 3], 100, 4)
    assert plan.microbatches == [[[0]], [[1]], [[]], [[]]] and plan.num_empty == 2


# ------------------------------------------------------------------------------------------ bad input


BAD_ROLLOUTS = [
    ({"prompts": [[1], [2, -5]], "responses": [[], []]}, ValueError, r"prompts\[1\]\[1\] = -5"),
    ({"prompts": [[1], [2]], "responses": [[3], [4, 5, -1]]}, ValueError, r"responses\[1\]\[2\] = -1"),
    ({"prompts": [[1], [2]], "responses": [[3]]}, ValueError, r"2 prompts but 1 responses"),
    ({"prompts": [], "responses": []}, ValueError, r"empty \(0 rollouts\)"),
    ({"prompts": [[1], []], "responses": [[3], [4]]}, ValueError, r"prompts\[1\] is empty"),
    ({"prompts": [[1], [2.5]], "responses": [[3], [4]]}, TypeError, r"prompts\[1\]\[0\] is a float"),
    ({"prompts": [[1], torch.ones(2)], "responses": [[3], [4]]}, TypeError, r"prompts\[1\] has dtype"),
    ({"prompts": [[1], np.ones(2)], "responses": [[3], [4]]}, TypeError, r"prompts\[1\] has dtype float64"),
    ({"prompts": [[1], "ab"], "responses": [[3], [4]]}, TypeError, r"prompts\[1\] is a str"),
    (
        {"prompts": torch.ones(3, dtype=torch.long), "responses": [[3]]},
        ValueError,
        r"prompts is an array of shape",
    ),
]


@pytest.mark.parametrize("fn", ["pad", "pack"])
@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ROLLOUTS)
def test_bad_rollouts(impl, fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        if fn == "pad":
            batching.pad_rollouts(pad_id=0, **kwargs)
        else:
            batching.pack_rollouts(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_len": 4}, ValueError, r"rollout 1 has 5 tokens \(prompt 3 \+ response 2\) > max_len=4"),
        (
            {"max_len": 2, "truncation": "left"},
            ValueError,
            r"rollout 1 has a response of 2 tokens >= max_len=2",
        ),
        ({"max_len": 0}, ValueError, r"max_len=0 must be >= 1"),
        ({"truncation": "middle"}, ValueError, r"truncation='middle'"),
        ({"padding_side": "top"}, ValueError, r"padding_side='top'"),
        ({"pad_id": -1}, ValueError, r"pad_id=-1 must be >= 0"),
        ({"pad_id": 1.0}, TypeError, r"pad_id must be an int"),
    ],
)
def test_bad_pad_options(impl, kwargs, error, match):
    kwargs = {"pad_id": 0, **kwargs}
    with pytest.raises(error, match=match):
        batching.pad_rollouts([[1, 2], [3, 4, 5]], [[6], [7, 8]], **kwargs)


def test_truncation_never_silent(impl):
    out = batching.pad_rollouts([[1, 2, 3, 4, 5]], [[6, 7]], 0, max_len=4, truncation="right")
    assert out.input_ids.tolist() == [[1, 2, 3, 4]] and out.response_lengths.tolist() == [0]
    assert not out.response_mask.any() and out.prompt_lengths.tolist() == [4]
    out = batching.pad_rollouts([[1, 2, 3]], [[4, 5]], 0, max_len=4, truncation="right")
    assert out.input_ids.tolist() == [[1, 2, 3, 4]] and out.response_lengths.tolist() == [1]
    out = batching.pad_rollouts([[1, 2, 3]], [[4, 5]], 0, max_len=4, truncation="left")
    assert out.input_ids.tolist() == [[2, 3, 4, 5]] and out.prompt_lengths.tolist() == [2]


@pytest.mark.parametrize(
    ("lengths", "kwargs", "error", "match"),
    [
        ([5, 7, 100], {}, ValueError, r"lengths\[2\] = 100 > max_tokens=64"),
        ([5, -2], {}, ValueError, r"lengths\[1\] = -2 is negative"),
        ([], {}, ValueError, r"lengths is empty"),
        ([5, 7], {"num_ranks": 0}, ValueError, r"num_ranks=0 must be >= 1"),
        ([5, 7], {"max_tokens": 0}, ValueError, r"max_tokens=0 must be >= 1"),
        ([5.0, 7.5], {}, TypeError, r"lengths has dtype float64"),
        ([[5, 7]], {}, ValueError, r"lengths must be 1-D"),
    ],
)
def test_bad_balance(impl, lengths, kwargs, error, match):
    kwargs = {"max_tokens": 64, "num_ranks": 2, **kwargs}
    with pytest.raises(error, match=match):
        batching.balanced_microbatches(lengths, **kwargs)


# ------------------------------------------------------------------------------------- backend switch


@pytest.mark.slow
def test_fallback_switch_and_single_warning():
    """RLAIF_FAST_NO_EXT=1 picks the fallback silently; a missing extension warns exactly once."""
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('always')\n"
        "if sys.argv[1] == 'missing':\n"
        "    sys.modules['rlaif_fast._C'] = None  # makes the import fail as if it was never built\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from rlaif_fast import batching\n"
        "    import rlaif_fast.batching\n"
        "    batching.pad_rollouts([[1]], [[2]], 0)\n"
        "ours = [w for w in caught if 'rlaif_fast._C' in str(w.message)]\n"
        "print(batching.backend(), len(ours))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != batching.NO_EXT_VAR}
    forced = subprocess.run(
        [sys.executable, "-c", code, "forced"],
        env={**env, batching.NO_EXT_VAR: "1"},
        capture_output=True,
        text=True,
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.split() == ["python", "0"]
    missing = subprocess.run([sys.executable, "-c", code, "missing"], env=env, capture_output=True, text=True)
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.split() == ["python", "1"]


# ------------------------------------------------------------------------------ thread safety


def test_balanced_microbatches_survives_a_thread_writing_the_lengths():
    """The planner ran without the GIL on the caller's own int64 buffer: a thread writing to that array
    meanwhile made std::sort's comparator inconsistent, and the process died (free(): invalid pointer)."""
    out = _run(
        """
        import threading
        import numpy as np
        from rlaif_fast.batching import balanced_microbatches
        rng = np.random.default_rng(0)
        a = rng.integers(1, 500, 20000)
        b = rng.integers(1, 4096, 20000)
        arr, stop = a.copy(), []
        def writer():
            while not stop:
                arr[:] = b
                arr[:] = a
        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(30):
                # the snapshot the planner copied may mix a and b (numpy copies without the GIL too):
                # check what holds for any snapshot
                plan = balanced_microbatches(arr, max_tokens=4096, num_ranks=8)
                assert len({len(rank) for rank in plan.microbatches}) == 1
                assert sorted(i for rank in plan.microbatches for mb in rank for i in mb) == list(range(20000))
        finally:
            stop.append(1)
            t.join()
        print("ok")
        """,
        timeout=240,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])
