"""LoRA through peft: adapters on the policy, the base model as the KL reference (no second copy).

``apply_lora(policy, cfg.lora)`` wraps the policy in a ``peft.PeftModel``: the base weights are frozen,
only the adapters train (the optimizer receives the parameters that require grad). The reference policy
of the KL penalty is the very same module with its adapters disabled (``PeftModel.disable_adapter``,
see ``update.ActorCritic.forward(reference=True)``), so no frozen copy of the model is held in memory.
Saving writes the adapters (``save_pretrained``) or, with ``merged=True``, a plain transformers model
with the adapters folded into the weights (``merged_state_dict``), which any tool loads without peft.
With ``rollout_engine="vllm"`` every weight sync streams the merged weights into the engine
(``merged_named_weights``: one layer at a time, under the base model's names, the training model untouched),
so the engine samples from the adapted policy without knowing about adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def _check_targets(policy, targets) -> None:
    """Every target module name must match some module of the policy (peft only says it found none)."""
    if targets is None:
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in policy.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in policy.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ValueError(
            f"lora['target_modules'] names {missing}, which {type(policy).__name__} has no module called; "
            f"its linear layers are {linear}"
        )


def apply_lora(policy, lora: dict):
    """The policy with LoRA adapters (a ``peft.PeftModel``); raises ValueError naming ``lora`` first."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ValueError(f"lora={lora!r} needs peft: pip install peft") from err
    if is_lora(policy):
        raise ValueError("lora is set but the policy already holds peft adapters; pass the base model")
    targets = lora.get("target_modules")
    _check_targets(policy, targets)
    r = int(lora["r"])
    config = LoraConfig(
        r=r,
        lora_alpha=float(lora.get("alpha", 2 * r)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(targets) if targets is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(policy, config)
    except ValueError as err:  # e.g. no default targets for an unknown architecture
        raise ValueError(f"lora={lora!r}: peft could not add adapters ({err}); set target_modules") from err


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _lora_owners(base) -> dict:
    """``{"<module>.base_layer.weight": the peft LoRA layer}`` of ``base`` (the peft model's base model)."""
    from peft.tuners.lora import LoraLayer

    return {f"{n}.base_layer.weight": m for n, m in base.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (W + scale * B @ A), under the base
    model's own parameter names; ``model`` is left as it was."""
    base = model.get_base_model()
    owners = _lora_owners(base)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        owner = owners.get(name)
        key = name.replace(".base_layer.", ".")
        out[key] = tensor.detach().clone() if owner is None else _merged_weight(owner, tensor)
    return out


def _merged_weight(owner, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (the base layer's) plus every active adapter's scale * B @ A, summed in fp32 and rounded
    to the weight's dtype once: what the adapted layer computes, as one matrix. A new tensor."""
    if owner.merged or owner.disable_adapters:  # already folded in, or the forward skips the adapters
        return weight.detach().clone()
    out = weight.detach().float()
    for adapter in owner.active_adapters:
        if adapter not in owner.lora_A:
            continue
        if owner.use_dora.get(adapter, False):
            raise ValueError(f"adapter {adapter!r} uses DoRA; merged weights support plain LoRA only")
        if isinstance(owner.get_base_layer(), torch.nn.Linear):
            a, b = owner.lora_A[adapter].weight.float(), owner.lora_B[adapter].weight.float()
            delta = (b @ a) * owner.scaling[adapter]
            out = out + (delta.T if owner.fan_in_fan_out else delta)
        else:  # other layer kinds: peft's own formula
            out = out + owner.get_delta_weight(adapter).float()
    return out.to(weight.dtype)


def merged_named_weights(
    model, gather: Callable[[list], contextlib.AbstractContextManager] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter of the base model, adapters folded in, one at a time.

    Names are the base model's own (``model.layers.0.self_attn.q_proj.weight``: peft's ``base_layer.``
    dropped), as an inference engine or ``from_pretrained`` expects; no ``lora_A`` / ``lora_B`` tensor is
    yielded. The training model is never modified (no merge_adapter / unmerge_adapter round trip, whose
    W + d - d does not give W back bit for bit): each merged weight is a new tensor, so at most one
    layer's extra copy exists at a time. ``gather(params)`` is entered around each tensor's computation
    (ZeRO-3: ``GatheredParameters`` of one module, base weight and adapters together; every rank must
    iterate in step). The tensor is yielded inside it, as ``VLLMRolloutEngine`` streams plain weights."""
    gather = gather or (lambda params: contextlib.nullcontext())
    base = model.get_base_model()
    owners = _lora_owners(base)
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        if ".modules_to_save." in name or ".original_module." in name:
            raise ValueError(
                f"{name}: peft modules_to_save are not supported by the merged weights; train those "
                "modules with adapters (target_modules) instead"
            )
        key = name.replace(".base_layer.", ".")
        owner = owners.get(name)
        if owner is None:
            with gather([param]):
                yield key, param.detach().clone()
        else:
            with gather(list(owner.parameters())):
                yield key, _merged_weight(owner, param)


def save_merged(model, path) -> None:
    """A transformers model with the adapters folded in, loadable with ``from_pretrained`` (no peft)."""
    base = model.get_base_model()
    base.save_pretrained(str(path), state_dict=merged_state_dict(model), safe_serialization=True)
