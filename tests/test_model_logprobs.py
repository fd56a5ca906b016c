"""model_logprobs on config-built GPT-2 / Llama / Qwen2 models and the real stories260K: equal to
log_softmax(model(...).logits) at the response positions (tolerance rule against a float64 copy),
gradients included, for left / right padding and packed inputs."""

import copy
import json

import pytest
import torch

from rlaif_fast.ops.model import model_logprobs
from tests.helpers import ATOL, assert_tolerance

transformers = pytest.importorskip("transformers")


def _gpt2(vocab=211):
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()  # tied embeddings; eval: no dropout


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=157, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()  # untied, grouped-query attention


def _qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=163, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(cfg).eval()  # q/k/v biases, tied


MODELS = {"gpt2": _gpt2, "llama": _llama, "qwen2": _qwen2}


def _batch(vocab, side, B=3, T=13):
    """Random prompts + responses of different lengths, padded on ``side``; response = last tokens."""
    ids = torch.randint(1, vocab, (B, T))
    attn = torch.zeros(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.long)
    for b, (n, r) in enumerate([(T, 5), (T - 4, 3), (T - 2, 6)][:B]):
        span = slice(T - n, T) if side == "left" else slice(0, n)
        attn[b, span] = 1
        resp[b, span.stop - r : span.stop] = 1
    ids = ids * attn  # pad id 0
    return ids, attn, resp


