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

Every stage runs on ``device`` (default: this rank's GPU when there is one) and on every rank of a
``torchrun`` / ``deepspeed`` launch (``torchrun --nproc_per_node N -m rlaif_fast.cli run CONFIG``): sampling and
evaluation split the prompts across ranks in fixed chunks and gather them (each chunk has its own seed, so the
samples are those of one rank); labeling splits the pairs the same way, each rank appending to its own shard
(``iter_<k>/label_shards/rank<r>.jsonl``) that rank 0 merges in pair order; the reward model trains through the
RL stage's ``Strategy`` (DeepSpeed ZeRO from ``rl.zero_stage``, bf16 where ``rl.bf16`` enables it); SFT and
the stage records, metrics and report are rank 0's. A killed labeling stage resumes pair by pair.

Layout: this module holds the loop, resume checks and the CLI; the stages are in
:mod:`rlaif_fast.pipeline.stages`, model and labeler loading in :mod:`rlaif_fast.pipeline.models`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from pathlib import Path

from rlaif_fast.cli import user_error
from rlaif_fast.pipeline import evaluate as ev
from rlaif_fast.pipeline import files
from rlaif_fast.pipeline import models as M
from rlaif_fast.pipeline import task as T
from rlaif_fast.pipeline.config import RunConfig
from rlaif_fast.pipeline.dist import Ranks
from rlaif_fast.pipeline.models import cache_dir, labeler_url, load_policy  # noqa: F401  (public names)
from rlaif_fast.pipeline.stages import Stages

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


class Run(Stages):
    """One run's stages over ``cfg.output_dir``. Each ``stage_*`` method returns its record (a dict)."""

    def __init__(self, cfg: RunConfig, *, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output_dir)
        self.rl_settings = self._rl_settings()  # validated before any model is built
        self.ranks = Ranks(
            cfg.device, cfg.chunk_size
        )  # this rank under torchrun / deepspeed; one rank otherwise
        self.device = self.ranks.device
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
        self._labeler = self._score_labeler = None
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
        rl_cfg = RLAIFConfig.from_dict({**settings, "output_dir": str(self.out)})  # fail now, not after SFT
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1:  # the batch sizes must split over this launch's ranks (checked again by the trainer)
            from rlaif_fast.trainer.checks import per_rank_sizes

            try:
                per_rank_sizes(rl_cfg, world)
            except ValueError as exc:
                raise ValueError(
                    f"rl: {exc}; set rl.batch_size / rl.micro_batch_size to fit {world} ranks"
                ) from None
        return settings

    # ---- paths ------------------------------------------------------------------------------------
    def sft_dir(self) -> Path:
        return self.out / "sft"

    def iter_dir(self, k: int) -> Path:
        return self.out / f"iter_{k}"

    def latest_policy_dir(self) -> Path | None:
        for k in range(self.cfg.iterations, 0, -1):
            if (self.iter_dir(k) / "rl.json").is_file():
                chosen = (files.read_json(self.iter_dir(k) / "eval.json") or {}).get("policy_dir")
                return self.out / chosen if chosen else self.iter_dir(k) / "rl" / "final"  # select_checkpoint
        return self.sft_dir() if (self.out / "sft.json").is_file() else None

    # ---- models -----------------------------------------------------------------------------------
    def sft_policy(self):
        if self._sft is None:
            self.stage_sft()
            self._sft = M.load_policy(self.sft_dir(), self.device)
        return self._sft

    def labeler(self):
        """The AI labeler: ``PairwiseLabeler`` over an ``HFBackend`` or an OpenAI-compatible endpoint.
        Called by every rank at the same point; rank 0 builds it first (the demo labeler is trained once
        and cached), the others then load it."""
        if self._labeler is None:
            if not self.ranks.is_main:
                self.ranks.barrier()
            if self.cfg.labeler == "sft":
                self.stage_sft()
            self._labeler = M.build_labeler(
                self.cfg,
                self.tokenizer,
                progress=self.progress and self.ranks.is_main,
                device=self.device,
                sft_dir=self.sft_dir(),
            )
            if self.ranks.is_main:
                self.ranks.barrier()
        return self._labeler

    def score_labeler(self):
        """d-RLAIF: the labeler's 1-10 rating rescaled to [-1, 1], over the same backend and template."""
        if self._score_labeler is None:
            self._score_labeler = M.score_labeler(self.labeler())
        return self._score_labeler

    def evaluate(self, policy, baseline, n: int | None = None) -> dict:
        """Win rate of ``policy`` against ``baseline`` (both orders), its length-controlled version, the
        harmless rate when ``harmless_template`` is set, and the ground truth where the task has one.
        Prompts are split across ranks in chunks and the results gathered: every rank returns the same."""
        n = n or self.cfg.eval_prompts
        prompts = [self.eval_prompts[i % len(self.eval_prompts)] for i in range(n)]
        seed = self.cfg.seed + 12345
        pol = self.sample(policy, prompts, seed)
        base = self.sample(baseline, prompts, seed)
        labels = self.label_split(prompts, ev.visible(pol), ev.visible(base))
        result = ev.summarize(prompts, pol, base, labels, self.ground_truth)
        if self.cfg.harmless_template is not None:
            judge = M.harmless_labeler(self.labeler(), self.cfg.harmless_template)
            for name, out in (("harmless_rate", pol), ("harmless_rate_baseline", base)):
                scores = self.ranks.map_chunks(
                    n, lambda c, s, e, out=out: judge.score(prompts[s:e], ev.visible(out[s:e]))
                )
                result[name] = sum(x > 0 for x in scores) / len(scores)  # rated above 5.5 of 1..10
        result["examples"] = [
            {"prompt": p, "policy": a, "baseline": b} for p, a, b in list(zip(prompts, pol, base))[:5]
        ]
        return result

    def label_split(self, prompts, a, b) -> list:
        """``PairLabel``s of (prompt, a, b), the pairs split across ranks in chunks and gathered in order."""
        labeler = self.labeler()
        return self.ranks.map_chunks(
            len(prompts), lambda c, s, e: labeler.label(prompts[s:e], a[s:e], b[s:e])
        )

    def max_prompt_len(self, policy) -> int:
        """``rl.max_prompt_len`` (the trainer's default when unset), for sampling pairs, RL and evaluation
        alike, capped so that a prompt and ``max_new_tokens`` fit the policy's positions."""
        from rlaif_fast.trainer import RLAIFConfig

        wanted = self.rl_settings.get("max_prompt_len", RLAIFConfig.max_prompt_len)
        return ev.prompt_budget(policy, wanted, self.cfg.max_new_tokens)

    def sample(self, policy, prompts, seed: int) -> list[str]:
        """One completion per prompt from ``policy``: the one place the pipeline samples (pairs to label and
        evaluation). The prompts are cut into fixed chunks, chunk ``c`` sampled with seed ``seed + 7919 c``
        on rank ``c % world`` and the results gathered, so the samples do not depend on the number of ranks."""
        policy.to(self.device)
        budget = self.max_prompt_len(policy)
        sampler = self._vllm_sampler(policy, budget)

        def chunk(c, s, e):
            if sampler is not None:
                return sampler(prompts[s:e], seed + 7919 * c)
            return ev.sample_completions(
                policy,
                self.tokenizer,
                prompts[s:e],
                max_new_tokens=self.cfg.max_new_tokens,
                temperature=self.cfg.temperature,
                seed=seed + 7919 * c,
                max_prompt_len=budget,
                device=self.device,
            )

        return self.ranks.map_chunks(len(prompts), chunk)

    _sample = sample

    def _vllm_sampler(self, policy, budget: int):
        """With ``rl.rollout_engine: vllm`` on one rank, pairs and evaluation are sampled by the same
        in-process vLLM engine as the RL stage (the given policy's weights synced in first); None means
        transformers' generate. Several ranks keep generate here: the engine under torchrun is built and
        synced by all ranks in lockstep, and the chunks of this stage are uneven across ranks."""
        rl = self.rl_settings
        if rl.get("rollout_engine", "hf") != "vllm":
            return None
        if self.ranks.world > 1:
            if not getattr(self, "_said_vllm_ranks", False):
                self._said_vllm_ranks = True
                print(
                    "rollout_engine=vllm: the RL stage samples with vLLM; pair and evaluation sampling use "
                    f"transformers' generate on {self.ranks.world} ranks (vLLM there only on one rank)",
                    file=sys.stderr,
                    flush=True,
                )
            return None
        from rlaif_fast.trainer.rollout_vllm import sample_completions

        settings = {k: v for k, v in rl.items() if k.startswith("vllm_")}

        def sampler(prompts, seed):
            return sample_completions(
                policy,
                self.tokenizer,
                prompts,
                max_new_tokens=self.cfg.max_new_tokens,
                temperature=self.cfg.temperature,
                seed=seed,
                max_prompt_len=budget,
                **settings,
            )

        return sampler

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """All stages in order, skipping finished ones; returns {"sft", "iterations": [...]} records."""
        self._check_same_config()
        result = {"sft": self.stage_sft(), "iterations": []}
        policy = copy.deepcopy(self.sft_policy())  # on self.device
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
                    RewardModel.from_pretrained(self.iter_dir(k) / "rm").to(self.device), self.tokenizer
                )
            else:
                reward = M.DirectReward(self.score_labeler())
            self._say(f"iteration {k}: RL")
            it["rl"] = self.stage_rl(k, policy, reward)
            policy = M.load_policy(self.iter_dir(k) / "rl" / "final", self.device)
            self._say(f"iteration {k}: evaluate")
            it["eval"] = self.stage_eval(k, policy)
            if it["eval"].get("policy_dir"):  # checkpoint selection: the next iteration starts from the best
                policy = M.load_policy(self.out / it["eval"]["policy_dir"], self.device)
            result["iterations"].append(it)
            if self.ranks.is_main:
                self.write_metrics(result)
        self.ranks.barrier()
        return result

    def _check_same_config(self) -> None:
        """Resuming reuses finished stages, so it is only sound under the config that made them."""
        path = self.out / "config.json"
        current = json.loads(json.dumps(self.cfg.to_dict()))
        for key in (
            "template",
            "prompts_file",
            "harmless_template",
            "human_pairs",
        ):  # a file's content is part of the config, not just its name
            value = current.get(key)
            if value and Path(value).is_file():
                current[f"{key}_sha256"] = hashlib.sha256(Path(value).read_bytes()).hexdigest()
        previous = files.read_json(path)
        # one world at a time: every rank compares with the file as it was before rank 0 rewrites it
        self.ranks.barrier()
        if previous is not None:
            # a run recorded before the file hashes existed resumes on its settings alone
            compared = {k: v for k, v in current.items() if k in previous or not k.endswith("_sha256")}
            keys = _changed_keys(previous, compared)
            if keys:
                raise ValueError(
                    f"{self.out} holds a run made with a different config (changed: {', '.join(keys)}); "
                    "resuming would mix the two. Use a new output_dir, or delete the old one"
                )
        self.ranks.barrier()
        if self.ranks.is_main:
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
        if self.progress and self.ranks.is_main:
            print(f"[rlaif-fast] {text}", file=sys.stderr, flush=True)


