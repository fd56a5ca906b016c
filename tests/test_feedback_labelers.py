"""PairwiseLabeler / ScoreLabeler / RuleReward on HFBackend: debiasing, ranges, and the batched
last-position path against a naive full forward (full [T, V] logits, one unpadded prompt at a time)."""

from __future__ import annotations

import math

import pytest
import torch

from rlaif_fast.feedback import (
    HFBackend,
    OpenAICompatibleBackend,
    PairwiseLabeler,
    RuleReward,
    ScoreLabeler,
    load_template,
)
from rlaif_fast.feedback.labelers import PAIR_CANDIDATES, SCORE_CANDIDATES, pair_label_from_orders
from rlaif_fast.feedback.serve import CompletionServer

GPT2_DIR = "gpt2_bpe_tokenizer_whisper"


def gpt2_tokenizer(shared_data):
    from transformers import GPT2TokenizerFast

    # from_pretrained on the folder: transformers 5 ignores GPT2TokenizerFast(vocab_file=..., merges_file=...)
    return GPT2TokenizerFast.from_pretrained(str(shared_data / GPT2_DIR))


def tiny_gpt2(n_positions: int = 256, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=n_positions, vocab_size=50257)
    model = GPT2LMHeadModel(cfg).eval()
    # larger random output rows than the default init, so candidate probabilities are far from 1/2
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.5)
    return model


def naive_candidate_logprobs(
    model, tokenizer, prompt_ids: list[int], cand_ids: list[list[int]]
) -> torch.Tensor:
    """log P(candidate | prompt) by one full forward per candidate over prompt + candidate, all logits."""
    out = []
    for c in cand_ids:
        ids = torch.tensor([prompt_ids + c])
        logits = model(input_ids=ids).logits[0]  # (T, V): the full logits the backend never builds
        n = len(prompt_ids)
        logp = torch.log_softmax(logits[n - 1 : n - 1 + len(c)].double(), -1)  # (len(c), V)
        out.append(sum(logp[j, t].item() for j, t in enumerate(c)))
    return torch.tensor(out, dtype=torch.float64)


CONTEXTS = ["The cat sat on the mat and looked at the bird.", "Rain fell all day. " * 30, "Short."]
RESP_A = ["A cat watched a bird.", "It rained.", "ok"]
RESP_B = ["Dogs bark.", "The sun was out all day long and it was hot.", "A much longer answer here"]


class FixedBackend:
    """A deterministic fake: P("1") depends on the prompt text only (its hash)."""

    def candidate_logprobs(self, prompts, candidates):
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(hash(p.text) % (2**31))
            rows.append(torch.randn(len(candidates), generator=g, dtype=torch.float64) * 3)
        return torch.stack(rows)


def test_debiasing_is_exact_on_a_deterministic_backend():
    lab = PairwiseLabeler(FixedBackend(), "harmlessness")
    ab = lab.label(CONTEXTS, RESP_A, RESP_B)
    ba = lab.label(CONTEXTS, RESP_B, RESP_A)
    for x, y in zip(ab, ba):
        assert abs(x.p_a - (1 - y.p_a)) <= 1e-15
        assert x.p_a_ab == pytest.approx(1 - y.p_a_ba, abs=1e-15)
        assert x.consistent == y.consistent
        assert 0.0 <= x.p_a <= 1.0 and 0.0 <= x.entropy <= math.log(2) + 1e-12
        assert x.p_a == pytest.approx((x.p_a_ab + x.p_a_ba) / 2, abs=1e-15)


def test_pair_label_consistency_flags_same_position_picks():
    # order (a,b): P("1") = 0.8 picks a; order (b,a): P("1") = 0.7 picks b, the first again: position bias
    lab = pair_label_from_orders(0.8, 0.7)
    assert not lab.consistent and lab.p_a == pytest.approx(0.55)
    lab = pair_label_from_orders(0.8, 0.1)
    assert lab.consistent and lab.p_a == pytest.approx(0.85) and lab.preferred == 0


