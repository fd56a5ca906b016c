"""The real stories260K checkpoint through load_llama2c and Llama2cTokenizer, against the float64
numpy re-implementation of llama2.c stored in ../shared/data/stories260K/reference_greedy_numpy.json."""

import json
import random
import struct

import pytest
import torch

from tests.conftest import SHARED_DATA

STORIES = SHARED_DATA / "stories260K"


@pytest.fixture(scope="module")
def stories():
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip(f"{STORIES} is absent (a user's clone without the project's shared data)")
    from rlaif_fast.models import Llama2cTokenizer, load_llama2c

    model = load_llama2c(STORIES / "stories260K.bin")
    tok = Llama2cTokenizer(STORIES / "tok512.bin")
    ref = json.loads((STORIES / "reference_greedy_numpy.json").read_text())
    return model, tok, ref


def test_config_matches_header(stories):
    model, _, _ = stories
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (8, 4, 512)
    assert c.max_position_embeddings == 512 and c.rms_norm_eps == 1e-5
    # tied classifier: one tensor, not a copy
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_greedy_decode_and_logprobs_match_reference(stories):
    model, tok, ref = stories
    bos = torch.tensor([[ref["bos"]]])
    out = model.generate(bos, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0].tolist() == ref["greedy_tokens_from_bos"]
    with torch.no_grad():
        logits = model(out).logits.double()  # (1, 41, 512)
    logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, out[0, 1:, None])[:, 0]
    want = torch.tensor(ref["per_token_logprobs"], dtype=torch.float64)
    assert (logp - want).abs().max().item() < 1e-4
    last = torch.tensor(ref["logits_last_first5"], dtype=torch.float64)
    assert (logits[0, -1, :5] - last).abs().max().item() < 1e-4
    assert tok.decode(out[0], skip_special_tokens=True) == ref["greedy_text"].lstrip(" ")


def test_encode_matches_reference_tokens(stories):
    _, tok, ref = stories
    ids = tok(ref["greedy_text"].lstrip(" ")).input_ids
    assert ids == ref["greedy_tokens_from_bos"]
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 0


def _naive_llama2c_encode(tok, text):
    """llama2.c's encode() transcribed literally (O(n^2) rescans): the oracle for the heap version."""
    ids = []
    for ch in (" " + text) if text else "":
        tid = tok.piece_to_id.get(ch)
        ids.extend([tid] if tid is not None else [3 + b for b in ch.encode("utf-8")])
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            m = tok.piece_to_id.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if m is not None and tok.scores[m] > best:
                best, best_i, best_id = tok.scores[m], i, m
        if best_i < 0:
            return ids
        ids[best_i : best_i + 2] = [best_id]


@pytest.mark.parametrize("seed", range(3))
def test_encode_equals_literal_llama2c_and_round_trips(stories, seed):
    _, tok, ref = stories
    rng = random.Random(seed)
    words = ref["greedy_text"].split() + ["héllo", "世界", "🙂", "  ", "\n", "x", "aaaa", "the the"]
    text = " ".join(rng.choice(words) for _ in range(30))
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == _naive_llama2c_encode(tok, text)
    assert tok.decode(ids) == text
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_batch_padding_and_text_generation(stories):
    model, tok, _ = stories
    tok.padding_side = "left"
    batch = tok(["Once upon a time", "Lily"], padding=True, return_tensors="pt")
    assert batch.input_ids[1, 0].item() == tok.pad_token_id and batch.attention_mask[1, 0].item() == 0
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out, skip_special_tokens=True)
    assert texts[0].startswith("Once upon a time") and texts[1].startswith("Lily")
    assert all(len(t) > len(p) for t, p in zip(texts, ["Once upon a time", "Lily"]))


def test_bad_paths_raise(tmp_path):
    from rlaif_fast.models.llama2c import load_llama2c

    with pytest.raises(ValueError, match="does not exist"):
        load_llama2c(tmp_path / "nope.bin")
    bad = tmp_path / "v1.bin"
    bad.write_bytes(b"24ka" + b"\0" * 64)
    with pytest.raises(ValueError, match="version-1"):
        load_llama2c(bad)


def test_tokenizer_save_and_reload(stories, tmp_path):
    from rlaif_fast.models import Llama2cTokenizer

    _, tok, ref = stories
    tok.save_pretrained(tmp_path)
    again = Llama2cTokenizer.from_pretrained(tmp_path)
    text = ref["greedy_text"].lstrip(" ")
    assert again(text).input_ids == tok(text).input_ids == ref["greedy_tokens_from_bos"]
    assert again.pad_token_id == tok.pad_token_id == 0


# -------------------- damaged checkpoints and tokenizers


# ---- llama2.c loader: damaged files give the loader's own errors --------------------------------------------
def _header(dim=8, hidden=16, layers=1, heads=2, kv=2, vocab=10, seq=4):
    return struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short for a llama2.c header"),
        (b"\x01\x02\x03", "too short for a llama2.c header"),
        (_header() + b"\0" * 203, "truncated"),  # cut mid-float: not a multiple of 4 bytes
        (_header(dim=6, heads=2) + b"\0" * 4000, "valid llama2.c v0 header"),  # head_dim 3: RoPE needs even
        (_header(dim=8, heads=2, kv=3) + b"\0" * 4000, "valid llama2.c v0 header"),  # heads % kv_heads != 0
        (_header(dim=10, heads=4) + b"\0" * 4000, "valid llama2.c v0 header"),  # dim % heads != 0
    ],
)
def test_damaged_llama2c_checkpoint_is_reported(tmp_path, content, message):
    from rlaif_fast.models.llama2c import load_llama2c

    path = tmp_path / "model with spaces.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_llama2c(path)


def test_truncated_llama2c_tokenizer_is_reported(tmp_path):
    from rlaif_fast.models import Llama2cTokenizer

    pieces = [(0.0, b"<unk>"), (0.0, b"\n<s>\n"), (0.0, b"\n</s>\n"), (-1.0, b"ab")]
    raw = struct.pack("<i", 6) + b"".join(struct.pack("<fi", s, len(p)) + p for s, p in pieces)
    good = tmp_path / "tok512.bin"
    good.write_bytes(raw)
    assert Llama2cTokenizer(good).vocab_size == 4
    for cut in (len(raw) - 1, len(raw) - 3):  # inside the last piece, inside its (score, length) record
        bad = tmp_path / f"cut{cut}.bin"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated"):
            Llama2cTokenizer(bad)
