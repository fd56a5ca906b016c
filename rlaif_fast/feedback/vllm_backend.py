"""A vLLM engine in this process as the AI labeler: where a user runs the paper's large labeler LLM.

The labelers need the log-probability of a few candidate continuations ("1"/"2", or "1".."10") after
each prompt, and greedy rationales for chain of thought. This backend asks vLLM for exactly that: one
request per prompt (and per distinct multi-token candidate prefix), one decoding step, with
``logprob_token_ids`` set to the candidates' next tokens, so the engine returns K log-probs per prompt
instead of a vocabulary's worth. The prompts of a batch go to the engine together (continuous
batching); both orders of a pair and the candidate prefixes of a prompt share their cached prefix.

Tokenization is the same code as ``HFBackend`` (this class inherits it): the prompt ids, the candidate
ids (found after the template's ending, as the labeler will see them) and the context truncation are
identical, so on the same weights the labels equal HFBackend's. Scores here are normalized
log-probs (HFBackend's first-token scores carry a per-row constant instead); the labelers' softmax over
the candidates removes either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from rlaif_fast.feedback.hf_backend import HFBackend


class VLLMBackend(HFBackend):
    """A local model directory served by an in-process vLLM engine, scoring candidate continuations.

    Args:
        model_path: a local directory vLLM can load (config.json + weights).
        tokenizer: the labeler's tokenizer; loaded from ``model_path`` if None.
        max_length: token limit per prompt; defaults to the model's position limit.
        dtype: the engine's dtype ("auto": the checkpoint's own, as HFBackend loads it; vLLM's "auto"
            would run an fp32 checkpoint in bf16 on CPU).
        gpu_memory_utilization, tensor_parallel_size: as in ``vllm.LLM`` (on CPU the KV cache size comes
            from VLLM_CPU_KVCACHE_SPACE instead, 1 GiB unless set).
        enforce_eager: no torch.compile / CUDA graphs (starts in seconds on CPU instead of ~100 s).
    """

    def __init__(
        self,
        model_path,
        tokenizer=None,
        *,
        max_length: int | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
    ):
        from rlaif_fast.ops.model import context_length
        from rlaif_fast.trainer import rollout_vllm

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"vLLM labeler path {str(path)!r} has no config.json; give a local model directory"
            )
        if not rollout_vllm.vllm_available():
            raise ValueError(f"the vLLM labeler needs vllm; {rollout_vllm.INSTALL_HINT}")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        config = json.loads((path / "config.json").read_text())
        self.tokenizer = tokenizer
        # the project's one lookup, as HFBackend reads it (2048 where the config does not say)
        self.max_length = int(max_length or context_length(config) or 2048)
        self._cand_cache: dict = {}
        self._warned_truncation = False
        settings = dict(
            model=str(path.resolve()),
            skip_tokenizer_init=True,  # our tokenizer encodes, exactly as HFBackend's does
            generation_config="vllm",
            dtype=(config.get("dtype") or config.get("torch_dtype") or "auto") if dtype == "auto" else dtype,
            max_model_len=self.max_length,
            enable_prefix_caching=True,
            seed=0,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
        )
        key = "labeler:" + json.dumps(settings, sort_keys=True)
        if key not in rollout_vllm._ENGINES:
            rollout_vllm._configure_env()
            from vllm import LLM

            rollout_vllm._ENGINES[key] = LLM(**settings)
        self.llm = rollout_vllm._ENGINES[key]

    def _run(self, seqs: list[list[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=s) for s in seqs]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def candidate_logprobs(self, prompts: Sequence, candidates: Sequence[str]) -> torch.Tensor:
        """(N, K) float64: log P(candidate | prompt), the sum over a candidate's tokens."""
        from vllm import SamplingParams

        if not prompts:
            return torch.zeros((0, len(candidates)), dtype=torch.float64)
        cand, seqs = self.encode_for_candidates(prompts, candidates)
        # every distinct candidate prefix q (() first) and the tokens that may follow it
        nexts: dict[tuple, list[int]] = {}
        for c in cand:
            for j in range(len(c)):
                ids = nexts.setdefault(tuple(c[:j]), [])
                if c[j] not in ids:
                    ids.append(c[j])
        prefixes = list(nexts)
        requests, params = [], []
        for s in seqs:
            for q in prefixes:
                requests.append(s + list(q))
                params.append(
                    SamplingParams(
                        max_tokens=1, temperature=0.0, logprob_token_ids=nexts[q], detokenize=False
                    )
                )
        outputs = self._run(requests, params)
        out = torch.zeros((len(seqs), len(cand)), dtype=torch.float64)
        for i in range(len(seqs)):
            step = {}  # (prefix, next token) -> log-prob
            for q, o in zip(prefixes, outputs[i * len(prefixes) : (i + 1) * len(prefixes)]):
                logprobs = o.outputs[0].logprobs[0]
                for t in nexts[q]:
                    step[q, t] = float(logprobs[t].logprob)
            for k, c in enumerate(cand):
                out[i, k] = sum(step[tuple(c[:j]), c[j]] for j in range(len(c)))
        return out

    def generate(self, prompts: Sequence, *, max_new_tokens: int = 64) -> list[str]:
        """Greedy continuations (the chain-of-thought rationale), decoded without special tokens."""
        from vllm import SamplingParams

        seqs = [self.encode_prompt(p, self.max_length - max_new_tokens) for p in prompts]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=0.0,
            stop_token_ids=[eos] if eos is not None else None,
            detokenize=False,
        )
        texts = []
        for s, o in zip(seqs, self._run(seqs, params)):
            gen = list(o.outputs[0].token_ids)
            head = self._decode(s)  # decoded after its prompt, as HFBackend does (SentencePiece spaces)
            texts.append(self._decode(s + gen)[len(head) :])
        return texts