@pytest.mark.parametrize("batch_size", [1, 4])
def test_pairwise_matches_naive_full_forward(shared_data, batch_size):
    tok = gpt2_tokenizer(shared_data)
    model = tiny_gpt2()
    backend = HFBackend(model, tok, batch_size=batch_size)
    lab = PairwiseLabeler(backend, "summarization")
    labels = lab.label(CONTEXTS, RESP_A, RESP_B)
    tpl = load_template("summarization")
    cand = backend.candidate_ids(PAIR_CANDIDATES, tpl.ending)
    assert all(len(c) == 1 for c in cand)
    with torch.no_grad():
        for lab_i, c, a, b in zip(labels, CONTEXTS, RESP_A, RESP_B):
            p1 = []
            for first, second in ((a, b), (b, a)):
                ids = tok(tpl.render_pairwise(c, first, second))["input_ids"]
                p1.append(torch.softmax(naive_candidate_logprobs(model, tok, ids, cand), -1)[0].item())
            ref = pair_label_from_orders(*p1)
            # fp32 model: the padded batch and the unpadded single row differ by float rounding only
            assert lab_i.p_a_ab == pytest.approx(ref.p_a_ab, abs=2e-5)
            assert lab_i.p_a_ba == pytest.approx(ref.p_a_ba, abs=2e-5)
            assert lab_i.p_a == pytest.approx(ref.p_a, abs=2e-5)
    # and the labels are not trivially 1/2: the comparison above has something to compare
    assert max(abs(x.p_a_ab - 0.5) for x in labels) > 0.05


def test_hf_label_swap_symmetry_and_ranges(shared_data):
    lab = PairwiseLabeler(HFBackend(tiny_gpt2(), gpt2_tokenizer(shared_data), batch_size=8), "helpfulness")
    ab = lab.label(CONTEXTS, RESP_A, RESP_B)
    ba = lab.label(CONTEXTS, RESP_B, RESP_A)
    for x, y in zip(ab, ba):
        assert 0.0 <= x.p_a <= 1.0
        assert x.p_a == pytest.approx(1 - y.p_a, abs=1e-6)


def test_context_truncated_from_left_keeps_responses_and_ending(shared_data):
    tok = gpt2_tokenizer(shared_data)
    model = tiny_gpt2(n_positions=64)
    backend = HFBackend(model, tok, batch_size=2)
    assert backend.max_length == 64
    tpl = load_template("summarization")
    long_ctx = "word " * 500
    parts = tpl.pairwise_parts(long_ctx, "first answer", "second answer")
    ids = backend.encode_prompt(parts, 64)
    assert len(ids) == 64
    tail = tok(parts.tail, add_special_tokens=False)["input_ids"]
    assert ids[-len(tail) :] == tail  # responses + ending intact
    assert tok.decode(ids).startswith(tpl.preamble[:40])  # preamble intact, context cut from its left
    # the labeler runs on it (a 64-position model would fail on the untruncated prompt)
    labels = PairwiseLabeler(backend, tpl).label([long_ctx], ["first answer"], ["second answer"])
    assert 0.0 <= labels[0].p_a <= 1.0


def test_score_labeler_matches_naive_and_is_in_range(shared_data):
    tok = gpt2_tokenizer(shared_data)
    model = tiny_gpt2()
    backend = HFBackend(model, tok, batch_size=2)
    sl = ScoreLabeler(backend, "helpfulness")
    scores = sl(CONTEXTS, RESP_A)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    tpl = load_template("helpfulness")
    cand = backend.candidate_ids(SCORE_CANDIDATES, tpl.score_ending)
    with torch.no_grad():
        for s, c, r in zip(scores, CONTEXTS, RESP_A):
            ids = tok(tpl.render_score(c, r))["input_ids"]
            probs = torch.softmax(naive_candidate_logprobs(model, tok, ids, cand), -1)
            expected = (probs * torch.arange(1, 11, dtype=torch.float64)).sum().item()
            assert s == pytest.approx((expected - 1) / 9 * 2 - 1, abs=2e-5)


