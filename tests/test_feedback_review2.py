"""Second review of rlaif_fast.feedback: each test failed before its fix (see the commit message)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from rlaif_fast.feedback import HFBackend, OpenAICompatibleBackend, ScoreLabeler
from rlaif_fast.feedback.serve import CompletionServer
from tests.test_feedback_labelers import gpt2_tokenizer, naive_candidate_logprobs, tiny_gpt2


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
    else:
        from transformers import GraniteConfig, GraniteForCausalLM

        model = GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0))
        emb = model.model.embed_tokens
    with torch.no_grad():
        emb.weight.normal_(0, 1.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
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


def test_local_rationales_keep_their_leading_space_like_served_ones(shared_data):
    """A lone "▁He" decodes to "He": the local backend's rationale lost the space the model generated, so
    chain of thought read "Rationale:He ..." locally and "Rationale: He ..." over HTTP."""
    model, tok = _stories(shared_data)
    prompts = ["Tom had a red ball.", "Once upon a time there was a little girl named Lily."]
    with CompletionServer(model, tok) as srv:
        served = OpenAICompatibleBackend(srv.url, "local", max_retries=0).generate(prompts, max_new_tokens=5)
    local = HFBackend(model, tok).generate(prompts, max_new_tokens=5)
    assert served[0].startswith(" ") and local == served


def test_a_template_ending_with_whitespace_is_refused():
    # BPE joins the space and the digit (" 1"): local and served backends would score different tokens
    from rlaif_fast.feedback.templates import Template

    with pytest.raises(
        ValueError, match=r"ending='Preferred Summary: ' ends with whitespace.*'Preferred Summary:'"
    ):
        Template.from_string("{context}\n1: {first}\n2: {second}\n", ending="Preferred Summary: ")
    with pytest.raises(ValueError, match="score_ending"):
        Template.from_string("{context} {first} {second}", ending="A=", score_ending="Rating=\n")
    Template.from_string("{context}\n1: {first}\n2: {second}\n", ending="Preferred Summary=")  # fine
