"""``Strategy``: the one seam to DeepSpeed (the only module of rlaif_fast that imports it).

prepare -> backward -> step -> save / load, plus the few collectives the trainer needs. ZeRO 0-3 from
the config, or the user's DeepSpeed JSON (its keys win). Launch with ``torchrun`` or ``deepspeed``;
a plain ``python`` process gets a one-rank world set up here, because without RANK / WORLD_SIZE /
MASTER_ADDR DeepSpeed goes looking for MPI.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn


def check_shardable(module: nn.Module, stage: int, name: str = "policy") -> None:
    """ZeRO-3 partitions every parameter across ranks: refuse what it cannot partition, before compute."""
    if stage != 3:
        return
    for pname, p in module.named_parameters():
        if not p.is_floating_point():
            raise ValueError(
                f"zero_stage=3 cannot shard {name} parameter {pname!r} of dtype {p.dtype} (ZeRO-3 partitions "
                "floating-point parameters only, e.g. not int8-quantized weights); use zero_stage<=2"
            )
        if p.is_meta:
            raise ValueError(
                f"zero_stage=3 got {name} parameter {pname!r} on the meta device; materialize "
                "the model (or build it under deepspeed.zero.Init) before the trainer"
            )
    if hasattr(module, "ds_id") or any(hasattr(p, "ds_id") for p in module.parameters()):
        raise ValueError(f"{name} is already partitioned by DeepSpeed; pass the plain nn.Module")


def _load_all_but_frozen(src: dict, dst: nn.Module) -> None:
    """``dst.load_state_dict(src)`` where ``src`` may lack exactly the frozen parameters of ``dst``."""
    frozen = {n for n, p in dst.named_parameters(remove_duplicate=False) if not p.requires_grad}
    result = dst.load_state_dict(src, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint module state does not match the model: missing {missing[:5]}, unexpected "
            f"{sorted(result.unexpected_keys)[:5]}; resume with the model the run was started with"
        )


class Strategy:
    """Distributed setup and the DeepSpeed engine of one trainable module."""

    def __init__(self, config):
        self.config = config
        self._setup_env()
        import deepspeed

        self._ds = deepspeed
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.engine = None

    @staticmethod
    def _setup_env() -> None:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return  # launched by torchrun / deepspeed
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from rlaif_fast.feedback.server_process import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bf16_enabled(self) -> bool:
        if self.config.bf16 == "auto":
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return self.config.bf16 == "true"

    def engine_dtype(self) -> torch.dtype | None:
        """The dtype DeepSpeed casts the trained module to (None: it keeps its own). The user's DeepSpeed
        JSON wins over ``bf16=`` as it does in ``ds_config``, so its bf16 / fp16 sections decide when set."""
        user = {}
        if self.config.deepspeed_config is not None:
            with open(self.config.deepspeed_config) as f:
                user = json.load(f)
        if user.get("fp16", {}).get("enabled", False):
            return torch.float16
        bf16 = user["bf16"].get("enabled", False) if "bf16" in user else self.bf16_enabled()
        return torch.bfloat16 if bf16 else None

    def ds_config(self, micro_batch_size: int, grad_accum: int) -> dict:
        cfg = self.config
        out = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch_size * grad_accum * self.world_size,
            "gradient_clipping": cfg.max_grad_norm,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": self.bf16_enabled()},
            # our AdamW with two param groups (policy / value learning rates) is a client optimizer
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if cfg.deepspeed_config is not None:
            with open(cfg.deepspeed_config) as f:
                user = json.load(f)
            for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
                if key in user and user[key] != out[key]:
                    raise ValueError(
                        f"{cfg.deepspeed_config} sets {key}={user[key]} but the RLAIFConfig sizes "
                        f"give {out[key]}; drop it from the JSON (the trainer derives it)"
                    )
            out.update(user)
        return out

    def prepare(
        self,
        module: nn.Module,
        param_groups: list[dict],
        micro_batch_size: int,
        grad_accum: int,
        optimizer: str | None = None,
    ):
        """The DeepSpeed engine of ``module``; ``optimizer`` ('adamw', 'sgd', 'adafactor') overrides the
        config's (the reward model picks its own)."""
        stage = self.ds_config(micro_batch_size, grad_accum)["zero_optimization"].get("stage", 0)
        check_shardable(module, stage)
        module.to(self.device)
        optimizer = self.build_optimizer(param_groups, optimizer or self.config.optimizer)
        config = self.ds_config(micro_batch_size, grad_accum)
        self.engine, *_ = self._ds.initialize(model=module, optimizer=optimizer, config=config)
        return self.engine

    def build_optimizer(self, param_groups: list[dict], name: str):
        """A client optimizer: torch AdamW / SGD, or transformers' Adafactor with the given learning rates
        (no relative step, no parameter scaling: the learning rate means what it says, as in the paper)."""
        wd = self.config.weight_decay
        if name == "sgd":
            return torch.optim.SGD(param_groups, weight_decay=wd)
        if name == "adafactor":
            from transformers.optimization import Adafactor

            lr = param_groups[0]["lr"]
            return Adafactor(
                param_groups,
                lr=lr,
                scale_parameter=False,
                relative_step=False,
                warmup_init=False,
                weight_decay=wd,
            )
        if name != "adamw":
            raise ValueError(f"optimizer={name!r}; use 'adamw', 'sgd' or 'adafactor'")
        try:  # one fused kernel per step (CPU and CUDA): 0.05 vs 0.13-0.35 CPU-s a step here (results/vs_trl.md)
            return torch.optim.AdamW(param_groups, weight_decay=wd, fused=True)
        except (RuntimeError, ValueError):  # a parameter the fused kernel does not take (dtype, device)
            return torch.optim.AdamW(param_groups, weight_decay=wd)

    def prepare_frozen(self, module: nn.Module, micro_batch_size: int) -> nn.Module:
        """A frozen model (the KL reference) for forward passes only. Under ZeRO-3 it is sharded like
        the policy (an optimizer-free engine, as OpenRLHF does for its reference), so a model that
        needs ZeRO-3 to fit is not copied whole onto every rank; otherwise it just moves to the device."""
        module.eval().requires_grad_(False)
        if self.zero_stage != 3:
            # the dtype the engine gives the policy (DeepSpeed casts it to bf16 when enabled), so that the
            # policy and the reference compute alike: their KL is exactly 0 before the first update
            return module.to(device=self.device, dtype=self.engine_dtype())
        check_shardable(module, 3)
        config = self.ds_config(micro_batch_size, 1)
        config = {
            k: v for k, v in config.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")
        }
        engine, *_ = self._ds.initialize(model=module.to(self.device), config=config)
        return engine

    @property
    def zero_stage(self) -> int:
        """The engine's stage; before it exists, the one it will get (the DeepSpeed JSON's when it sets one)."""
        if self.engine is not None:
            return self.engine.zero_optimization_stage()
        if self.config.deepspeed_config is not None:
            with open(self.config.deepspeed_config) as f:
                user = json.load(f)
            if "zero_optimization" in user:  # it replaces the derived section whole (ds_config)
                return int(user["zero_optimization"].get("stage", 0))
        return self.config.zero_stage

    def register_external(self, module: nn.Module, params: list[nn.Parameter]) -> None:
        """ZeRO-3: gather ``params`` for every forward of ``module`` though another module owns them."""
        if self.zero_stage == 3:
            for p in params:
                self._ds.zero.register_external_parameter(module, p)

    @property
    def grad_accum(self) -> int:
        """What the engine divides each micro-batch loss by (its gradient_accumulation_steps)."""
        return self.engine.gradient_accumulation_steps()

    def set_boundary(self, is_last: bool) -> None:
        """Mark the coming forward/backward as the last of the mini-batch (or not), before its forward.

        The trainer owns the accumulation boundary: with a token budget the number of micro-batches per
        optimizer step varies, which DeepSpeed's fixed gradient_accumulation_steps counter cannot follow.
        """
        self.engine.set_gradient_accumulation_boundary(is_last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def gathered(self, module: nn.Module):
        """Context with full parameters (ZeRO-3 keeps only a shard per rank between forwards)."""
        if self.zero_stage == 3:
            return self._ds.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        import contextlib

        return contextlib.nullcontext()

    # ---- collectives ----------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or ``op='max'``) of ``t`` over ranks; ``t`` itself is left untouched."""
        if op not in ("sum", "max"):
            raise ValueError(f"op={op!r}; all_reduce takes 'sum' or 'max'")
        if self.world_size == 1:
            return t
        # on the engine's device (NCCL reduces CUDA tensors only), back where the caller had it
        out = t.to(self.device, copy=True)
        reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(out, op=reduce_op)
        return out.to(t.device)

    def close(self) -> None:
        """Tear the process group down in order (all ranks done, then destroyed). Left to interpreter
        exit, a gloo rank was once seen to abort ("terminate called without an active exception") after
        a finished job, which a launcher then reports as a failure."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            # a vLLM rollout engine tears down its groups and the default one at shutdown, and fails when
            # the default group is already gone: shut it down first (only if one was ever started)
            vllm_engines = sys.modules.get("rlaif_fast.trainer.rollout_vllm")
            if vllm_engines is not None:
                vllm_engines.shutdown_engines()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_gather_object(self, obj) -> list:
        """[rank 0's obj, rank 1's obj, ...] on every rank (pickled; CPU tensors inside are fine)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        box = [obj]
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    # ---- checkpoints ----------------------------------------------------------------------------
    def release_gathered(self) -> None:
        """ZeRO-3: partition again every parameter DeepSpeed left whole after the last forward / backward
        (its prefetcher keeps parameters it expects to reuse soon: after an update, measured, all of them),
        so this rank holds its shard only, e.g. before a vLLM weight sync and sampling. No-op below 3."""
        if self.engine is not None and self.zero_stage == 3:
            self.engine.empty_partition_cache()

    def save(self, folder: str, client_state: dict, exclude_frozen: bool = False) -> None:
        """Engine state (ZeRO-partitioned model + optimizer) into ``folder``; every rank writes its shard.
        ``exclude_frozen``: the frozen parameters (LoRA's base weights) are left out (checkpoint.py)."""
        self.engine.save_checkpoint(
            folder,
            tag="state",
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=exclude_frozen,
        )

    def load(self, folder: str, frozen_excluded: bool = False) -> dict:
        """The engine state of ``folder``; ``frozen_excluded``: it was saved without the frozen parameters,
        which the module keeps (any other key missing from the checkpoint is an error)."""
        _, client_state = self.engine.load_checkpoint(
            folder,
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=_load_all_but_frozen if frozen_excluded else None,
        )
        if client_state is None:
            raise FileNotFoundError(
                f"no DeepSpeed state in {folder}/state; is this an rlaif_fast checkpoint?"
            )
        return client_state