def add_set_argument(ap) -> None:
    """The ``--set KEY=VALUE`` flag of ``rlaif-fast run`` and ``rlaif-fast demo``."""
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key; section.key=value changes one setting of a section (rl.kl_coef=0.05)",
    )


def parse_overrides(pairs: list[str]) -> dict:
    """``--set key=value`` pairs; values parse as YAML (``--set iterations=2``). A dotted key reaches into a
    section (``--set rl.kl_coef=0.05``); sections given either way merge into the file's (see from_yaml)."""
    import yaml

    out: dict = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set {item!r} must look like key=value or section.key=value")
        node = out
        for part in parts[:-1]:
            if isinstance(node.get(part), str) and node is out and part == "feedback":
                node[part] = {"mode": node[part]}  # --set feedback=direct then --set feedback.X=...
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        parsed = yaml.safe_load(value)
        if (
            node is out
            and parts[-1] == "feedback"
            and isinstance(out.get("feedback"), dict)
            and isinstance(parsed, str)
        ):
            out["feedback"]["mode"] = parsed  # --set feedback.X=... then --set feedback=direct: both kept
        else:
            node[parts[-1]] = parsed
    return out


def check_policy(cfg: RunConfig) -> None:
    """The config's policy path exists (a config file stays valid on a machine without its models, so this
    runs when a run starts, before anything loads: not as a hub "Repo id" error from deep inside)."""
    if cfg.policy is not None:
        from rlaif_fast._inputs import check_model_path

        check_model_path("policy", cfg.policy, check_hub_cache=False)


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ (``rl.kl_coef``, not just ``rl``). ``output_dir`` is where
    the run lives, not a setting: a run folder moved elsewhere resumes."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if prefix + k == "output_dir" or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        else:
            keys.append(prefix + k)
    return keys


