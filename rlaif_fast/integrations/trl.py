"""Drop-in acceleration for TRL: ``patch()`` swaps TRL's log-prob helpers for rlaif_fast's ops,
``unpatch()`` puts the originals back. Written against trl 1.16.

What ``patch()`` replaces, in ``trl.trainer.utils`` and in every already-imported ``trl.*`` module
holding the same function object (``from .utils import name`` copies the function into the importing
module, so patching ``trl.trainer.utils`` alone would miss trainers imported before the patch):

- ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``
  -> ``rlaif_fast.ops.token_logprobs`` (one pass over the logits, fp32 inside). An ``index`` of shape
  (..., K) (top-K gathers) is passed to TRL's original.
- ``entropy_from_logits(logits, chunk_size=128)`` -> ``token_logprobs(..., return_entropy=True)``.
- ``selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
  row_mask=None)`` -> the same single pass for both outputs.
- ``add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",))``
  -> a forward whose ``fused_lm_head=True`` path runs ``rlaif_fast.ops.linear_token_logprobs`` (log-probs
  and entropy from hidden states; GRPO / RLOO / KTO call this). Requests for the other outputs
  (log_sum_sq_probs, mean_logits, is_top1), and MoE models that report router logits, go to TRL's
  original, with a warning.

Outputs keep TRL's dtypes (log-probs of bf16 logits come back in bf16, as TRL returns them), so
downstream code sees no difference but speed and memory. Modules imported after ``patch()`` pick the
replacements up from ``trl.trainer.utils``; ``unpatch()`` restores those too. Not replaced:
``trl.kernels`` (TRL's own CUDA kernels, reached only through the functions above).
"""

from __future__ import annotations

import functools
import sys
import types
import warnings

import torch

_UTILS = "trl.trainer.utils"
_NAMES = (
    "selective_log_softmax",
    "entropy_from_logits",
    "selective_log_softmax_and_entropy",
    "add_fused_lm_head",
)
_ORIGINALS: dict[str, object] = {}  # name -> TRL's function, while patched
_REPLACEMENTS: dict[str, object] = {}  # name -> ours, while patched


def _keep_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == like.dtype else x.to(like.dtype)


def _masked_labels(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    return index if row_mask is None else index.masked_fill(row_mask == 0, -100)


def _selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    from rlaif_fast.ops import token_logprobs

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if index.dim() != logits.dim() - 1:  # (..., K) top-K gathers: not a per-token op, TRL's own code
        return _ORIGINALS["selective_log_softmax"](logits, index, temperature=temperature, row_mask=row_mask)
    logp = token_logprobs(logits, _masked_labels(index, row_mask), temperature=temperature)
    return _keep_dtype(logp, logits)


def _entropy_from_logits(logits, chunk_size=128):
    from rlaif_fast.ops import token_logprobs

    # chunk_size is moot: one pass over the logits, O(1) extra memory per row
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = token_logprobs(logits, labels, return_entropy=True)
    return _keep_dtype(entropy, logits)


def _selective_log_softmax_and_entropy(
    logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None
):
    from rlaif_fast.ops import token_logprobs

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logp, entropy = token_logprobs(
        logits, _masked_labels(index, row_mask), temperature=temperature, return_entropy=True
    )
    if not entropy_requires_grad:
        entropy = entropy.detach()
    return _keep_dtype(logp, logits), _keep_dtype(entropy, logits)


def _add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    text_config = model.config.get_text_config()
    unsupported = sorted(set(outputs) - {"log_probs", "entropy"})
    if unsupported or getattr(text_config, "output_router_logits", False):
        why = f"outputs {unsupported}" if unsupported else "router logits (MoE aux loss)"
        warnings.warn(
            f"rlaif_fast: add_fused_lm_head with {why} is not accelerated; using TRL's", stacklevel=2
        )
        return _ORIGINALS["add_fused_lm_head"](model, temperature, cast_lm_head_to_fp32, outputs)
    original_forward = model.forward
    want_entropy = "entropy" in outputs

    # generate() validates its kwargs against the forward's signature: keep the model's
    @functools.wraps(type(model).forward)
    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw
    ):
        if not fused_lm_head:
            extra = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return original_forward(*args, **kw, **{k: v for k, v in extra.items() if v is not None})
        return _fused_forward(self, args, kw, labels, shift_labels, num_items_in_batch, temperature,
                              cast_lm_head_to_fp32, want_entropy)  # fmt: skip

    model.forward = types.MethodType(forward, model)


