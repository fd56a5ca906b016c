"""Where a run's models come from: the policy (a saved HF folder) and the AI labeler.

The labeler is one backend (the demo's tiny LM, a local HF model or an OpenAI-compatible endpoint)
wrapped as a ``PairwiseLabeler`` (pairwise soft labels, win rates) and, for d-RLAIF, a ``ScoreLabeler``
over the same backend and template.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch


def cache_dir() -> Path:
    """Where the demo labeler is cached: $RLAIF_FAST_CACHE, else ~/.cache/rlaif_fast."""
    return Path(os.environ.get("RLAIF_FAST_CACHE", Path.home() / ".cache" / "rlaif_fast"))


def load_policy(path: str | Path, device=None):
    """A saved causal LM in eval mode, on ``device`` when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return model.to(device) if device is not None else model


def labeler_url(spec: str) -> str:
    """``http://host:port`` as given, or the URL after the ``http:`` prefix (``http:https://host``)."""
    rest = spec.partition(":")[2]
    return rest if rest.startswith(("http://", "https://")) else spec


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_labeler(cfg, tokenizer, *, progress: bool, device=None, sft_dir=None):
    """``PairwiseLabeler`` over the backend ``cfg.labeler`` names (``demo``, ``hf:PATH`` or ``http:URL``).

    The demo labeler is trained on the template's pairwise prompt and, when the template has one, on its
    score prompt too, so the same model serves ``feedback: direct``.
    """
    from rlaif_fast.feedback import HFBackend, OpenAICompatibleBackend, PairwiseLabeler, load_template

    template = load_template(cfg.template)
    kind, _, where = cfg.labeler.partition(":")
    if cfg.labeler == "demo":
        from rlaif_fast.pipeline.labeler_model import load_or_train_labeler

        model, _ = load_or_train_labeler(
            template.render_pairwise,
            tokenizer,
            cache_dir(),
            dim=cfg.policy_dim,
            steps=cfg.labeler_steps,
            seed=cfg.seed,
            progress=progress,
            render_score=template.render_score if template.score_sample else None,
        )
        backend = HFBackend(model, tokenizer, batch_size=64, device=device)
    elif cfg.labeler == "sft":  # the same-size setting: the SFT checkpoint (saved with its tokenizer) labels
        backend = HFBackend(str(sft_dir), device=device)
    elif kind == "hf":
        backend = HFBackend(where, device=device)
    else:
        backend = OpenAICompatibleBackend(labeler_url(cfg.labeler), cfg.labeler_model)
    return PairwiseLabeler(
        backend,
        template,
        chain_of_thought=getattr(cfg, "chain_of_thought", False),
        max_rationale_tokens=getattr(cfg, "rationale_tokens", 512),
    )


def harmless_labeler(pairwise, template: str):
    """The harmless-rate judge: a ``ScoreLabeler`` over the labeler's backend with a harmlessness template."""
    from rlaif_fast.feedback import ScoreLabeler

    return ScoreLabeler(pairwise.backend, template)


def score_labeler(pairwise):
    """d-RLAIF: a ``ScoreLabeler`` over the backend and template of ``pairwise``."""
    from rlaif_fast.feedback import ScoreLabeler

    return ScoreLabeler(pairwise.backend, pairwise.template)


LABELER_PREFIX = "labeler:"


def check_labeler_spec(spec: str, labeler_model: str | None = None) -> tuple[str, str]:
    """``labeler:hf:PATH`` or ``labeler:http:URL`` (``train --reward``, d-RLAIF) -> (kind, where), checked."""
    inner = spec[len(LABELER_PREFIX) :] if spec.startswith(LABELER_PREFIX) else spec
    kind, _, where = inner.partition(":")
    kind = "http" if kind == "https" else kind
    if kind not in ("hf", "http") or not where.strip("/"):
        raise ValueError(
            f"--reward {spec!r}: a labeler reward is labeler:hf:PATH or labeler:http:URL (the d-RLAIF reward: the "
            "labeler's 1-10 rating rescaled to [-1, 1])"
        )
    if kind == "hf" and not Path(where).is_dir():
        raise ValueError(f"--reward {spec!r}: labeler folder {where!r} does not exist")
    if kind == "http" and not labeler_model:
        raise ValueError(
            f"--reward {spec!r} is an HTTP labeler: give --labeler-model, the name the server expects"
        )
    return kind, (where if kind == "hf" else labeler_url(inner))


def direct_reward(spec: str, template: str = "summarization", labeler_model: str | None = None, device=None):
    """d-RLAIF from the command line (``train --reward labeler:hf:PATH --labeler-template NAME``): a
    :class:`DirectReward` over a ``ScoreLabeler`` on that backend and template (it needs a score prompt)."""
    from rlaif_fast.feedback import HFBackend, OpenAICompatibleBackend, ScoreLabeler

    kind, where = check_labeler_spec(spec, labeler_model)
    backend = (
        HFBackend(where, device=device) if kind == "hf" else OpenAICompatibleBackend(where, labeler_model)
    )
    return DirectReward(ScoreLabeler(backend, template))


class DirectReward:
    """The d-RLAIF reward for RL: ``ScoreLabeler`` scores, with an empty completion (a policy that emitted
    EOS at once) shown to the labeler as ``(empty)``, as in pair labeling; ``ScoreLabeler`` rejects ""."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, prompts, completions) -> list[float]:
        from rlaif_fast.pipeline.evaluate import visible

        return self.scorer(prompts, visible(completions))
