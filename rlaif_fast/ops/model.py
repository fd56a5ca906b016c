"""Response log-probs of any transformers causal LM without its [B, T, V] logits.

``model(...).logits`` materializes B·T·V values (2.5 GB at 8192 tokens and V = 152064 in bf16) only for
log_softmax to keep one of them per token. Here the backbone runs alone, its last hidden states of the
response positions go straight to ``linear_token_logprobs`` with the output embedding, and the logits
only ever exist tile by tile.
"""

from __future__ import annotations

import torch

from rlaif_fast import _checks
from rlaif_fast.ops.linear import linear_token_logprobs


def _backbone(model):
    """The module that returns hidden states: get_decoder() (transformers 5), else base_model."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(
            f"{type(model).__name__} has no separate backbone (get_decoder() / base_model); pass a "
            "transformers *ForCausalLM model such as GPT2LMHeadModel or LlamaForCausalLM"
        )
    return base


def context_length(config) -> int | None:
    """The one lookup of the longest sequence a model's positions allow (its config, a dict of it, or a
    vision-language model's text config), or None when the config does not say (ALiBi, RWKV...)."""
    if isinstance(config, dict):
        config = config.get("text_config") or config
        get = config.get
    else:
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()  # Qwen2-VL, Gemma-3: the positions are the language model's
        get = lambda name: getattr(config, name, None)  # noqa: E731
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def head_transform(config) -> dict:
    """The one table of logit transforms some architectures apply after lm_head (used by the policy's
    log-probs, the TRL patch and the labeler's HFBackend), as linear_token_logprobs knobs:
    Gemma's final soft-cap; a multiplier before it (Cohere ``logit_scale``, ``output_multiplier``,
    Falcon-H1 ``lm_head_multiplier``); Granite / MiniCPM3 divide by ``logits_scaling`` (HyperCLOVA X
    multiplies by it)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()  # vision-language models: the language model's config
    knobs = {}
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        knobs["softcap"] = float(cap)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, name, None) is not None:
            scale = float(getattr(config, name))
            break
    divide = getattr(config, "logits_scaling", None)
    if scale is None and divide is not None:
        scale = float(divide) if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / float(divide)
    if scale is not None and scale != 1.0:
        knobs["logit_scale"] = scale
    return knobs


def apply_head_transform(logits: torch.Tensor, knobs: dict) -> torch.Tensor:
    """``logits`` (the plain h @ W.T + b) as the model's own forward returns them: scaled, then soft-capped
    (the order of linear_token_logprobs and of the architectures above)."""
    if "logit_scale" in knobs:
        logits = logits * knobs["logit_scale"]
    if "softcap" in knobs:
        logits = torch.tanh(logits / knobs["softcap"]) * knobs["softcap"]
    return logits


def _check(input_ids, attention_mask, response_mask, position_ids):
    _checks.check_int("input_ids", input_ids)
    _checks.check_tensor("input_ids", input_ids, ndim=2)
    for name, x in (("attention_mask", attention_mask), ("response_mask", response_mask),
                    ("position_ids", position_ids)):  # fmt: skip
        if x is None:
            continue
        _checks.check_tensor(name, x)
        if x.shape != input_ids.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but input_ids has shape {tuple(input_ids.shape)}; "
                "they must match (B, T)"
            )
    _checks.check_same_device(input_ids=input_ids, attention_mask=attention_mask,
                              response_mask=response_mask, position_ids=position_ids)  # fmt: skip


def model_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    position_ids: torch.Tensor | None = None,
):
    """log π(x_t | x_<t) of the response tokens of a transformers causal LM, and optionally the entropy
    of π(· | x_<t), computed from hidden states without materializing the [B, T, V] logits.

    input_ids, attention_mask, response_mask (and position_ids): (B, T). Returns logp (B, T) fp32
    aligned with the tokens (logp[:, t] scores input_ids[:, t]; logp[:, 0] = 0), zero where
    ``response_mask`` is 0; with ``return_entropy``, (logp, entropy), entropy (B, T) likewise.

    Padding: left or right; position ids come from the attention mask (cumsum − 1), as generate does.
    Packed inputs (several sequences per row, no padding): pass ``position_ids`` restarting at 0 for
    each sequence; the attention mask is then ignored and transformers builds the block-diagonal causal
    mask from the position ids. The response mask must be 0 on the first token of every packed
    sequence (it has no context there). Works for tied and untied output embeddings, with a bias if
    the head has one, and applies Gemma's final soft-cap and Cohere / Granite logit scaling.
    Selecting the response rows costs one host sync (a boolean index).
    """
    _check(input_ids, attention_mask, response_mask, position_ids)
    hidden = backbone_hidden(model, input_ids, attention_mask, position_ids)  # (B, T, H)
    B, T = input_ids.shape
    sel = response_mask[:, 1:] != 0  # (B, T-1): position t-1 predicts token t
    res = hidden_logprobs(
        model,
        hidden[:, :-1][sel],
        input_ids[:, 1:][sel],
        temperature=temperature,
        return_entropy=return_entropy,
    )  # (M,) each
    vals = res if return_entropy else (res,)
    first = hidden.new_zeros(B, 1, dtype=vals[0].dtype)  # token 0 has no context
    # masked_scatter is differentiable: gradients flow back to the selected rows only
    outs = [torch.cat([first, first.new_zeros(B, T - 1).masked_scatter(sel, v)], dim=1) for v in vals]
    return tuple(outs) if return_entropy else outs[0]


def backbone_hidden(model, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """The last hidden states (B, T, H) of a causal LM's backbone (no lm_head, no KV cache), with the
    position rules of ``model_logprobs``: from the attention mask, or packed rows from ``position_ids``."""
    if position_ids is None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # left padding: real tokens start at 0 after the pads, as in generate
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        mask_arg = attention_mask
    else:
        mask_arg = None  # packed: transformers derives the per-sequence causal mask from position ids
    out = _backbone(model)(
        input_ids=input_ids, attention_mask=mask_arg, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(weight (V, H), bias (V,) or None, logit-transform knobs) of a causal LM's output embedding."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__}.get_output_embeddings() has no weight; pass a causal LM")
    return head.weight, getattr(head, "bias", None), head_transform(model.config)


def hidden_logprobs(model, hidden: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                    return_entropy: bool = False):  # fmt: skip
    """``linear_token_logprobs`` of hidden states (..., H) through ``model``'s output head and logit
    transforms (the head's dtype wins: an fp32 head over a bf16 backbone reads fp32 hidden states)."""
    weight, bias, knobs = output_head(model)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return linear_token_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy, **knobs
    )
