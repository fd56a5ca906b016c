"""Padding-free micro-batches: every rollout of a micro-batch end to end in one row, no pad token.

Layout (``packed_batch``): ``rlaif_fast.batching.pack_rollouts`` lays ``prompt_i + response_i`` one
after the other in a (1, total) row, position ids restarting at 0 for each sequence. transformers (5.x)
reads a restart of the position ids, with ``attention_mask=None``, as the start of a new sequence and
builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``; flash-attention
turns the same position ids into ``cu_seqlens``), so attention stays inside each rollout. The
per-token results are then read back in the trainer's response layout (b, L) through ``resp_index``,
which here holds *flat* columns of the packed row, so everything downstream of the forward (losses,
KL, advantages) is the padded path's code.

Which attention implementations keep packed sequences apart: ``sdpa``, ``eager``, ``flex_attention``
(the mask built from the position ids) and ``flash_attention_2`` / ``flash_attention_3`` (varlen from
the position ids). Anything else (a custom kernel, a model whose forward ignores position ids or builds
its own mask) is refused, and so is a model that fails a small probe: two sequences scored packed and
apart must give the same hidden states (a leak across the boundary changes the second one).
"""

from __future__ import annotations

import inspect

import torch

from rlaif_fast.trainer.batches import TrainBatch
from rlaif_fast.trainer.sampling import Rollouts

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # packed cost = sum of per-sequence costs
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def packed_batch(rollouts: Rollouts, chunk: list[int]) -> TrainBatch:
    """Rows ``chunk`` of ``rollouts`` as one packed row (1, sum of their lengths)."""
    from rlaif_fast.batching import pack_rollouts

    p = [rollouts.prompt_ids[i] for i in chunk]
    r = [rollouts.response_ids[i] for i in chunk]
    packed = pack_rollouts(p, r)
    total = packed.input_ids.shape[1]
    longest = max(max(len(x) for x in r), 1)
    j = torch.arange(longest)
    starts = packed.cu_seqlens[:-1].long() + torch.tensor([len(x) for x in p])  # first response column
    resp_len = torch.tensor([len(x) for x in r])
    resp_index = (starts[:, None] + j[None, :]).clamp(max=total - 1)  # (b, L) flat columns
    resp_mask = (j[None, :] < resp_len[:, None]).float()
    return TrainBatch(
        packed.input_ids.long(),
        torch.ones_like(packed.input_ids, dtype=torch.long),
        packed.response_mask.long(),
        resp_index,
        resp_mask,
        list(chunk),
        position_ids=packed.position_ids.long(),
    )


def _attention_name(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def _sharded(model) -> bool:
    """Weights not materialized here (ZeRO-3 partitions, meta tensors): the probe cannot run."""
    return any(hasattr(p, "ds_id") or p.device.type == "meta" for p in model.parameters())


@torch.no_grad()
def _probe(backbone) -> float:
    """max |hidden(packed) - hidden(apart)| of two short sequences scored both ways."""
    first, second = torch.tensor([[1, 2, 3]]), torch.tensor([[3, 2, 1, 1]])
    vocab = backbone.get_input_embeddings().num_embeddings
    first, second = first % vocab, second % vocab
    device = next(backbone.parameters()).device
    ids = torch.cat([first, second], 1).to(device)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
    was = backbone.training
    backbone.eval()
    try:
        packed = backbone(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False)[0]
        apart = backbone(input_ids=second.to(device), use_cache=False)[0]
    finally:
        backbone.train(was)
    return float((packed[:, 3:].float() - apart.float()).abs().max())


def check_packing(model, role: str) -> None:
    """Raise ValueError naming ``packing`` when ``model`` (the policy or the value model's trunk) cannot
    keep packed sequences apart."""
    name = _attention_name(model)
    if name is not None and name not in PACKING_ATTENTION:
        raise ValueError(
            f"packing=True but the {role} uses attn_implementation={name!r}, which cannot keep packed "
            f"sequences apart; load it with one of {PACKING_ATTENTION} or set packing=False"
        )
    forward = inspect.signature(model.forward).parameters
    if "position_ids" not in forward and not any(p.kind == p.VAR_KEYWORD for p in forward.values()):
        raise ValueError(
            f"packing=True but {type(model).__name__}.forward (the {role}) takes no position_ids, which "
            "packed sequences need; set packing=False"
        )
    if _sharded(model):
        return
    try:
        leak = _probe(model)
    except Exception as err:  # noqa: BLE001 - re-raised with the key to change
        raise ValueError(
            f"packing=True but the {role} ({type(model).__name__}) failed a packed forward ({err}); "
            "set packing=False"
        ) from err
    if not leak <= 1e-4:
        raise ValueError(
            f"packing=True but the {role} ({type(model).__name__}, attn_implementation={name!r}) lets "
            f"attention cross packed sequences (hidden states differ by {leak:.2e}); load it with one of "
            f"{PACKING_ATTENTION} or set packing=False"
        )


def backbone_of(model):
    """The transformer trunk that takes (input_ids, position_ids) and returns hidden states."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model and hasattr(base, "get_input_embeddings"):
        # a PeftModel's base_model is the LoraModel around the whole causal LM: go one level further
        inner = getattr(base, "model", None)
        if inner is not None and hasattr(inner, "base_model") and inner.base_model is not inner:
            return inner.base_model
        return base
    return model


def resolve_packing(cfg, policy, value_model) -> bool:
    """Whether this run packs: ``packing=True`` requires it (raising when a model cannot), ``None`` packs
    when the policy runs flash-attention (varlen: no work across sequences), every model can keep
    packed sequences apart and ``ops='fast'``; ``False`` never does."""
    if cfg.packing is False or (cfg.packing is None and cfg.ops != "fast"):
        return False
    if cfg.packing is None and _attention_name(backbone_of(policy)) not in VARLEN_ATTENTION:
        # sdpa / eager / flex score a packed row as one (T, T) masked attention: sum(n)^2 instead of
        # sum(n^2) work, slower than padding beyond a few rollouts per row (benchmarks/results/vs_trl.md)
        return False
    models = [("policy", backbone_of(policy))]
    if value_model is not None and hasattr(value_model, "backbone"):  # a ValueHead reads the policy's trunk
        models.append(("value model", value_model.backbone))
    try:
        for role, model in models:
            check_packing(model, role)
    except ValueError:
        if cfg.packing is None:  # auto: fall back to padded micro-batches
            return False
        raise
    return True
