"""The stages of one RLAIF iteration (see :mod:`rlaif_fast.pipeline.run` for the loop and resume rules).

Each ``stage_*`` returns its record (a dict) and, when it finishes, writes it as ``<stage>.json`` after its
artefact; a stage whose record exists is skipped and its record returned. ``Stages`` is mixed into
:class:`~rlaif_fast.pipeline.run.Run`, which owns the config, the tokenizer, the prompts and the models.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch

from rlaif_fast.pipeline import evaluate as ev
from rlaif_fast.pipeline import files
from rlaif_fast.pipeline import models as M
from rlaif_fast.pipeline import task as T


class Stages:
    """SFT, label, reward model, RL and evaluation, over ``self.cfg`` and ``self.out``."""

    def stage_sft(self) -> dict:
        """Build (or load) the policy and fit it to the task's demonstrations; save it to ``sft/``. Rank 0
        does it (SFT of the embedded task is small); the other ranks wait for its record."""
        done = files.read_json(self.out / "sft.json")
        if done is not None:
            return done
        return self.ranks.main_first(self._sft_main)

    def _sft_main(self) -> dict:
        from rlaif_fast.pipeline.sft import build_policy, train_sft

        M.seed_all(self.cfg.seed)
        if self.cfg.policy is None:
            policy = build_policy(
                len(self.tokenizer),
                dim=self.cfg.policy_dim,
                layers=self.cfg.policy_layers,
                max_positions=max(64, 32 + self.cfg.max_new_tokens),  # prompts are ~10 tokens
                seed=self.cfg.seed,
            )
        else:
            policy = M.load_policy(self.cfg.policy)
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
        """Sample pairs from the current policy and label them; ``pairs.jsonl`` keeps every soft label.

        The pairs (``samples.jsonl``, written once) are split across ranks in chunks; each rank appends the
        labels of its chunks to its own shard (``label_shards/rank<r>.jsonl``, keyed by pair id), skipping
        pairs any shard already holds, so a killed stage resumes where it stopped, on any number of ranks.
        Rank 0 then merges the shards in pair order into ``pairs.jsonl`` and writes the record.
        With ``feedback: direct`` every response is also scored by the d-RLAIF labeler (``score_a``,
        ``score_b``), and the record has the scores' mean and their correlation with the ground truth."""
        path = self.iter_dir(k) / "label.json"
        done = files.read_json(path)
        if done is not None:
            return done
        samples = self._pair_samples(k, policy)
        shards = self.iter_dir(k) / "label_shards"
        labeled = _read_shards(shards)
        labeler = self.labeler()  # every rank, at the same point (rank 0 builds the demo labeler first)
        self.ranks.barrier()  # every rank has read the shards before any appends
        failed = None
        try:
            mine = shards / f"rank{self.ranks.rank}.jsonl"
            _truncate_torn_line(mine)
            for _c, s, e in self.ranks.my_chunks(len(samples)):
                todo = [r for r in samples[s:e] if r["id"] not in labeled]
                if todo:
                    _append_lines(mine, self._label_records(todo, labeler))
        except Exception as exc:  # noqa: BLE001 - every rank raises below
            failed = exc
        self.ranks.all_stop(failed)
        if k == 1 and self.cfg.human_pairs is not None:
            self._label_human_pairs()
        return self.ranks.main_first(lambda: self._merge_labels(k, samples))

    def _label_human_pairs(self) -> None:
        """``human_pairs`` labeled by the AI labeler (split across ranks), kept with the human choice in
        ``iter_1/human_pairs.jsonl`` for the dashboard's alignment with humans."""
        path = self.iter_dir(1) / "human_pairs.jsonl"
        if path.is_file():
            return
        rows = files.read_jsonl(Path(self.cfg.human_pairs))
        for i, r in enumerate(rows, 1):
            missing = [
                f for f in ("response_a", "response_b", "human_a") if not isinstance(r, dict) or f not in r
            ]
            if missing:
                raise ValueError(
                    f"{self.cfg.human_pairs}:{i} lacks {missing}; each line needs them (and context)"
                )
        ctx = [r.get("context", "") for r in rows]
        labels = self.label_split(
            ctx, ev.visible([r["response_a"] for r in rows]), ev.visible([r["response_b"] for r in rows])
        )
        if self.ranks.is_main:
            files.write_jsonl(path, [{**r, **files.jsonable(lab.to_dict())} for r, lab in zip(rows, labels)])
        self.ranks.barrier()

    def _pair_samples(self, k: int, policy) -> list[dict]:
        """The iteration's pairs (id, context, response_a, response_b): sampled once, kept in samples.jsonl."""
        path = self.iter_dir(k) / "samples.jsonl"
        if path.is_file():
            return files.read_jsonl(path)
        n = self.cfg.pairs_per_iteration
        prompts = [self.train_prompts[(i + k) % len(self.train_prompts)] for i in range(n)]
        a = ev.visible(self.sample(policy, prompts, seed=self.cfg.seed * 1000 + 2 * k))
        b = ev.visible(self.sample(policy, prompts, seed=self.cfg.seed * 1000 + 2 * k + 1))
        rows = [
            {"id": i, "context": p, "response_a": x, "response_b": y}
            for i, (p, x, y) in enumerate(zip(prompts, a, b))
        ]
        if self.ranks.is_main:
            files.write_jsonl(path, rows)
        self.ranks.barrier()
        return rows

    def _label_records(self, rows: list[dict], labeler) -> list[dict]:
        ctx = [r["context"] for r in rows]
        a, b = [r["response_a"] for r in rows], [r["response_b"] for r in rows]
        labels = labeler.label(ctx, a, b)
        out = [{**r, **lab.to_dict()} for r, lab in zip(rows, labels)]
        if self.cfg.feedback == "direct":  # d-RLAIF: the reward RL will see, on the same responses
            scores = self.score_labeler().score(ctx + ctx, a + b)
            for i, r in enumerate(out):
                r["score_a"], r["score_b"] = scores[i], scores[len(rows) + i]
        return out

    def _merge_labels(self, k: int, samples: list[dict]) -> dict:
        """Rank 0: the shards merged in pair order into pairs.jsonl, and the stage record."""
        labeled = _read_shards(self.iter_dir(k) / "label_shards")
        missing = [r["id"] for r in samples if r["id"] not in labeled]
        if missing:
            raise RuntimeError(f"iteration {k}: pairs {missing[:5]} have no label in any shard")
        records = [labeled[r["id"]] for r in samples]
        n = len(records)
        if self.ground_truth is not None:  # the reference choice, so the label file alone gives the alignment
            ctx = [r["context"] for r in records]
            gt_a = self.ground_truth(ctx, [r["response_a"] for r in records])
            gt_b = self.ground_truth(ctx, [r["response_b"] for r in records])
            for r, x, y in zip(records, gt_a, gt_b):
                r["reference_a"] = 1.0 if x > y else 0.0 if x < y else 0.5
        # a pair the labeler failed on (NaN label) is kept in pairs.jsonl but left out of every rate and of
        # the reward model's data: it is not a confident, consistent label
        valid = [r for r in records if math.isfinite(r["p_a"])]
        if not valid:
            raise ValueError(f"iteration {k}: the labeler failed on all {n} pairs (NaN labels)")
        record = {
            "pairs": n,
            "failed_pairs": n - len(valid),
            "position_bias": sum(not r["consistent"] for r in valid) / len(valid),
            "mean_entropy": sum(r["entropy"] for r in valid) / len(valid),
        }
        if self.ground_truth is not None:
            record.update(_alignment(valid, self.ground_truth))
        if self.cfg.feedback == "direct":
            scores = [r["score_a"] for r in records] + [r["score_b"] for r in records]
            record["mean_score"] = sum(scores) / len(scores)
            if self.ground_truth is not None:
                ctx = [r["context"] for r in records]
                resp = [r["response_a"] for r in records] + [r["response_b"] for r in records]
                record.update(_score_agreement(ctx + ctx, resp, scores, self.ground_truth))
        files.write_jsonl(self.iter_dir(k) / "pairs.jsonl", records)
        files.write_json(self.iter_dir(k) / "label.json", record)
        return record

    def stage_rm(self, k: int) -> dict:
        """Distill the iteration's soft labels into a reward model initialised from the SFT policy."""
        path = self.iter_dir(k) / "rm.json"
        done = files.read_json(path)
        if done is not None:
            return done
        from rlaif_fast.reward import RewardModel, RewardModelScorer, pairwise_accuracy, train_reward_model

        M.seed_all(self.cfg.seed + k)
        records = [
            r
            for r in files.read_jsonl(self.iter_dir(k) / "pairs.jsonl")
            if r["response_a"] != r["response_b"] and math.isfinite(r["p_a"])  # failed labels: NaN
        ]
        if len(records) < 2:
            raise ValueError(
                f"iteration {k}: only {len(records)} labeled pairs with two different responses; raise "
                "pairs_per_iteration or the temperature"
            )
        cut = max(1, len(records) // 5)  # last 20% held out to measure the reward model
        train, held = records[:-cut], records[-cut:]
        from rlaif_fast.trainer import RLAIFConfig
        from rlaif_fast.trainer.strategy import Strategy

        # the reward model trains through the RL stage's Strategy (its ZeRO stage, bf16, DeepSpeed JSON and
        # gradient clip), on every rank, initialised from the SFT policy as in the paper
        strategy = Strategy(RLAIFConfig.from_dict({**self.rl_settings, "output_dir": str(self.iter_dir(k))}))
        rm = RewardModel(copy.deepcopy(self.sft_policy()).cpu())
        result = train_reward_model(
            rm,
            self.tokenizer,
            train,
            epochs=self.cfg.rm_epochs,
            lr=self.cfg.rm_lr,
            batch_size=self.cfg.rm_batch_size,
            eval_pairs=held,
            seed=self.cfg.seed + k,
            strategy=strategy,
            optimizer=self.cfg.rm_optimizer,
        )
        rm = result["model"]
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
        if self.ranks.is_main:
            rm.save_pretrained(self.iter_dir(k) / "rm")
            files.write_json(path, record)
        self.ranks.barrier()
        return record

    def stage_rl(self, k: int, policy, reward) -> dict:
        """RL from the current policy against ``reward``, KL to the SFT policy; resumes from a checkpoint."""
        path = self.iter_dir(k) / "rl.json"
        done = files.read_json(path)
        if done is not None:
            return done
        from rlaif_fast.trainer import RLAIFConfig, RLAIFTrainer, ValueModel
        from rlaif_fast.trainer.checkpoint import latest_checkpoint

        M.seed_all(self.cfg.seed + k)
        rl_dir = self.iter_dir(k) / "rl"
        rl_cfg = RLAIFConfig.from_dict(
            {
                **self.rl_settings,
                "output_dir": str(rl_dir),
                "seed": self.cfg.seed + k,
                "max_new_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature,
                "max_prompt_len": self.max_prompt_len(policy),
                "progress": self.progress,
            }
        )
        value = ValueModel.from_policy(policy) if rl_cfg.uses_critic else None
        ref = copy.deepcopy(self.sft_policy())
        trainer = RLAIFTrainer(policy, self.tokenizer, reward, rl_cfg, ref_policy=ref, value_model=value)
        ckpt = latest_checkpoint(rl_dir)
        if ckpt is not None:
            trainer.load(ckpt)
        callback = None
        if self.cfg.select_checkpoint and rl_cfg.save_every:

            def callback(step, _metrics):  # every rank: the save gathers ZeRO-3 shards
                if step % rl_cfg.save_every == 0:
                    trainer.save(rl_dir / "policies" / f"step_{step:06d}")

        summary = trainer.train(self._rl_prompts(rl_cfg), callback=callback)
        if summary.get("stopped") == "interrupted":
            raise KeyboardInterrupt

        def record_it():
            history = [{"iteration": k, **row} for row in _rl_history(rl_dir, summary.pop("history", []))]
            record = {"summary": files.jsonable(summary), "history": files.jsonable(history)}
            files.write_json(path, record)
            return record

        return self.ranks.main_first(record_it)

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
        saved = sorted((self.iter_dir(k) / "rl" / "policies").glob("step_*"))
        if self.cfg.select_checkpoint and saved:
            # the paper's checkpoint selection: the RL checkpoint the labeler prefers most against SFT
            final = {"checkpoint": f"iter_{k}/rl/final", "win_rate": record["win_rate"]}
            scores, best = [final], (record["win_rate"], record, None)
            for d in saved:
                r = self.evaluate(M.load_policy(d, self.device), self.sft_policy())
                rel = str(d.relative_to(self.out))
                scores.append({"checkpoint": rel, "win_rate": r["win_rate"]})
                if r["win_rate"] > best[0]:
                    best = (r["win_rate"], r, rel)
            record = {**best[1], "checkpoints": scores, "best_checkpoint": best[2] or final["checkpoint"]}
            if best[2] is not None:
                record["policy_dir"] = best[2]
        if self.ranks.is_main:
            files.write_json(path, record)
        self.ranks.barrier()
        return record


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


def _score_agreement(prompts, responses, scores, ground_truth) -> dict:
    """How well the d-RLAIF reward tracks the ground truth: Pearson and Spearman correlation over every
    scored response (Spearman with tied ranks averaged: many responses share a ground-truth value)."""
    gt = torch.tensor(ground_truth(prompts, responses), dtype=torch.float64)
    s = torch.tensor(scores, dtype=torch.float64)
    return {
        "score_gt_pearson": _pearson(s, gt),
        "score_gt_spearman": _pearson(_average_ranks(s), _average_ranks(gt)),
    }


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation; None when either side is constant (the correlation is undefined)."""
    x, y = x - x.mean(), y - y.mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else None


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x``; tied values share the mean of their ranks."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # rank of the last member of each tied group
    return (ends - (counts - 1) / 2.0)[inverse]


def _read_shards(folder: Path) -> dict:
    """{pair id: record} over every shard in ``folder`` (a torn last line, from a kill mid-write, is
    skipped; the first record of an id wins)."""
    out: dict = {}
    for shard in sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []:
        data = shard.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["id"], rec)
    return out


def _truncate_torn_line(path: Path) -> None:
    """Cut a partial last line (the process was killed mid-write) so that appending starts a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


def _append_lines(path: Path, rows: list[dict]) -> None:
    """Append one JSON line per row and flush them to disk before the next chunk is labeled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(files.jsonable(r)) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
