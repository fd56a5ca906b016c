"""rlaif_fast.integrations.trl: after patch() TRL's helpers return what they returned before (tolerance
rule against float64), gradients included; unpatch() restores the originals everywhere."""

import copy
import importlib
import os
import sys
import warnings

import pytest
import torch

from tests.helpers import ATOL, assert_tolerance

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the importer test loads trl.experimental

trl_utils = pytest.importorskip("trl.trainer.utils")
transformers = pytest.importorskip("transformers")
from rlaif_fast.integrations import trl as integ  # noqa: E402

ORIG = {n: getattr(trl_utils, n) for n in integ._NAMES}


@pytest.fixture(autouse=True)
def _always_unpatch():
    yield
    integ.unpatch()


def _atol(dtype, truth):
    return ATOL[dtype] * max(1.0, truth.detach().abs().max().item())


def _logits(dtype, B=3, T=7, V=509):
    return (torch.randn(B, T, V) * 3).to(dtype)


def _compare(fn_name, dtype, call):
    """call(fn, logits) -> tuple of outputs; ours vs TRL's original in dtype vs TRL's original in float64."""
    logits = _logits(dtype)
    g = None
    results = []
    for fn, x in (
        (getattr(trl_utils, fn_name), logits),
        (ORIG[fn_name], logits),
        (ORIG[fn_name], logits.double()),
    ):
        leaf = x.detach().clone().requires_grad_()
        outs = call(fn, leaf)
        if g is None:
            g = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
        sum((o * gi.to(o.dtype)).sum() for o, gi in zip(outs, g)).backward()
        results.append((outs, leaf.grad))
    (ours, d_ours), (eager, d_eager), (truth, d_truth) = results
    for i, (o, e, t) in enumerate(zip(ours, eager, truth)):
        assert o.dtype == e.dtype, "patched helpers keep TRL's output dtype"
        assert_tolerance(o, e, t, atol=_atol(dtype, t), name=f"{fn_name} output {i}")
    assert_tolerance(d_ours, d_eager, d_truth, atol=_atol(dtype, d_truth), name=f"{fn_name} d logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_helpers_match_trl(backend, dtype):
    assert integ.patch()
    assert trl_utils.selective_log_softmax is integ._selective_log_softmax
    index = torch.randint(0, 509, (3, 7))
    row_mask = torch.rand(3, 7) > 0.3
    _compare("selective_log_softmax", dtype, lambda f, x: (f(x, index, temperature=0.7, row_mask=row_mask),))
    _compare("selective_log_softmax", dtype, lambda f, x: (f(x, index),))
    _compare("entropy_from_logits", dtype, lambda f, x: (f(x),))
    _compare(
        "selective_log_softmax_and_entropy",
        dtype,
        lambda f, x: f(x, index, temperature=0.9, row_mask=row_mask),
    )


def test_topk_index_falls_back_to_trl():
    integ.patch()
    logits = _logits(torch.float32)
    index = torch.randint(0, 509, (3, 7, 4))
    got = trl_utils.selective_log_softmax(logits, index, temperature=0.5)
    want = ORIG["selective_log_softmax"](logits, index, temperature=0.5)
    assert torch.equal(got, want)


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=211, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def test_fused_lm_head_matches_trl(backend):
    base = _tiny_llama()
    theirs, ours, truth = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base).double()
    outputs = ("log_probs", "entropy")
    ORIG["add_fused_lm_head"](theirs, temperature=0.7, outputs=outputs)
    ORIG["add_fused_lm_head"](truth, temperature=0.7, outputs=outputs)
    integ.patch()
    trl_utils.add_fused_lm_head(ours, temperature=0.7, outputs=outputs)
    ids = torch.randint(1, 211, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # left padding
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :4] = -100  # prompt
    res = {}
    for name, m in (("ours", ours), ("theirs", theirs), ("truth", truth)):
        out = m(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        (out.loss + out.entropy.sum() * 0.1).backward()
        res[name] = (out, m.lm_head.weight.grad, m.model.layers[0].self_attn.q_proj.weight.grad)
    (o, *go), (e, *ge), (t, *gt) = res["ours"], res["theirs"], res["truth"]
    assert torch.equal(o.label_mask, e.label_mask)
    for field in ("loss", "log_probs", "entropy"):
        tt = getattr(t, field)
        assert_tolerance(getattr(o, field), getattr(e, field), tt, atol=_atol(torch.float32, tt), name=field)
    for a, b, c in zip(go, ge, gt):
        assert_tolerance(a, b, c, atol=_atol(torch.float32, c), name="grad")
    # without fused_lm_head the forward is the model's own (generate keeps working)
    assert ours(input_ids=ids).logits.shape == (2, 9, 211)


def test_unsupported_fused_outputs_fall_back_with_warning():
    integ.patch()
    model = _tiny_llama()
    with pytest.warns(UserWarning, match="not accelerated"):
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    out = model(
        input_ids=torch.randint(1, 211, (1, 5)), labels=torch.randint(1, 211, (1, 5)), fused_lm_head=True
    )
    assert out.is_top1 is not None


def test_patch_is_idempotent_and_reaches_importers():
    importer = importlib.import_module("trl.experimental.sdft.loss_utils")  # did `from ..utils import ...`
    assert importer.selective_log_softmax is ORIG["selective_log_softmax"]
    assert integ.patch() and integ.patch()
    assert importer.selective_log_softmax is integ._selective_log_softmax
    assert integ.unpatch()
    assert not integ.unpatch()
    for n in integ._NAMES:
        assert getattr(trl_utils, n) is ORIG[n]
    assert importer.selective_log_softmax is ORIG["selective_log_softmax"]


def test_modules_imported_after_patch_are_restored(monkeypatch):
    name = "trl.experimental.sdft.loss_utils"
    integ.patch()
    monkeypatch.delitem(sys.modules, name, raising=False)  # a fresh import while patched (restored after)
    late = importlib.import_module(name)
    assert late.selective_log_softmax is integ._selective_log_softmax
    integ.unpatch()
    assert late.selective_log_softmax is ORIG["selective_log_softmax"]


def test_no_trl_warns_and_does_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)  # makes the import raise ImportError
    with pytest.warns(UserWarning, match="not importable"):
        assert integ.patch() is False
    assert not integ.is_patched()