def main(argv: list[str] | None = None) -> int:
    """``rlaif-fast run CONFIG.yaml [--set key=value ...]``: run (or resume) the loop, then report."""
    ap = argparse.ArgumentParser(prog="rlaif-fast run", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML run config (see rlaif_fast/pipeline/configs/demo.yaml)")
    add_set_argument(ap)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    args = ap.parse_args(argv)
    try:
        cfg = RunConfig.from_yaml(args.config, parse_overrides(args.set))
    except (ValueError, TypeError) as exc:
        return user_error("rlaif-fast run", exc)
    return finish(cfg, progress=not args.no_progress)


def finish(cfg: RunConfig, *, progress: bool, prog: str = "rlaif-fast run") -> int:
    """Run the loop, then write and print the report (report.md, report.json, metrics.png)."""
    from rlaif_fast.pipeline import plots, report

    try:  # the settings, and a resume under other ones, are checked before any stage runs
        check_policy(cfg)
        run = Run(cfg, progress=progress)
        run._check_same_config()
    except (ValueError, TypeError, OSError) as exc:  # OSError: a policy's tokenizer that cannot load
        return user_error(prog, exc)
    try:
        result = run.run()
    except KeyboardInterrupt:
        print(
            f"interrupted; finished stages are saved in {run.out}: rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    if not run.ranks.is_main:  # rank 0 writes the report
        run.ranks.close()
        return 0
    from rlaif_fast.pipeline import dashboard

    plots.plot_metrics(run.out / "metrics.jsonl", run.out / "metrics.png")
    rep = report.build_report(result, cfg)
    rep["labeler_dashboard"] = dashboard.build_dashboard(run.out, cfg.iterations)
    dashboard.plot_dashboard(rep["labeler_dashboard"], run.out / "labeler_dashboard.png")
    report.write_report(rep, run.out)
    print(report.render_markdown(rep))
    run.ranks.close()
    return 0
