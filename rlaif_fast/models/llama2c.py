"""Karpathy's llama2.c checkpoints as a transformers ``LlamaForCausalLM``, and its tokenizer as a
transformers tokenizer, so the real pretrained stories260K model runs through HF ``generate`` and
through every op of this package.

How llama2.c departs from HF Llama, and what the conversion does about it:
- RoPE: llama2.c rotates interleaved pairs (x[2i], x[2i+1]) of each head; HF rotates halves
  (x[i], x[i + d/2]). Permuting the rows of wq and wk within each head (even rows first, then odd)
  turns one into the other, and q·k is unchanged because both sides get the same permutation.
- The v0 ("legacy") file has no magic: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, seq_len), a positive vocab_size meaning the classifier is the token embedding (tied),
  then fp32 arrays, then the RoPE tables (recomputed by HF, skipped here), then wcls when untied.
- Tokenizer (tok512.bin): SentencePiece-style BPE where encoding merges, again and again, the adjacent
  pair whose merged piece has the highest score (leftmost on ties); unknown code points fall back to
  bytes (<0xNN> = id 3 + byte); a " " is prepended to non-empty text (SentencePiece's dummy prefix).
"""

from __future__ import annotations

import heapq
import struct
from pathlib import Path

import numpy as np
import torch

_HEADER = struct.Struct("<7i")
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export, not handled here


def _read_header(raw: bytes, path: Path) -> dict:
    if len(raw) >= 4 and struct.unpack_from("<I", raw)[0] == _V1_MAGIC:
        raise ValueError(
            f"{path} is a llama2.c version-1+ export (magic 'ak42'); load_llama2c reads the legacy v0 "
            "format: re-export with `python export.py --version 0` from llama2.c"
        )
    if len(raw) < _HEADER.size:
        raise ValueError(
            f"{path} holds {len(raw)} bytes, too short for a llama2.c header ({_HEADER.size}): not a checkpoint"
        )
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _HEADER.unpack_from(raw)
    if (
        min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len) <= 0
        or vocab == 0
        or dim % n_heads  # heads split the model dimension
        or (dim // n_heads) % 2  # RoPE rotates pairs
        or n_heads % n_kv_heads  # grouped-query attention shares each kv head among whole groups
    ):
        raise ValueError(
            f"{path} does not start with a valid llama2.c v0 header: got {_HEADER.unpack_from(raw)}"
        )
    return dict(
        dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab=abs(vocab), shared=vocab > 0, seq_len=seq_len,
    )  # fmt: skip