def test_multi_token_ten_on_stories260k(shared_data):
    """tok512 spells "10" as "1" "0": the teacher-forced path must equal full sequence log-probs."""
    from rlaif_fast.models.llama2c import Llama2cTokenizer, load_llama2c

    model = load_llama2c(shared_data / "stories260K" / "stories260K.bin").eval()
    tok = Llama2cTokenizer(str(shared_data / "stories260K" / "tok512.bin"))
    backend = HFBackend(model, tok, batch_size=3)
    tpl = load_template("summarization")
    cand = backend.candidate_ids(SCORE_CANDIDATES, tpl.score_ending)
    assert len(cand[-1]) == 2 and cand[-1][0] == cand[0][0]  # "10" = "1" + "0"
    ctxs, resps = ["Tom had a red ball.", "Lily went to the park with her mom."], ["Tom had a ball.", "Lily"]
    prompts = [tpl.score_parts(c, r) for c, r in zip(ctxs, resps)]
    got = backend.candidate_logprobs(prompts, SCORE_CANDIDATES)  # (2, 10)
    with torch.no_grad():
        for row, p in zip(got, prompts):
            ref = naive_candidate_logprobs(model, tok, tok(p.text)["input_ids"], cand)
            # the backend's rows carry one shared constant (the first token's normalizer): compare softmaxes
            torch.testing.assert_close(torch.softmax(row, -1), torch.softmax(ref, -1), atol=2e-5, rtol=0)
    scores = ScoreLabeler(backend, tpl)(ctxs, resps)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    labels = PairwiseLabeler(backend, tpl).label(ctxs, resps, ["A dog.", "Mom."])
    assert all(0.0 <= x.p_a <= 1.0 for x in labels)


def test_chain_of_thought_two_steps(shared_data):
    lab = PairwiseLabeler(
        HFBackend(tiny_gpt2(), gpt2_tokenizer(shared_data)),
        "summarization",
        chain_of_thought=True,
        max_rationale_tokens=4,
    )
    (x,) = lab.label(["text"], ["one"], ["two"])
    assert x.rationales is not None and len(x.rationales) == 2 and all(len(r) > 0 for r in x.rationales)
    assert 0.0 <= x.p_a <= 1.0


def test_tokenizer_without_digit_tokens_fails_before_any_model_runs():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "=": 2, "Summary": 3}, unk_token="[UNK]"))
    t.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")

    class Boom(torch.nn.Module):  # would fail loudly if the model ran
        config = type("C", (), {"n_positions": 64})()

        def __init__(self):
            super().__init__()
            self.lm = torch.nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.lm

    with pytest.raises(ValueError, match="no token sequence for the candidate '1'"):
        PairwiseLabeler(HFBackend(Boom(), tok), "summarization")


def test_bad_inputs(shared_data):
    lab = PairwiseLabeler(FixedBackend(), "summarization")
    with pytest.raises(ValueError, match=r"responses_b\[1\] is empty"):
        lab.label(["c", "c"], ["x", "y"], ["x", "  "])
    with pytest.raises(ValueError, match="responses_a has 1 items but contexts has 2"):
        lab.label(["c", "d"], ["x"], ["y", "z"])
    with pytest.raises(TypeError, match="contexts must be a list of str"):
        lab.label("c", ["x"], ["y"])
    with pytest.raises(ValueError, match=r"\{second\} exactly once"):
        PairwiseLabeler(FixedBackend(), "Text {context} A {first}")
    with pytest.raises(ValueError, match="min_score"):
        ScoreLabeler(FixedBackend(), "summarization", min_score=5, max_score=5)
    assert lab.label([], [], []) == []


