"""``rlaif-fast run CONFIG.yaml``: the iterative RLAIF loop of Lee et al. 2023 (arXiv 2309.00267).

    SFT (optional) -> for each iteration:
        sample 2 responses per prompt from the current policy
        -> label each pair with the AI labeler, both orders averaged (PairwiseLabeler)
        -> distill the soft labels into a reward model (feedback: distilled)
           or score each response directly with the labeler (feedback: direct, d-RLAIF)
        -> RL against that reward with a KL leash to the SFT policy (RLAIFTrainer)
        -> evaluate: win rate against SFT judged by the labeler, ground truth where the task has one

How this departs from the paper: the paper runs one round (label SFT samples once, train the reward
model once, RL once); here every iteration labels fresh samples of the current policy, so later reward
models see the text RL actually produces, while the KL anchor and the win-rate baseline stay the SFT
policy. The reward model starts from the SFT policy's weights. Pairs whose two responses are identical
are labeled (they count in the position-bias and alignment numbers) but not used to train the reward
model: their label is 0.5 by construction and carries no signal.

Resumable per stage: every stage writes its artefact and then, last, a ``<stage>.json`` record under
``output_dir``; a rerun skips every stage whose record exists and loads its artefact instead, and the
RL stage continues from the trainer's latest checkpoint. ``metrics.jsonl`` is rebuilt from the records,
so a killed run never leaves duplicated rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
from pathlib import Path

import torch

from rlaif_fast.pipeline import evaluate as ev
from rlaif_fast.pipeline import files
from rlaif_fast.pipeline import task as T
from rlaif_fast.pipeline.config import RunConfig

# The run config owns these trainer settings (one value for sampling pairs, RL and evaluation).
RL_OWNED = ("output_dir", "max_new_tokens", "temperature", "seed", "progress")
RL_DEFAULTS = {
    "algorithm": "reinforce_baseline",
    "batch_size": 32,
    "micro_batch_size": 32,
    "kl_coef": 0.05,
    "learning_rate": 5e-4,
    "total_steps": 40,
    "tensorboard": False,
}


def cache_dir() -> Path:
    """Where the demo labeler is cached: $RLAIF_FAST_CACHE, else ~/.cache/rlaif_fast."""
    return Path(os.environ.get("RLAIF_FAST_CACHE", Path.home() / ".cache" / "rlaif_fast"))


def load_policy(path: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def labeler_url(spec: str) -> str:
    """``http://host:port`` as given, or the URL after the ``http:`` prefix (``http:https://host``)."""
    rest = spec.partition(":")[2]
    return rest if rest.startswith(("http://", "https://")) else spec


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """One run's stages over ``cfg.output_dir``. Each ``stage_*`` method returns its record (a dict)."""

    def __init__(self, cfg: RunConfig, *, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output_dir)
        self.rl_settings = self._rl_settings()  # validated before any model is built
        if cfg.task is not None:
            self.tokenizer = T.build_tokenizer()
            split = T.prompt_split()
            self.train_prompts, self.eval_prompts = split.train, split.eval
            self.ground_truth = T.ground_truth_reward
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
            self.train_prompts, self.eval_prompts = files.read_prompts(Path(cfg.prompts_file))
            self.ground_truth = None
        self._labeler = None
        self._sft = None

    def _rl_settings(self) -> dict:
        from rlaif_fast.trainer import RLAIFConfig

        clash = sorted(set(self.cfg.rl) & set(RL_OWNED))
        if clash:
            raise ValueError(
                f"rl: {clash} are set by the run config itself (one value for sampling, RL and "
                "evaluation); move them to the top level of the run config"
            )
        settings = {**RL_DEFAULTS, **self.cfg.rl}
        RLAIFConfig.from_dict({**settings, "output_dir": str(self.out)})  # fail now, not after SFT
        return settings

    # ---- paths ------------------------------------------------------------------------------------
    def sft_dir(self) -> Path:
        return self.out / "sft"

    def iter_dir(self, k: int) -> Path:
        return self.out / f"iter_{k}"

    def latest_policy_dir(self) -> Path | None:
        for k in range(self.cfg.iterations, 0, -1):
            if (self.iter_dir(k) / "rl.json").is_file():
                return self.iter_dir(k) / "rl" / "final"
        return self.sft_dir() if (self.out / "sft.json").is_file() else None

    # ---- models -----------------------------------------------------------------------------------
    def sft_policy(self):
        if self._sft is None:
            self.stage_sft()
            self._sft = load_policy(self.sft_dir())
        return self._sft

    def labeler(self):
        """The AI labeler: ``PairwiseLabeler`` over an ``HFBackend`` or an OpenAI-compatible endpoint."""
        if self._labeler is None:
            from rlaif_fast.feedback import HFBackend, OpenAICompatibleBackend, PairwiseLabeler, load_template

            template = load_template(self.cfg.template)
            kind, _, where = self.cfg.labeler.partition(":")
            if self.cfg.labeler == "demo":
                from rlaif_fast.pipeline.labeler_model import load_or_train_labeler

                model, _ = load_or_train_labeler(
                    template.render_pairwise,
                    self.tokenizer,
                    cache_dir(),
                    dim=self.cfg.policy_dim,
                    steps=self.cfg.labeler_steps,
                    seed=self.cfg.seed,
                    progress=self.progress,
                )
                backend = HFBackend(model, self.tokenizer, batch_size=64)
            elif kind == "hf":
                backend = HFBackend(where)
            else:
                backend = OpenAICompatibleBackend(labeler_url(self.cfg.labeler), self.cfg.labeler_model)
            self._labeler = PairwiseLabeler(backend, template)
        return self._labeler

    def reward_for_direct(self):
        from rlaif_fast.feedback import ScoreLabeler

        lab = self.labeler()
        return ScoreLabeler(lab.backend, lab.template)

    # ---- stages -----------------------------------------------------------------------------------
    def stage_sft(self) -> dict:
        """Build (or load) the policy and fit it to the task's demonstrations; save it to ``sft/``."""
        done = files.read_json(self.out / "sft.json")
        if done is not None:
            return done
        from rlaif_fast.pipeline.sft import build_policy, train_sft

        seed_all(self.cfg.seed)
        if self.cfg.policy is None:
            policy = build_policy(
                len(self.tokenizer),
                dim=self.cfg.policy_dim,
                layers=self.cfg.policy_layers,
                max_positions=max(64, 32 + self.cfg.max_new_tokens),  # prompts are ~10 tokens
                seed=self.cfg.seed,
            )
        else:
            policy = load_policy(self.cfg.policy)
        losses = []
        if self.cfg.sft_steps:
            if self.cfg.task is None:
                raise ValueError(
                    "sft_steps > 0 needs demonstrations, which only the embedded task has; set "
                    "sft_steps: 0 and give an SFT policy path as policy"
                )
            demos = T.sft_corpus(4096, self.cfg.seed)
            losses = train_sft(
                policy,
                self.tokenizer,
                demos,
                steps=self.cfg.sft_steps,
                lr=self.cfg.sft_lr,
                seed=self.cfg.seed,
                progress=self.progress,
            )
        policy.save_pretrained(str(self.sft_dir()))
        self.tokenizer.save_pretrained(str(self.sft_dir()))
        record = {"steps": self.cfg.sft_steps, "final_loss": losses[-1] if losses else None}
        files.write_json(self.out / "sft.json", record)
        return record

    def stage_label(self, k: int, policy) -> dict:
        """Sample pairs from the current policy and label them; ``pairs.jsonl`` keeps every soft label."""
        path = self.iter_dir(k) / "label.json"
        done = files.read_json(path)
        if done is not None:
            return done
        n = self.cfg.pairs_per_iteration
        prompts = [self.train_prompts[(i + k) % len(self.train_prompts)] for i in range(n)]
        a = ev.visible(self._sample(policy, prompts, seed=self.cfg.seed * 1000 + 2 * k))
        b = ev.visible(self._sample(policy, prompts, seed=self.cfg.seed * 1000 + 2 * k + 1))
        labels = self.labeler().label(prompts, a, b)
        records = [
            {"context": p, "response_a": x, "response_b": y, **lab.to_dict()}
            for p, x, y, lab in zip(prompts, a, b, labels)
        ]
        record = {
            "pairs": n,
            "position_bias": sum(not r["consistent"] for r in records) / n,
            "mean_entropy": sum(r["entropy"] for r in records) / n,
        }
        if self.ground_truth is not None:
            record.update(_alignment(records, self.ground_truth))
        files.write_jsonl(self.iter_dir(k) / "pairs.jsonl", records)
        files.write_json(path, record)
        return record

    def stage_rm(self, k: int) -> dict:
        """Distill the iteration's soft labels into a reward model initialised from the SFT policy."""
        path = self.iter_dir(k) / "rm.json"
        done = files.read_json(path)
        if done is not None:
            return done
        from rlaif_fast.reward import RewardModel, RewardModelScorer, pairwise_accuracy, train_reward_model

        seed_all(self.cfg.seed + k)
        records = [
            r
            for r in files.read_jsonl(self.iter_dir(k) / "pairs.jsonl")
            if r["response_a"] != r["response_b"]
        ]
        if len(records) < 2:
            raise ValueError(
                f"iteration {k}: only {len(records)} pairs with two different responses; raise "
                "pairs_per_iteration or the temperature"
            )
        cut = max(1, len(records) // 5)  # last 20% held out to measure the reward model
        train, held = records[:-cut], records[-cut:]
        rm = RewardModel(copy.deepcopy(self.sft_policy()))
        result = train_reward_model(
            rm,
            self.tokenizer,
            train,
            epochs=self.cfg.rm_epochs,
            lr=self.cfg.rm_lr,
            batch_size=32,
            eval_pairs=held,
            seed=self.cfg.seed + k,
        )
        record = {
            "train_pairs": len(train),
            "held_out_pairs": len(held),
            "final_loss": result["loss"],
            "acc_ai_train": result["train"].get("acc_ai"),
            "acc_ai_held_out": result["eval"].get("acc_ai"),
        }
        if self.ground_truth is not None:
            scorer = RewardModelScorer(rm, self.tokenizer)
            ctx = [r["context"] for r in held]
            gt_a = self.ground_truth(ctx, [r["response_a"] for r in held])
            gt_b = self.ground_truth(ctx, [r["response_b"] for r in held])
            keep = [i for i in range(len(held)) if gt_a[i] != gt_b[i]]
            if keep:
                r_a = scorer([ctx[i] for i in keep], [held[i]["response_a"] for i in keep])
                r_b = scorer([ctx[i] for i in keep], [held[i]["response_b"] for i in keep])
                record["acc_gt_held_out"] = pairwise_accuracy(r_a, r_b, [gt_a[i] > gt_b[i] for i in keep])
        rm.save_pretrained(self.iter_dir(k) / "rm")
        files.write_json(path, record)
        return record

    def stage_rl(self, k: int, policy, reward) -> dict:
        """RL from the current policy against ``reward``, KL to the SFT policy; resumes from a checkpoint."""
        path = self.iter_dir(k) / "rl.json"
        done = files.read_json(path)
        if done is not None:
            return done
        from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueModel
        from rlaif_fast.trainer.checkpoint import latest_checkpoint

        seed_all(self.cfg.seed + k)
        rl_dir = self.iter_dir(k) / "rl"
        rl_cfg = RLAIFConfig.from_dict(
            {
                **self.rl_settings,
                "output_dir": str(rl_dir),
                "seed": self.cfg.seed + k,
                "max_new_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature,
                "progress": self.progress,
            }
        )
        value = ValueModel.from_policy(policy) if rl_cfg.uses_critic else None
        ref = copy.deepcopy(self.sft_policy())
        trainer = RLAIFTrainer(policy, self.tokenizer, reward, rl_cfg, ref_policy=ref, value_model=value)
        ckpt = latest_checkpoint(rl_dir)
        if ckpt is not None:
            trainer.load(ckpt)
        summary = trainer.train(self._rl_prompts(rl_cfg))
        if summary.get("stopped") == "interrupted":
            raise KeyboardInterrupt
        history = [{"iteration": k, **row} for row in _rl_history(rl_dir, summary.pop("history", []))]
        record = {"summary": files.jsonable(summary), "history": files.jsonable(history)}
        files.write_json(path, record)
        return record

    def _rl_prompts(self, rl_cfg) -> list[str]:
        """The training prompts, repeated until one pass covers ``total_steps`` (the embedded task has few
        prompts; each repeat is sampled afresh, so repeats are new rollouts, not copies)."""
        need = rl_cfg.prompts_per_step * (rl_cfg.total_steps or 1)
        reps = max(1, -(-need // len(self.train_prompts)))
        return list(self.train_prompts) * reps

    def stage_eval(self, k: int, policy) -> dict:
        """Win rate of ``policy`` against SFT on the held-out prompts, and the ground truth of both."""
        path = self.iter_dir(k) / "eval.json"
        done = files.read_json(path)
        if done is not None:
            return done
        record = self.evaluate(policy, self.sft_policy())
        files.write_json(path, record)
        return record

    def evaluate(self, policy, baseline, n: int | None = None) -> dict:
        n = n or self.cfg.eval_prompts
        prompts = [self.eval_prompts[i % len(self.eval_prompts)] for i in range(n)]
        return ev.evaluate_policy(
            policy,
            baseline,
            self.tokenizer,
            self.labeler(),
            prompts,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            seed=self.cfg.seed + 12345,
            ground_truth=self.ground_truth,
        )

    def _sample(self, policy, prompts, seed):
        return ev.sample_completions(
            policy,
            self.tokenizer,
            prompts,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            seed=seed,
        )

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """All stages in order, skipping finished ones; returns {"sft", "iterations": [...]} records."""
        self._check_same_config()
        result = {"sft": self.stage_sft(), "iterations": []}
        policy = copy.deepcopy(self.sft_policy())
        for k in range(1, self.cfg.iterations + 1):
            self._say(
                f"iteration {k}/{self.cfg.iterations}: sample + label {self.cfg.pairs_per_iteration} pairs"
            )
            it = {"iteration": k, "label": self.stage_label(k, policy)}
            if self.cfg.feedback == "distilled":
                self._say(f"iteration {k}: reward model")
                it["rm"] = self.stage_rm(k)
                from rlaif_fast.reward import RewardModel, RewardModelScorer

                reward = RewardModelScorer(
                    RewardModel.from_pretrained(self.iter_dir(k) / "rm"), self.tokenizer
                )
            else:
                reward = self.reward_for_direct()
            self._say(f"iteration {k}: RL")
            it["rl"] = self.stage_rl(k, policy, reward)
            policy = load_policy(self.iter_dir(k) / "rl" / "final")
            self._say(f"iteration {k}: evaluate")
            it["eval"] = self.stage_eval(k, policy)
            result["iterations"].append(it)
            self.write_metrics(result)
        return result

    def _check_same_config(self) -> None:
        """Resuming reuses finished stages, so it is only sound under the config that made them."""
        path = self.out / "config.json"
        current = json.loads(json.dumps(self.cfg.to_dict()))
        previous = files.read_json(path)
        if previous is not None and previous != current:
            keys = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise ValueError(
                f"{self.out} holds a run made with a different config (changed: {', '.join(keys)}); "
                "resuming would mix the two. Use a new output_dir, or delete the old one"
            )
        files.write_json(path, current)

    def write_metrics(self, result: dict) -> Path:
        """metrics.jsonl from the stage records: RL rows (reward, kl, entropy, ...) then one eval row each."""
        rows = []
        for it in result["iterations"]:
            rows += it["rl"]["history"]
            ev_row = {k: v for k, v in it["eval"].items() if isinstance(v, (int, float))}
            rows.append({"iteration": it["iteration"], "kind": "eval", **ev_row})
        files.write_jsonl(self.out / "metrics.jsonl", rows)
        return self.out / "metrics.jsonl"

    def _say(self, text: str) -> None:
        if self.progress:
            print(f"[rlaif-fast] {text}", file=sys.stderr, flush=True)


def _rl_history(rl_dir: Path, in_memory: list[dict]) -> list[dict]:
    """Every RL step's metrics, also across a resume: the trainer appends to ``metrics.jsonl``, and steps
    logged after the last checkpoint of a killed run appear twice, so the last row of each step wins."""
    path = rl_dir / "metrics.jsonl"
    if not path.is_file():
        return in_memory
    by_step = {}
    for row in files.read_jsonl(path):
        by_step[row.get("step")] = row
    return [by_step[s] for s in sorted(by_step, key=lambda s: (s is None, s))]


def _alignment(records: list[dict], ground_truth) -> dict:
    """The paper's alignment (binarized soft label vs the reference choice) with the ground truth as the
    reference, over pairs the ground truth does not tie."""
    from rlaif_fast.reward import ai_human_alignment

    ctx = [r["context"] for r in records]
    gt_a = ground_truth(ctx, [r["response_a"] for r in records])
    gt_b = ground_truth(ctx, [r["response_b"] for r in records])
    keep = [i for i in range(len(records)) if gt_a[i] != gt_b[i]]
    if not keep:
        return {"alignment": None, "alignment_pairs": 0}
    return {
        "alignment": ai_human_alignment([records[i]["p_a"] for i in keep], [gt_a[i] > gt_b[i] for i in keep]),
        "alignment_pairs": len(keep),
    }


def parse_overrides(pairs: list[str]) -> dict:
    """``--set key=value`` pairs; values parse as YAML scalars (``--set iterations=2``)."""
    import yaml

    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} must look like key=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """``rlaif-fast run CONFIG.yaml [--set key=value ...]``: run (or resume) the loop, then report."""
    ap = argparse.ArgumentParser(prog="rlaif-fast run", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML run config (see rlaif_fast/pipeline/configs/demo.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    args = ap.parse_args(argv)
    cfg = RunConfig.from_yaml(args.config, parse_overrides(args.set))
    return finish(cfg, progress=not args.no_progress)


def finish(cfg: RunConfig, *, progress: bool) -> int:
    """Run the loop, then write and print the report (report.md, report.json, metrics.png)."""
    from rlaif_fast.pipeline import plots, report

    run = Run(cfg, progress=progress)
    try:
        result = run.run()
    except KeyboardInterrupt:
        print(
            f"interrupted; finished stages are saved in {run.out}: rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    plots.plot_metrics(run.out / "metrics.jsonl", run.out / "metrics.png")
    rep = report.build_report(result, cfg)
    report.write_report(rep, run.out)
    print(report.render_markdown(rep))
    return 0