def _full_logits_logprobs(model, ids, attn, resp, temperature):
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits  # (B, T, V)
    logp_all = torch.log_softmax(logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
                                 / temperature, -1)  # fmt: skip
    lp = logp_all.gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    m = resp[:, 1:].to(lp.dtype)
    z = lp.new_zeros(ids.shape[0], 1)
    return torch.cat([z, lp * m], 1), torch.cat([z, ent * m], 1)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_matches_full_logits_with_gradients(backend, arch, side):
    model = MODELS[arch]().float()
    truth_model = copy.deepcopy(model).double()
    ids, attn, resp = _batch(model.config.vocab_size, side)
    g_lp, g_ent = torch.randn(ids.shape, dtype=torch.float64), torch.randn(ids.shape, dtype=torch.float64)

    def run(fn, m):
        m.zero_grad()
        lp, ent = fn(m)
        (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
        params = dict(m.named_parameters())
        first = _first_layer_weight(m)
        return lp, ent, {"lm_head": m.get_output_embeddings().weight.grad, first: params[first].grad}

    ours = run(lambda m: model_logprobs(m, ids, attn, resp, temperature=0.8, return_entropy=True), model)
    eager_model = copy.deepcopy(model)
    eager = run(lambda m: _full_logits_logprobs(m, ids, attn, resp, 0.8), eager_model)
    truth = run(lambda m: _full_logits_logprobs(m, ids, attn, resp, 0.8), truth_model)
    assert (ours[0][resp == 0] == 0).all() and (ours[0] <= 0).all()
    for i, name in enumerate(["logp", "entropy"]):
        assert_tolerance(ours[i], eager[i], truth[i], atol=_atol(truth[i]), name=name)
    for k in ours[2]:
        assert_tolerance(ours[2][k], eager[2][k], truth[2][k], atol=_atol(truth[2][k]), name=f"d {k}")


def _atol(truth):
    # fp32 "small atol" scaled to the values' size (gradients summed over tokens exceed 1)
    return ATOL[torch.float32] * max(1.0, truth.abs().max().item())


def _first_layer_weight(model):
    return next(k for k, p in model.named_parameters() if ".0." in k and p.dim() == 2)


def test_left_and_right_padding_agree(backend):
    model = _llama()
    ids_l, attn_l, resp_l = _batch(157, "left")
    # the same rows, right padded
    ids_r, attn_r, resp_r = (torch.zeros_like(ids_l) for _ in range(3))
    for b in range(ids_l.shape[0]):
        keep = attn_l[b] == 1
        n = int(keep.sum())
        ids_r[b, :n], attn_r[b, :n], resp_r[b, :n] = ids_l[b, keep], 1, resp_l[b, keep]
    with torch.no_grad():
        lp_l = model_logprobs(model, ids_l, attn_l, resp_l)
        lp_r = model_logprobs(model, ids_r, attn_r, resp_r)
    assert (lp_l[resp_l == 1] - lp_r[resp_r == 1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_rows_equal_separate_sequences(backend, arch):
    model = MODELS[arch]()
    V = model.config.vocab_size
    seqs = [torch.randint(1, V, (n,)) for n in (7, 5, 9)]
    resp_len = [3, 2, 4]
    ids = torch.cat(seqs)[None]  # (1, 21)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    resp = torch.cat([torch.arange(len(s)) >= len(s) - r for s, r in zip(seqs, resp_len)])[None].long()
    with torch.no_grad():
        packed = model_logprobs(model, ids, None, resp, position_ids=pos)
        alone = [
            model_logprobs(model, s[None], torch.ones(1, len(s), dtype=torch.long),
                           (torch.arange(len(s)) >= len(s) - r)[None].long())[0]
            for s, r in zip(seqs, resp_len)
        ]  # fmt: skip
    assert (packed[0] - torch.cat(alone)).abs().max().item() < 1e-5
    assert (packed[0][resp[0] == 1] < 0).all()


def test_gpt2_with_the_real_tokenizer(backend, shared_data):
    # from_pretrained on the folder: transformers 5 silently builds an EMPTY tokenizer from
    # GPT2TokenizerFast(vocab_file=..., merges_file=...)
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(shared_data / "gpt2_bpe_tokenizer_whisper"))
    assert len(tok) == 50257
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = _gpt2(vocab=len(tok))
    prompts = ["Human: Is the sky blue?\n\nAssistant:", "Human: hi\n\nAssistant:"]
    answers = [" Yes, on a clear day.", " Hello!"]
    enc = tok([p + a for p, a in zip(prompts, answers)], padding=True, return_tensors="pt")
    n_answer = [len(tok(a).input_ids) for a in answers]
    resp = torch.zeros_like(enc.input_ids)
    for b, n in enumerate(n_answer):
        resp[b, -n:] = 1
    with torch.no_grad():
        ours = model_logprobs(model, enc.input_ids, enc.attention_mask, resp)
        eager, _ = _full_logits_logprobs(model, enc.input_ids, enc.attention_mask, resp, 1.0)
        truth, _ = _full_logits_logprobs(
            copy.deepcopy(model).double(), enc.input_ids, enc.attention_mask, resp, 1.0
        )
    assert_tolerance(ours, eager, truth, atol=_atol(truth), name="logp")
    assert int((ours != 0).sum()) == sum(n_answer)


def test_stories260k_matches_reference(backend, shared_data):
    from rlaif_fast.models import load_llama2c

    d = shared_data / "stories260K"
    ref = json.loads((d / "reference_greedy_numpy.json").read_text())
    model = load_llama2c(d / "stories260K.bin")
    ids = torch.tensor([ref["greedy_tokens_from_bos"]])
    resp = torch.ones_like(ids)
    with torch.no_grad():
        lp = model_logprobs(model, ids, torch.ones_like(ids), resp)
    want = torch.tensor(ref["per_token_logprobs"], dtype=torch.float64)
    assert lp[0, 0].item() == 0.0
    assert (lp[0, 1:].double() - want).abs().max().item() < 1e-4


def test_all_masked_batch_gives_zeros_and_a_gradient(backend):
    model = _llama()
    ids = torch.randint(1, 157, (2, 6))
    lp, ent = model_logprobs(model, ids, torch.ones_like(ids), torch.zeros_like(ids), return_entropy=True)
    assert lp.shape == (2, 6) and (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()  # connected to the graph: an all-masked micro-batch must not crash
    assert (model.lm_head.weight.grad == 0).all()


def test_bad_inputs_name_the_value():
    model = _llama()
    ids = torch.randint(0, 157, (2, 5))
    with pytest.raises(ValueError, match="response_mask has shape"):
        model_logprobs(model, ids, torch.ones_like(ids), torch.ones(2, 4))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model_logprobs(model, ids.float(), None, torch.ones_like(ids))
    with pytest.raises(ValueError, match="input_ids must have 2 dimensions"):
        model_logprobs(model, ids[0], None, torch.ones_like(ids[0]))


# -------------------- one context-length lookup


def test_context_length_reads_a_vision_language_models_text_config():
    """The labeler, the local server and the pipeline's prompt budget each read max_position_embeddings or
    n_positions off the top-level config: a VLM keeps them in its text config, so the labeler assumed 2048
    positions and the prompt budget no limit at all."""
    from types import SimpleNamespace

    from rlaif_fast.feedback import HFBackend
    from rlaif_fast.ops.model import context_length
    from rlaif_fast.pipeline.evaluate import prompt_budget

    cfg = transformers.Gemma3Config(text_config={"max_position_embeddings": 64})
    assert context_length(cfg) == 64 and context_length({"text_config": {"n_positions": 32}}) == 32
    assert context_length(transformers.GPT2Config(n_positions=48)) == 48 and context_length(None) is None
    assert prompt_budget(SimpleNamespace(config=cfg), 256, 14) == 50

    class Head(torch.nn.Module):  # HFBackend needs only a module with an output embedding and a config
        config = cfg

        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(2, 3)

        def get_output_embeddings(self):
            return self.lm_head

    backend = HFBackend(Head(), SimpleNamespace(pad_token_id=0, eos_token_id=0))
    assert backend.max_length == 64
