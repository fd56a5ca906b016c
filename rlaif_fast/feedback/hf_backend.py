"""A local transformers causal LM as the AI labeler, scoring only what the paper's method needs.

What the labeler needs from the model is the log-probability of a few candidate continuations ("1"/"2",
or "1".."10") after each prompt. So instead of ``model(...).logits`` ([B, T, V]: 256 prompts x 300 tokens
x 50257 fp32 = 15 GB), this backend runs the backbone, keeps the last position's hidden state and
multiplies it by the K candidate rows of the output embedding: [B, K]. The softmax over candidates is
the same whichever normalizer the logits carry, so the vocabulary log-sum-exp is never needed for the
first candidate token. Candidates of several tokens ("10" in a SentencePiece vocabulary is "1" "0") are
scored by teacher forcing: the prompt is run once with the longest shared candidate prefix appended, and
the later tokens get a full log-softmax only at those few extra positions ([B, m, V], m = 1 for "10").

Prompts are left-padded (the last column is every row's last real token), with position ids counted
from each row's first real token, so a padded row computes what it would alone. Prompts longer than
``max_length`` lose the left of their context; the preamble, the responses and the ending stay intact.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from rlaif_fast.feedback.templates import PromptParts


class HFBackend:
    """A transformers causal LM (a local path or a loaded model) that scores candidate continuations.

    Args:
        model_or_path: a ``PreTrainedModel`` with an output embedding, or a local directory.
        tokenizer: the labeler's own tokenizer (independent of the policy's); loaded from the path if None.
        batch_size: at most this many prompts per forward pass.
        max_batch_tokens: at most this many padded tokens (rows x longest row) per forward pass, which
            bounds the activation memory whatever the prompt lengths; None for no bound.
        max_length: token limit per prompt; defaults to the model's position limit.
        device: where to run; defaults to the model's device.
    """

    def __init__(
        self,
        model_or_path,
        tokenizer=None,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        max_batch_tokens: int | None = 4096,
        device=None,
    ):
        if isinstance(model_or_path, (str, Path)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = Path(model_or_path)
            if not path.exists():
                raise ValueError(f"labeler model path {str(path)!r} does not exist; give a local directory")
            model = AutoModelForCausalLM.from_pretrained(str(path))
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(path))
        else:
            model = model_or_path
        if not isinstance(model, torch.nn.Module) or model.get_output_embeddings() is None:
            raise TypeError(
                f"HFBackend needs a causal LM with an output embedding, got {type(model).__name__}"
            )
        if tokenizer is None:
            raise ValueError("HFBackend got a model object but tokenizer=None; pass the labeler's tokenizer")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        if max_batch_tokens is not None and int(max_batch_tokens) < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens!r}")
        self.max_batch_tokens = None if max_batch_tokens is None else int(max_batch_tokens)
        from rlaif_fast.ops.model import context_length

        self.max_length = int(max_length or context_length(model.config) or 2048)
        pad = tokenizer.pad_token_id
        self.pad_id = (
            pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        )
        self._cand_cache: dict = {}
        self._warned_truncation = False

    # ---- tokenization ----
    def _enc(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def candidate_ids(self, candidates: Sequence[str], probe: str = "=") -> list[list[int]]:
        """Token ids of each candidate as it follows ``probe`` text (tokenizers merge across boundaries).

        Raises ValueError when a candidate has no token of its own (absent, unknown or merged away).
        """
        key = (tuple(candidates), probe)
        if key in self._cand_cache:
            return self._cand_cache[key]
        base = self._enc(probe, False)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        out = []
        for c in candidates:
            full = self._enc(probe + c, False)
            ids = full[len(base) :] if full[: len(base)] == base else self._enc(c, False)
            text = self.tokenizer.decode(ids).strip() if ids else ""
            if not ids or (unk is not None and unk in ids and c != self.tokenizer.unk_token) or text != c:
                raise ValueError(
                    f"the labeler's tokenizer ({type(self.tokenizer).__name__}) has no token sequence for the "
                    f"candidate {c!r} (got ids {ids} decoding to {text!r}); use a labeler whose vocabulary "
                    "contains the digits"
                )
            out.append(ids)
        self._cand_cache[key] = out
        return out

    def check_candidates(
        self, candidates: Sequence[str], *, single_token: bool = False, probe: str = "="
    ) -> None:
        ids = self.candidate_ids(candidates, probe)
        if single_token:
            multi = {c: i for c, i in zip(candidates, ids) if len(i) != 1}
            if multi:
                raise ValueError(
                    f"pairwise labeling needs one token per candidate, but the labeler's tokenizer splits {multi}; "
                    "use a labeler whose vocabulary has the single tokens '1' and '2'"
                )
        if len({tuple(i) for i in ids}) != len(ids):
            raise ValueError(f"candidates {list(candidates)} map to the same token ids {ids}")

    def encode_prompt(self, prompt, limit: int) -> list[int]:
        """Token ids of one prompt, the context cut from its left when the prompt exceeds ``limit``."""
        if isinstance(prompt, str):
            prompt = PromptParts("", prompt, "")
        ids = self._enc(prompt.text, True)
        if len(ids) <= limit:
            return ids
        head, tail = self._enc(prompt.head, True), self._enc(prompt.tail, False)
        keep = limit - len(head) - len(tail)
        if keep >= 0:
            ctx = self._enc(prompt.context, False)
            return head + (ctx[len(ctx) - keep :] if keep else []) + tail
        if not self._warned_truncation:
            warnings.warn(
                f"a prompt's preamble, responses and ending alone take {len(head) + len(tail)} tokens > "
                f"max_length={limit}; its start is cut too. Raise max_length or shorten the template.",
                stacklevel=3,
            )
            self._warned_truncation = True
        return (head + tail)[-limit:]

    def _pad_left(self, seqs: list[list[int]]):
        """(B, T) left-padded ids and mask, by the C++ padder the trainer uses (every prompt has a token)."""
        from rlaif_fast.batching import pad_rollouts

        out = pad_rollouts(seqs, [[] for _ in seqs], self.pad_id, padding_side="left")
        return out.input_ids.to(self.device), out.attention_mask.to(self.device)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ---- scoring ----
    def _last_hidden(self, seqs: list[list[int]], n_last: int) -> torch.Tensor:
        """Backbone hidden states of the last ``n_last`` positions: (B, n_last, H). Never the [B, T, V] logits."""
        ids, mask = self._pad_left(seqs)  # (B, T)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model.base_model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state[:, -n_last:]  # (B, n_last, H)

    def _head(self, h: torch.Tensor, rows=None) -> torch.Tensor:
        """h @ W[rows].T (+ bias) in fp32: (..., H) -> (..., K), or all V rows when ``rows`` is None."""
        emb = self.model.get_output_embeddings()
        w = emb.weight if rows is None else emb.weight[rows]
        out = h.float() @ w.float().T
        bias = getattr(emb, "bias", None)
        if bias is not None:
            out = out + (bias if rows is None else bias[rows]).float()
        # what the model's own forward does after its LM head (Cohere and Falcon-H1 scale, Granite divides,
        # Gemma-2 soft-caps): the policy's table, so labeler and policy never disagree on an architecture
        from rlaif_fast.ops.model import apply_head_transform, head_transform

        return apply_head_transform(out, head_transform(self.model.config))

    @torch.no_grad()
    def _score_batch(self, seqs: list[list[int]], cand: list[list[int]]) -> torch.Tensor:
        """(B, K) log P(candidate | prompt) up to one constant per row (the first token's normalizer)."""
        # Longest shared prefixes of multi-token candidates: one extra forward per maximal prefix.
        prefixes = sorted({tuple(c[:-1]) for c in cand if len(c) > 1}, key=len, reverse=True)
        maximal = [p for p in prefixes if not any(q[: len(p)] == p and q != p for q in prefixes)]
        first = torch.tensor([c[0] for c in cand], device=self.device)
        q0 = list(maximal[0]) if maximal else []
        h = self._last_hidden([s + q0 for s in seqs], len(q0) + 1)  # (B, m+1, H)
        scores = self._head(h[:, 0], first).double()  # (B, K)
        done: set[int] = set()  # a candidate's prefix may start two maximal prefixes: add its tail once
        for j, q in enumerate(maximal):
            if j > 0:
                h = self._last_hidden([s + list(q) for s in seqs], len(q) + 1)
            logp = torch.log_softmax(self._head(h[:, 1:]), dim=-1).double()  # (B, m, V), m = len(q)
            for k, c in enumerate(cand):
                if len(c) > 1 and k not in done and tuple(c[:-1]) == q[: len(c) - 1]:
                    done.add(k)
                    steps = torch.arange(len(c) - 1, device=self.device)
                    scores[:, k] += logp[:, steps, torch.tensor(c[1:], device=self.device)].sum(-1)
        return scores.cpu()

    def encode_for_candidates(self, prompts: Sequence, candidates: Sequence[str]):
        """(candidate token ids as they follow the prompts' ending, each prompt's ids cut so that the
        longest candidate still fits ``max_length``)."""
        tail = prompts[0].tail if isinstance(prompts[0], PromptParts) else prompts[0]
        cand = self.candidate_ids(candidates, tail[-16:] or "=")
        extra = max(len(c) for c in cand) - 1
        return cand, [self.encode_prompt(p, self.max_length - extra) for p in prompts]

    def candidate_logprobs(self, prompts: Sequence, candidates: Sequence[str]) -> torch.Tensor:
        """(N, K) float64: log-prob of each candidate after each prompt, up to a per-row constant.

        Rows are processed longest first so each batch pads little; the result is in input order.
        """
        if not prompts:
            return torch.zeros((0, len(candidates)), dtype=torch.float64)
        cand, seqs = self.encode_for_candidates(prompts, candidates)
        out = torch.empty((len(seqs), len(cand)), dtype=torch.float64)
        for idx in self._batches(seqs):
            out[idx] = self._score_batch([seqs[i] for i in idx], cand)
        return out

    def _batches(self, seqs: list[list[int]]) -> list[list[int]]:
        """Indices longest first, cut into batches of <= batch_size rows and <= max_batch_tokens padded tokens.

        Both orders of a pair have nearly the same length, so they land in the same batch.
        """
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        batches, cur = [], []
        for i in order:
            width = len(seqs[cur[0]]) if cur else len(seqs[i])  # the first row is the longest
            full = len(cur) >= self.batch_size or (
                self.max_batch_tokens is not None and (len(cur) + 1) * width > self.max_batch_tokens
            )
            if cur and full:
                batches.append(cur)
                cur = []
            cur.append(i)
        return batches + [cur] if cur else batches

    @torch.no_grad()
    def generate(self, prompts: Sequence, *, max_new_tokens: int = 64) -> list[str]:
        """Greedy continuations (the chain-of-thought rationale), decoded without special tokens."""
        seqs = [self.encode_prompt(p, self.max_length - max_new_tokens) for p in prompts]
        texts = [""] * len(seqs)
        for idx in self._batches(seqs):
            ids, mask = self._pad_left([seqs[i] for i in idx])
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
            for i, gen in zip(idx, out[:, ids.shape[1] :].tolist()):
                # decoded after its prompt: a lone first token ("▁He" in SentencePiece) would lose its space
                head = self._decode(seqs[i])
                texts[i] = self._decode(seqs[i] + gen)[len(head) :]
        return texts
