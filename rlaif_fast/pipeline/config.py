"""``RunConfig``: one YAML file describes one iterative RLAIF run (``rlaif-fast run CONFIG.yaml``).

Every field has a docstring, every rule is checked in ``__post_init__`` before any model is built, and
unknown keys are rejected with the closest valid name, so a typo never silently falls back to a default.
The ``rl`` mapping is handed to the trainer's own ``RLAIFConfig.from_dict``, which validates it.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FEEDBACK_MODES = ("distilled", "direct")
FEEDBACK_KEYS = {
    "mode": "feedback",
    "chain_of_thought": "chain_of_thought",
    "rationale_tokens": "rationale_tokens",
}
RM_OPTIMIZERS = ("adamw", "adafactor", "sgd")
EMBEDDED_TASKS = ("happy_sentences",)


@dataclass
class RunConfig:
    output_dir: str = "demo_out"
    """Where every stage's artefact, metrics.jsonl, plots and the report go. A rerun resumes from here."""

    seed: int = 0
    """Seeds Python, NumPy and torch for every stage, so a run (and the demo's result) is reproducible."""

    task: str | None = "happy_sentences"
    """The embedded task with a checkable ground truth (``happy_sentences``), or null for a user task."""

    prompts_file: str | None = None
    """JSONL with a ``prompt`` field per line, for a user task (``task: null``). Last 10% are eval prompts."""

    policy: str | None = None
    """HF path of the policy to start from. Null: a tiny GPT-2 built from the config below (embedded task)."""

    policy_layers: int = 2
    """Layers of the config-built policy (ignored when ``policy`` is a path)."""

    policy_dim: int = 64
    """Hidden size of the config-built policy and of the demo labeler (ignored for loaded models)."""

    sft_steps: int = 300
    """SFT steps on the task's demonstrations before RL; 0 skips SFT (the policy is then the reference)."""

    sft_lr: float = 3e-3
    """AdamW learning rate of SFT."""

    labeler: str = "demo"
    """``demo`` (train the tiny task labeler, then query it like any LM), ``hf:PATH``, ``http:URL``, or ``sft``
    (the run's own SFT checkpoint labels: the paper's "same-size" self-improvement setting)."""

    labeler_model: str | None = None
    """Model name sent to an OpenAI-compatible ``http:`` labeler (required for ``http:``)."""

    labeler_steps: int = 300
    """Training steps of the ``demo`` labeler (ignored for a real labeler)."""

    template: str = "helpfulness"
    """Labeler prompt: a built-in name (``summarization``, ``helpfulness``, ...), a template file (a relative
    path is read from the config's folder) or a string with ``{context}``, ``{first}``, ``{second}``."""

    feedback: str = "distilled"
    """``distilled``: pairwise labels -> reward model -> RL. ``direct`` (d-RLAIF): the labeler's 1-10 score."""

    chain_of_thought: bool = False
    """Chain-of-thought labeling (the paper's best: detailed preamble + CoT, 0-shot): the labeler first writes a
    rationale greedily, then scores "1"/"2" after it; the rationales are kept in ``pairs.jsonl``. Also
    settable as ``feedback: {mode: distilled, chain_of_thought: true, rationale_tokens: 512}``."""

    rationale_tokens: int = 512
    """Longest chain-of-thought rationale, in the labeler's tokens (the paper: up to 512)."""

    device: str = "auto"
    """Where sampling, labeling, the reward model and evaluation run: ``auto`` (this rank's GPU when there is
    one, else the CPU), ``cuda`` or ``cpu``. RL runs where the trainer's Strategy puts it (the same)."""

    chunk_size: int = 64
    """Prompts (or pairs) per unit of work when sampling, labeling and evaluating; chunk c goes to rank
    c % world. Results do not depend on the number of ranks (each chunk has its own seed), but they do on this."""

    iterations: int = 1
    """Rounds of sample -> label -> reward model -> RL -> evaluate."""

    pairs_per_iteration: int = 256
    """Response pairs sampled from the current policy and labeled in both orders, per iteration."""

    rm_epochs: int = 3
    """Epochs of soft-label Bradley-Terry training of the reward model per iteration (distilled only)."""

    rm_lr: float = 2e-3
    """Learning rate of the reward model (distilled only)."""

    rm_batch_size: int = 32
    """Pairs per reward-model step, all ranks together (the paper's appendix: 128)."""

    rm_optimizer: str = "adamw"
    """``adamw``, ``adafactor`` (transformers' Adafactor at a fixed learning rate, as the paper's T5X stack) or
    ``sgd`` (plain SGD; the multi-rank tests use it: Adam turns float noise in a gradient that is exactly 0 in
    theory, such as the final layer-norm bias of a reward model, into steps of the learning rate's size)."""

    max_new_tokens: int = 14
    """Longest sampled response, in tokens."""

    temperature: float = 0.9
    """Sampling temperature of pair sampling and RL rollouts (the paper uses 0.9)."""

    eval_prompts: int = 96
    """Responses per policy at evaluation (prompts are cycled); each pair is judged in both orders."""

    human_pairs: str | None = None
    """JSONL of pairs with a human choice (``context``, ``response_a``, ``response_b``, ``human_a`` 1/0): the
    labeler labels them once (``iter_1/human_pairs.jsonl``) and the dashboard reports its alignment with
    the humans, the paper's measure of a labeler. A relative path is read from the config's folder."""

    harmless_template: str | None = None
    """A template with a score prompt (e.g. ``harmlessness``): evaluation also reports the harmless rate, the
    share of responses the labeler rates above the middle of its 1-10 scale. Null: not measured."""

    select_checkpoint: bool = False
    """Also judge every saved RL checkpoint (``rl.save_every``) against SFT and report the one with the
    highest labeler win rate (``best_checkpoint`` in eval.json), as the paper selects its policies."""

    rl: dict[str, Any] = field(default_factory=dict)
    """Settings passed to ``rlaif_fast.trainer.RLAIFConfig.from_dict`` (algorithm, kl_coef, lr, steps, ...)."""

    def __post_init__(self):
        self._check_strings()
        self._check_numbers()
        self._check_task()
        self._check_labeler()
        if not isinstance(self.chain_of_thought, bool):
            raise TypeError(f"chain_of_thought must be true or false, got {self.chain_of_thought!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device={self.device!r}; use auto, cpu or cuda")
        if self.rm_optimizer not in RM_OPTIMIZERS:
            raise ValueError(f"rm_optimizer={self.rm_optimizer!r}; use one of {RM_OPTIMIZERS}")
        if self.feedback not in FEEDBACK_MODES:
            raise ValueError(f"feedback={self.feedback!r} is not supported; use one of {FEEDBACK_MODES}")
        if not isinstance(self.rl, dict):
            raise TypeError(f"rl must be a mapping of trainer settings, got {type(self.rl).__name__}")

    def _check_strings(self):
        for name in ("output_dir", "labeler", "template", "feedback", "device", "rm_optimizer"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {value!r}")
        for name in ("task", "prompts_file", "policy", "labeler_model", "harmless_template", "human_pairs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or null, got {value!r}")

    def _check_numbers(self):
        positive_ints = (
            "policy_layers",
            "policy_dim",
            "iterations",
            "pairs_per_iteration",
            "max_new_tokens",
            "eval_prompts",
            "rationale_tokens",
            "rm_batch_size",
            "chunk_size",
        )
        non_negative = ("sft_steps", "labeler_steps", "rm_epochs", "seed")
        for name in positive_ints + non_negative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value < (1 if name in positive_ints else 0):
                raise ValueError(f"{name} must be >= {1 if name in positive_ints else 0}, got {value}")
        if (self.policy is None or self.labeler == "demo") and self.policy_dim % 4:
            raise ValueError(
                f"policy_dim must be a multiple of 4 (the config-built policy and the demo labeler have 4 "
                f"attention heads), got {self.policy_dim}"
            )
        if self.pairs_per_iteration < 2:
            raise ValueError(
                f"pairs_per_iteration must be >= 2 to train or check anything, got {self.pairs_per_iteration}"
            )
        for name in ("sft_lr", "rm_lr", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")

    def _check_task(self):
        if self.task is not None and self.task not in EMBEDDED_TASKS:
            raise ValueError(
                f"task={self.task!r} is not an embedded task; use one of {EMBEDDED_TASKS} or "
                "task: null with prompts_file"
            )
        if self.task is not None and self.prompts_file is not None:
            raise ValueError(
                f"task={self.task!r} and prompts_file={self.prompts_file!r} both set; the "
                "embedded task brings its own prompts: set task: null to use a prompts file"
            )
        if self.task is None and self.prompts_file is None:
            raise ValueError("task is null but no prompts_file is given; set one of them")
        if self.task is None and self.policy is None:
            raise ValueError(
                "a user task (task: null) needs a policy path: the config-built policy only "
                "speaks the embedded task's language"
            )

    def _check_labeler(self):
        kind = self.labeler.split(":", 1)[0]
        kind = "http" if kind == "https" else kind
        if self.labeler not in ("demo", "sft") and kind not in ("hf", "http"):
            raise ValueError(
                f"labeler={self.labeler!r}; use 'demo', 'hf:PATH' or 'http:URL' (or 'sft': the run's SFT policy)"
            )
        if kind in ("hf", "http") and not self.labeler.split(":", 1)[1].strip("/"):
            raise ValueError(
                f"labeler={self.labeler!r} names no {'path' if kind == 'hf' else 'URL'} after ':'"
            )
        if self.labeler == "demo" and self.task is None:
            raise ValueError(
                "labeler: demo is trained on the embedded task's ground truth, which a user task "
                "(task: null) does not have; point labeler at hf:PATH or http:URL"
            )
        if kind == "http" and not self.labeler_model:
            raise ValueError(
                f"labeler={self.labeler!r} is an HTTP endpoint: set labeler_model to the model "
                "name the server expects"
            )
        if self.harmless_template is not None:
            from rlaif_fast.feedback import load_template

            if not load_template(self.harmless_template).score_sample:
                raise ValueError(
                    f"harmless_template={self.harmless_template!r} has no score prompt (score_sample); the "
                    "harmless rate asks the labeler to rate each response: give a template with one"
                )
        if self.feedback == "direct":
            from rlaif_fast.feedback import load_template

            template = load_template(self.template)
            if not template.score_sample:
                raise ValueError(
                    f"feedback: direct (d-RLAIF) asks the labeler for a 1-10 rating, but template "
                    f"{template.name!r} has no score prompt; add score_sample (with {{context}} and "
                    "{response}) and score_ending to it, or use feedback: distilled"
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a mapping; unknown keys raise ValueError naming the key and the closest valid one."""
        if not isinstance(data, dict):
            raise TypeError(f"a run config must be a mapping of settings, got {type(data).__name__}")
        data = _flatten_feedback(data)
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
                raise ValueError(f"unknown run config key {key!r}{hint}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Read a YAML file (``overrides`` win over the file's values, e.g. from the command line). A mapping
        in ``overrides`` merges into the file's mapping of the same key (``rl.kl_coef`` changes one setting
        of the ``rl`` section and keeps the others)."""
        from rlaif_fast._inputs import load_yaml

        path = Path(path)
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping of settings, got {type(data).__name__}")
        # file paths in a config are relative to the config's folder when they exist there
        for key in ("template", "prompts_file", "human_pairs"):
            value = data.get(key)
            if isinstance(value, str) and (path.parent / value).is_file():
                data[key] = str(path.parent / value)
        # a feedback section becomes the flat keys on each side first, so that `feedback: direct` in the file
        # and `--set feedback.chain_of_thought=true` (or the reverse) merge, the command line winning
        return cls.from_dict(_merge(_flatten_feedback(data), _flatten_feedback(dict(overrides or {}))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flatten_feedback(data: dict) -> dict:
    """``feedback`` given as a section ({mode, chain_of_thought, rationale_tokens}) -> the flat keys."""
    section = data.get("feedback")
    if not isinstance(section, dict):
        return data
    out = {k: v for k, v in data.items() if k != "feedback"}
    for key, value in section.items():
        if key not in FEEDBACK_KEYS:
            close = difflib.get_close_matches(str(key), list(FEEDBACK_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(FEEDBACK_KEYS)}"
            raise ValueError(f"unknown feedback key {key!r}{hint}")
        if key != "mode" and FEEDBACK_KEYS[key] in data:
            raise ValueError(f"{FEEDBACK_KEYS[key]} is set both at the top level and in the feedback section")
        out[FEEDBACK_KEYS[key]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; mappings present in both merge key by key, all else is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (``rlaif_fast/pipeline/configs/<name>.yaml``)."""
    path = Path(__file__).parent / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no packaged config named {name!r} (looked for {path})")
    return path