def _rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of wq/wk per head from interleaved pairs to HF's rotate-half layout."""
    out, inp = w.shape  # (n_heads * head_dim, dim)
    head_dim = out // n_heads
    # row 2i of a head is the first of pair i, row 2i+1 the second: put all firsts, then all seconds
    return w.view(n_heads, head_dim // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def load_llama2c(path, dtype: torch.dtype = torch.float32):
    """Load a llama2.c v0 checkpoint (e.g. ``stories260K.bin``) as ``transformers.LlamaForCausalLM``.

    The result is in eval mode, in ``dtype``, with tied embeddings when the file's classifier is shared,
    RMSNorm eps 1e-5, RoPE theta 10000, grouped-query attention as stored, and max positions = seq_len.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"llama2.c checkpoint {str(path)!r} does not exist; pass the path of a .bin file")
    raw = path.read_bytes()
    h = _read_header(raw, path)
    dim, hidden, L, n_heads, n_kv = h["dim"], h["hidden"], h["n_layers"], h["n_heads"], h["n_kv_heads"]
    head_dim = dim // n_heads
    kv_dim = n_kv * head_dim
    # count: a file cut mid-float is reported as truncated below, not as numpy's buffer-size error
    floats = np.frombuffer(raw, dtype="<f4", count=(len(raw) - _HEADER.size) // 4, offset=_HEADER.size)
    shapes = [
        ("tok", (h["vocab"], dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv_dim, dim)),
        ("wv", (L, kv_dim, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
        ("freq_real", (h["seq_len"], head_dim // 2)), ("freq_imag", (h["seq_len"], head_dim // 2)),
    ]  # fmt: skip
    if not h["shared"]:
        shapes.append(("wcls", (h["vocab"], dim)))
    need = sum(int(np.prod(s)) for _, s in shapes)
    if floats.size < need:
        raise ValueError(
            f"{path} holds {floats.size} floats after the header, the header implies {need}: truncated?"
        )
    w, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = torch.from_numpy(floats[at : at + n].copy()).view(shape)
        at += n

    config = LlamaConfig(
        vocab_size=h["vocab"], hidden_size=dim, intermediate_size=hidden, num_hidden_layers=L,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=h["shared"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )  # fmt: skip
    state = {"model.embed_tokens.weight": w["tok"], "model.norm.weight": w["rms_final"]}
    state["lm_head.weight"] = w["tok"] if h["shared"] else w["wcls"]
    for i in range(L):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = w["rms_att"][i]
        state[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        state[p + "self_attn.q_proj.weight"] = _rotate_half_rows(w["wq"][i], n_heads)
        state[p + "self_attn.k_proj.weight"] = _rotate_half_rows(w["wk"][i], n_kv)
        state[p + "self_attn.v_proj.weight"] = w["wv"][i]
        state[p + "self_attn.o_proj.weight"] = w["wo"][i]
        state[p + "mlp.gate_proj.weight"] = w["w1"][i]
        state[p + "mlp.down_proj.weight"] = w["w2"][i]
        state[p + "mlp.up_proj.weight"] = w["w3"][i]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied lm_head may be reported missing (it aliases embed_tokens); anything else is a bug
    missing = [k for k in missing if not (h["shared"] and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if h["shared"]:
        model.tie_weights()
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------
# tokenizer


def _read_tok512(path: Path) -> tuple[list[str], list[float]]:
    raw = path.read_bytes()
    (at,) = struct.unpack_from("<i", raw)  # max_token_length, unused
    at = 4
    pieces, scores = [], []
    while at < len(raw):
        if at + 8 > len(raw):
            raise ValueError(f"{path} ends inside a (score, length) record at byte {at}: truncated?")
        score, n = struct.unpack_from("<fi", raw, at)
        at += 8
        if n < 0 or at + n > len(raw):
            raise ValueError(
                f"{path}: piece {len(pieces)} of {n} bytes runs past the end of the file: truncated?"
            )
        pieces.append(raw[at : at + n].decode("utf-8"))
        scores.append(score)
        at += n
    return pieces, scores


def _make_tokenizer_class():
    from transformers import PreTrainedTokenizer

    class Llama2cTokenizer(PreTrainedTokenizer):
        """llama2.c's tokenizer (``tok512.bin`` and friends) as a transformers tokenizer.

        Encoding is llama2.c's: dummy-prefix space, code points (byte fallback), then greedy merges of the
        best-scoring adjacent pair. Special tokens: ``<unk>`` = 0 (also the pad token: no pad in the
        vocabulary, and 0 keeps ``</s>`` distinct from padding), ``<s>`` = 1 (prepended by
        ``add_special_tokens``), ``</s>`` = 2. Decoding drops the dummy-prefix space of the first piece.
        """

        vocab_files_names = {"vocab_file": "tok512.bin"}
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, vocab_file, **kwargs):
            self.vocab_file = str(vocab_file)
            path = Path(vocab_file)
            if not path.is_file():
                raise ValueError(
                    f"llama2.c tokenizer file {str(path)!r} does not exist; pass tok512.bin's path"
                )
            pieces, scores = _read_tok512(path)
            # the stored special pieces are "<unk>", "\n<s>\n", "\n</s>\n": expose the usual names
            pieces[0], pieces[1], pieces[2] = "<unk>", "<s>", "</s>"
            self.pieces, self.scores = pieces, scores
            self.piece_to_id = {p: i for i, p in reversed(list(enumerate(pieces)))}
            kwargs.setdefault("bos_token", "<s>")
            kwargs.setdefault("eos_token", "</s>")
            kwargs.setdefault("unk_token", "<unk>")
            kwargs.setdefault("pad_token", "<unk>")
            kwargs.setdefault("clean_up_tokenization_spaces", False)
            super().__init__(**kwargs)

        @property
        def vocab_size(self) -> int:
            return len(self.pieces)

        def get_vocab(self) -> dict[str, int]:
            return dict(self.piece_to_id)

        def prepare_for_tokenization(self, text, is_split_into_words=False, **kwargs):
            # SentencePiece's dummy prefix: merges then fold it into the first word (" Once")
            return (" " + text if text else text), kwargs

        def _tokenize(self, text, **kwargs):
            return [self.pieces[i] for i in self._encode_ids(text)]

        def _encode_ids(self, text: str) -> list[int]:
            ids = []
            for ch in text:
                tid = self.piece_to_id.get(ch)
                if tid is None:
                    ids.extend(3 + b for b in ch.encode("utf-8"))  # byte fallback
                else:
                    ids.append(tid)
            return self._merge(ids)

        def _merge(self, ids: list[int]) -> list[int]:
            """llama2.c's merge loop with a heap: O(n log n) instead of its O(n^2) rescans.

            Ties go to the leftmost pair, as in llama2.c: heap keys are (-score, start position), and a
            node's start position never changes when it absorbs its right neighbour.
            """
            n = len(ids)
            tok, nxt, prv, alive = list(ids), list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
            heap = []

            def push(i):
                j = nxt[i]
                if j < n:
                    merged = self.piece_to_id.get(self.pieces[tok[i]] + self.pieces[tok[j]])
                    if merged is not None:
                        heapq.heappush(heap, (-self.scores[merged], i, tok[i], tok[j], merged))

            for i in range(n - 1):
                push(i)
            while heap:
                _, i, a, b, merged = heapq.heappop(heap)
                j = nxt[i] if alive[i] else n
                if j >= n or tok[i] != a or tok[j] != b:
                    continue  # stale: one side merged since this entry was pushed
                tok[i], alive[j] = merged, False
                nxt[i] = nxt[j]
                if nxt[j] < n:
                    prv[nxt[j]] = i
                push(i)
                if prv[i] >= 0:
                    push(prv[i])
            return [tok[i] for i in range(n) if alive[i]]

        def _convert_token_to_id(self, token):
            return self.piece_to_id.get(token, 0)

        def _convert_id_to_token(self, index):
            return self.pieces[index]

        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            out = bytearray()
            for i, t in enumerate(tokens):
                if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                    out.append(int(t[3:5], 16))
                    continue
                if i == 0 and t.startswith(" "):
                    t = t[1:]  # the dummy prefix added at encode time
                out += t.encode("utf-8")
            return out.decode("utf-8", errors="replace")

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            out = [self.bos_token_id] + list(token_ids_0)
            return out if token_ids_1 is None else out + [self.bos_token_id] + list(token_ids_1)

        def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
            if already_has_special_tokens:
                return [1 if t in (0, 1, 2) else 0 for t in token_ids_0]
            mask = [1] + [0] * len(token_ids_0)
            return mask if token_ids_1 is None else mask + [1] + [0] * len(token_ids_1)

        def save_vocabulary(self, save_directory, filename_prefix=None):
            target = Path(save_directory) / (
                (filename_prefix + "-" if filename_prefix else "") + "tok512.bin"
            )
            if Path(self.vocab_file).resolve() != target.resolve():
                target.write_bytes(Path(self.vocab_file).read_bytes())
            return (str(target),)

    return Llama2cTokenizer


_TOKENIZER_CLASS = None


def __getattr__(name):
    # built on first use so that importing this module does not import transformers
    global _TOKENIZER_CLASS
    if name == "Llama2cTokenizer":
        if _TOKENIZER_CLASS is None:
            _TOKENIZER_CLASS = _make_tokenizer_class()
        return _TOKENIZER_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