def _trl_backbone(model):
    """The backbone TRL's fused head runs: ``base_model`` (``model`` for a vision-language model before
    transformers 5). Not get_decoder(): for a vision-language model that is the text decoder alone, which
    drops pixel_values and the multimodal position ids."""
    import transformers
    from packaging.version import Version

    multimodal = model.config.get_text_config() is not model.config
    if multimodal and Version(transformers.__version__) < Version("5.0.0"):
        return model.model
    return model.base_model


def _fused_forward(
    model, args, kw, labels, shift_labels, num_items_in_batch, temperature, to_fp32, want_entropy
):
    """Backbone, then log-probs (and entropy) of the labelled positions from hidden states."""
    from trl.trainer.utils import FusedCausalLMOutput

    from rlaif_fast.ops.linear import linear_token_logprobs
    from rlaif_fast.ops.model import head_transform

    kw["use_cache"] = False
    hidden = _trl_backbone(model)(*args, **kw).last_hidden_state  # (B, T, H)
    if shift_labels is None:  # position t predicts token t + 1
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:  # already shifted (context / sequence parallel)
        labels = shift_labels
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias if hasattr(head, "bias") else None
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    mask = labels != -100  # (B, T')
    h = hidden[mask]  # (M, H): only labelled positions are projected
    if to_fp32:
        h, weight = h.float(), weight.float()
        bias = bias.float() if bias is not None else None
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    res = linear_token_logprobs(
        h, weight, labels[mask], bias=bias, temperature=temperature, return_entropy=want_entropy,
        **head_transform(model.config),
    )  # fmt: skip
    vals = res if want_entropy else (res,)
    # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero, not an error)
    full = [v.new_zeros(mask.shape).masked_scatter(mask, v) for v in vals]
    log_probs = full[0]
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count, log_probs=log_probs, entropy=full[1] if want_entropy else None,
        label_mask=mask,
    )  # fmt: skip


_OURS = {
    "selective_log_softmax": _selective_log_softmax,
    "entropy_from_logits": _entropy_from_logits,
    "selective_log_softmax_and_entropy": _selective_log_softmax_and_entropy,
    "add_fused_lm_head": _add_fused_lm_head,
}


def _trl_modules():
    return [
        m
        for name, m in list(sys.modules.items())
        if m is not None and (name == "trl" or name.startswith("trl."))
    ]


def _swap(mapping: dict[int, object]) -> None:
    """In every loaded trl module, replace each attribute whose id is a key of ``mapping``."""
    for mod in _trl_modules():
        for attr, value in list(vars(mod).items()):
            new = mapping.get(id(value))
            if new is not None:
                setattr(mod, attr, new)


def patch() -> bool:
    """Replace TRL's log-prob helpers with rlaif_fast's (see the module docstring). Idempotent.

    Returns True when patched (now or before), False, with a warning, when trl is not installed or
    none of the names exists in ``trl.trainer.utils`` (a TRL version that moved them).
    """
    if _ORIGINALS:
        return True
    try:
        import importlib

        utils = importlib.import_module(_UTILS)
    except ImportError as exc:
        warnings.warn(f"rlaif_fast.integrations.trl.patch(): trl is not importable ({exc}); nothing patched",
                      stacklevel=2)  # fmt: skip
        return False
    found = {n: getattr(utils, n) for n in _NAMES if callable(getattr(utils, n, None))}
    missing = [n for n in _NAMES if n not in found]
    if not found:
        warnings.warn(f"rlaif_fast.integrations.trl.patch(): {_UTILS} has none of {_NAMES} (moved in this "
                      "trl version?); nothing patched", stacklevel=2)  # fmt: skip
        return False
    if missing:
        warnings.warn(f"rlaif_fast.integrations.trl.patch(): {_UTILS} lacks {missing}; patching the rest",
                      stacklevel=2)  # fmt: skip
    _ORIGINALS.update(found)
    _REPLACEMENTS.update({n: _OURS[n] for n in found})
    _swap({id(_ORIGINALS[n]): _REPLACEMENTS[n] for n in found})
    return True


def unpatch() -> bool:
    """Put TRL's originals back everywhere ours were placed (including modules imported since).

    Returns True when something was restored, False when not patched.
    """
    if not _ORIGINALS:
        return False
    _swap({id(_REPLACEMENTS[n]): _ORIGINALS[n] for n in _REPLACEMENTS})
    _ORIGINALS.clear()
    _REPLACEMENTS.clear()
    return True


def is_patched() -> bool:
    return bool(_ORIGINALS)