def test_moved_names_warn_and_do_nothing(monkeypatch):
    for n in integ._NAMES:
        monkeypatch.delattr(trl_utils, n)
    with pytest.warns(UserWarning, match="moved"):
        assert integ.patch() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not integ.unpatch()


# -------------------- vision-language models


def test_trl_fused_lm_head_sees_the_images_of_a_vision_language_model():
    # the patched add_fused_lm_head ran get_decoder() (the text-only decoder) where TRL runs base_model:
    # pixel_values were dropped and M-RoPE positions lost, so VLM log-probs ignored the image
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=200, rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]}, bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, in_chans=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=150, video_token_id=151, vision_start_token_id=152,
    )  # fmt: skip
    theirs = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    ours = copy.deepcopy(theirs)
    ids = torch.tensor([[5, 152, 150, 7, 8, 9, 10, 11]])
    labels = ids.masked_fill(torch.arange(8) < 4, -100)
    inputs = dict(
        input_ids=ids, pixel_values=torch.randn(4, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 2, 2]]),
        mm_token_type_ids=(ids == 150).long(), labels=labels, fused_lm_head=True,
    )  # fmt: skip
    trl_utils.add_fused_lm_head(theirs)
    try:
        assert integ.patch()
        trl_utils.add_fused_lm_head(ours)
        with torch.no_grad():
            want = theirs(**inputs).log_probs
            got = ours(**inputs).log_probs
    finally:
        integ.unpatch()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
