"""LoRA through peft: adapters on the policy, the base model as the KL reference (no second copy).

``apply_lora(policy, cfg.lora)`` wraps the policy in a ``peft.PeftModel``: the base weights are frozen,
only the adapters train (the optimizer receives the parameters that require grad). The reference policy
of the KL penalty is the very same module with its adapters disabled (``PeftModel.disable_adapter``,
see ``update.ActorCritic.forward(reference=True)``), so no frozen copy of the model is held in memory.
Saving writes the adapters (``save_pretrained``) or, with ``merged=True``, a plain transformers model
with the adapters folded into the weights (``merged_state_dict``), which any tool loads without peft.
"""

from __future__ import annotations

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


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (W + scale * B @ A), under the base
    model's own parameter names; ``model`` is left as it was."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    lora_modules = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        owner = next(
            (m for prefix, m in lora_modules.items() if name.startswith(prefix + ".base_layer.")), None
        )
        key = name.replace(".base_layer.", ".")
        if owner is not None and name.endswith("base_layer.weight"):
            tensor = tensor.clone()
            for adapter in owner.active_adapters:
                if adapter in owner.lora_A:
                    tensor += owner.get_delta_weight(adapter).to(tensor.dtype)
        out[key] = tensor.detach().clone()
    return out


def save_merged(model, path) -> None:
    """A transformers model with the adapters folded in, loadable with ``from_pretrained`` (no peft)."""
    base = model.get_base_model()
    base.save_pretrained(str(path), state_dict=merged_state_dict(model), safe_serialization=True)