def test_rule_reward():
    rr = RuleReward(lambda p, c: [float(x.strip() == "4") for x in c])
    assert rr(["2+2=", "2+3="], [" 4", "6"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        RuleReward(lambda p, c: [0.0])(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="non-finite"):
        RuleReward(lambda p, c: [float("nan")])(["a"], ["b"])
    with pytest.raises(TypeError, match="needs a callable"):
        RuleReward(3)


def test_batches_respect_row_and_token_budgets(shared_data):
    backend = HFBackend(tiny_gpt2(), gpt2_tokenizer(shared_data), batch_size=3, max_batch_tokens=20)
    seqs = [[0] * n for n in (5, 9, 2, 9, 4, 1, 7)]
    batches = backend._batches(seqs)
    assert sorted(i for b in batches for i in b) == list(range(7))  # every row exactly once
    for b in batches:
        widths = [len(seqs[i]) for i in b]
        assert widths == sorted(widths, reverse=True) and len(b) <= 3
        assert len(b) == 1 or len(b) * widths[0] <= 20
    # a single row longer than the budget still runs, alone
    assert HFBackend(tiny_gpt2(), gpt2_tokenizer(shared_data), max_batch_tokens=4)._batches(
        [[0] * 9, [0]]
    ) == [[0], [1]]
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        HFBackend(tiny_gpt2(), gpt2_tokenizer(shared_data), max_batch_tokens=0)
    with pytest.raises(ValueError, match="tokenizer=None"):
        HFBackend(tiny_gpt2())
    with pytest.raises(ValueError, match="does not exist"):
        HFBackend("/nonexistent/labeler")


# -------------------- chain of thought with a failed rationale


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


# -------------------- logit post-processing, shared prefixes, rationales


def _stories(shared_data):
    from rlaif_fast.models.llama2c import Llama2cTokenizer, load_llama2c

    d = shared_data / "stories260K"
    return load_llama2c(d / "stories260K.bin").eval(), Llama2cTokenizer(str(d / "tok512.bin"))


def _scaled_model(kind: str):
    """A tiny config-built model whose LM head post-processes h @ W.T (Gemma-2 soft-capping, Granite scaling)."""
    torch.manual_seed(0)
    common = dict(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    common.update(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    if kind == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        cfg = Gemma2Config(**common, head_dim=16, final_logit_softcapping=2.0, pad_token_id=0)
        model = Gemma2ForCausalLM(cfg)
        emb = model.model.embed_tokens
    elif kind == "falcon_h1":  # multiplies by lm_head_multiplier: the labeler ignored it (the policy did not)
        from transformers import FalconH1Config, FalconH1ForCausalLM

        cfg = FalconH1Config(**common, lm_head_multiplier=3.0, mamba_d_ssm=32, mamba_n_heads=4)
        cfg.update(dict(mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16))
        model = FalconH1ForCausalLM(cfg)
        emb = model.model.embed_tokens
    else:
        from transformers import GraniteConfig, GraniteForCausalLM

        model = GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0))
        emb = model.model.embed_tokens
    with torch.no_grad():
        emb.weight.normal_(0, 1.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2", "granite", "falcon_h1"])
def test_candidate_logits_get_the_models_own_logit_postprocessing(shared_data, kind):
    """Gemma-2 soft-caps its logits (tanh(x/c)*c) and Granite divides them; h @ W.T alone skipped that."""
    model, tok = _scaled_model(kind), gpt2_tokenizer(shared_data)
    backend = HFBackend(model, tok)
    prompts = ["Text - a cat\nPreferred Summary=", "Text - it rained all day long\nSummary 1 - rain\nRating="]
    cand = ["1", "2", "10"]
    got = backend.candidate_logprobs(prompts, cand)
    ids = backend.candidate_ids(cand, "=")
    with torch.no_grad():
        for row, p in zip(got, prompts):
            ref = naive_candidate_logprobs(model, tok, tok(p)["input_ids"], ids)
            torch.testing.assert_close(torch.softmax(row, -1), torch.softmax(ref, -1), atol=2e-5, rtol=0)


def test_a_shared_prefix_of_two_maximal_prefixes_is_counted_once(shared_data):
    """tok512 spells "10" "100" "110" as 1 0 / 1 0 0 / 1 1 0: "10" continues both (1,0) and (1,1)."""
    model, tok = _stories(shared_data)
    backend = HFBackend(model, tok)
    cand = ["10", "100", "110", "11"]
    ids = backend.candidate_ids(cand, "=")
    # "10" = "1" "0": a proper prefix of "100", sharing "1" with "110"
    assert ids[0] == ids[2][:1] + ids[1][1:2]
    p = "Tom had a red ball.\nRating="
    got = backend.candidate_logprobs([p], cand)[0]
    with torch.no_grad():
        ref = naive_candidate_logprobs(model, tok, tok(p)["input_ids"], ids)
    torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(ref, -1), atol=2e-5, rtol=0)


def test_local_rationales_keep_their_leading_space_like_served_ones(shared_data):
    """A lone "▁He" decodes to "He": the local backend's rationale lost the space the model generated, so
    chain of thought read "Rationale:He ..." locally and "Rationale: He ..." over HTTP."""
    model, tok = _stories(shared_data)
    prompts = ["Tom had a red ball.", "Once upon a time there was a little girl named Lily."]
    with CompletionServer(model, tok) as srv:
        served = OpenAICompatibleBackend(srv.url, "local", max_retries=0).generate(prompts, max_new_tokens=5)
    local = HFBackend(model, tok).generate(prompts, max_new_tokens=5)
    assert served[0].startswith(" ") and local == served
