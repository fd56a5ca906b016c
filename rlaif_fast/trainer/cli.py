"""``rlaif-fast train``: RL-train a policy from the command line. Flags are generated from RLAIFConfig.

    rlaif-fast train --policy DIR_OR_LLAMA2C_BIN [--tokenizer PATH] --prompts prompts.jsonl \\
        --reward my_rewards.py:score [--config run.yaml [--config-section rl]] [--algorithm ppo ...]

Precedence: RLAIFConfig defaults < the YAML file < flags. Many ranks: ``torchrun --nproc_per_node=N
-m rlaif_fast.cli train ...`` (or the ``deepspeed`` launcher).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from rlaif_fast.config_cli import add_options
from rlaif_fast.trainer.config import RLAIFConfig, yaml_values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlaif-fast train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    job = p.add_argument_group("job")
    job.add_argument("--policy", required=True, help="a save_pretrained folder or a llama2.c .bin checkpoint")
    job.add_argument("--tokenizer", help="tokenizer folder or llama2.c tok*.bin (default: the policy folder)")
    job.add_argument("--prompts", required=True, help=".jsonl with a 'prompt' field per line, or .txt lines")
    job.add_argument(
        "--reward",
        required=True,
        help="a reward-model directory from `rlaif-fast train-rm`, or MODULE:NAME or FILE.py:NAME of a callable (prompts, completions) -> list[float]; "
        "a class is instantiated without arguments; or labeler:hf:PATH / labeler:http:URL for d-RLAIF (the "
        "labeler's 1-10 rating, rescaled to [-1, 1], is the reward; see --labeler-template)",
    )
    job.add_argument(
        "--labeler-template",
        default="summarization",
        help="d-RLAIF (--reward labeler:...): the labeler template with a score prompt (a built-in name or a file)",
    )
    job.add_argument(
        "--labeler-model", help="d-RLAIF with an http labeler: the model name the server expects"
    )
    job.add_argument("--config", help="YAML file of RLAIFConfig keys")
    job.add_argument("--config-section", help="top-level section of the YAML holding the keys (e.g. rl)")
    cfg_group = p.add_argument_group("RLAIFConfig (defaults shown; flags override the YAML)")
    add_options(cfg_group, RLAIFConfig, skip=("extra",), defaults=False)  # a YAML value sits between
    return p


# any one of these lets AutoTokenizer read a folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_reward(spec: str) -> None:
    """The cheap half of :func:`load_callable`, run before any model loads: the folder or file exists, and
    a reward-model folder holds the tokenizer its scorer needs."""
    from rlaif_fast.reward.model import HEAD_FILE

    if spec.startswith("labeler:"):  # d-RLAIF; the http model name is checked when the reward is built
        from rlaif_fast.pipeline.models import check_labeler_spec

        check_labeler_spec(spec, labeler_model="-")
        return
    folder = Path(spec)
    if folder.is_dir():
        if not (folder / HEAD_FILE).is_file():
            raise ValueError(
                f"--reward {spec!r} is a folder without {HEAD_FILE}: not a reward model saved by "
                "`rlaif-fast train-rm`"
            )
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(
                f"--reward {spec!r} holds a reward model but no tokenizer ({' / '.join(TOKENIZER_FILES[:2])}): "
                f"save the tokenizer it was trained with into it (tokenizer.save_pretrained({spec!r})); "
                "`rlaif-fast train-rm` does"
            )
        return
    if ":" not in spec:
        raise ValueError(
            f"--reward {spec!r} must be a reward-model directory saved by `rlaif-fast train-rm`, "
            "MODULE:NAME or FILE.py:NAME"
        )
    where = spec.rsplit(":", 1)[0]
    if where.endswith(".py") and not Path(where).is_file():
        raise ValueError(f"--reward file {where!r} does not exist")


def load_callable(spec: str, device=None, *, labeler_template: str = "summarization", labeler_model=None):
    """The reward: a directory saved by ``rlaif-fast train-rm`` (a distilled reward model and its
    tokenizer), ``pkg.module:name`` or ``path/to/file.py:name``. A reward model is put on ``device``
    (default: this rank's GPU when there is one, so that it does not score on the CPU), in eval mode.
    ``labeler:hf:PATH`` / ``labeler:http:URL``: d-RLAIF, the labeler's rating with ``labeler_template``."""
    from rlaif_fast.reward.model import HEAD_FILE

    check_reward(spec)
    if spec.startswith("labeler:"):
        from rlaif_fast.pipeline.models import direct_reward

        return direct_reward(spec, labeler_template, labeler_model, device=device)
    if (Path(spec) / HEAD_FILE).is_file():
        import torch
        from transformers import AutoTokenizer

        from rlaif_fast.reward import RewardModel, RewardModelScorer

        if device is None:
            cuda = torch.cuda.is_available()
            device = (
                torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
            )
        model = RewardModel.from_pretrained(spec).to(device).eval()
        return RewardModelScorer(model, AutoTokenizer.from_pretrained(spec))
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        # registered in sys.modules as an import would, or a dataclass (its module looked up there) or pickling
        # fails; under a name of its own when the stem is taken (a file named like an imported module)
        mod_name = path.stem if path.stem not in sys.modules else f"_rlaif_reward_{path.stem}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.parent.resolve()))  # the file may import its neighbours
        spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not hasattr(module, name):
        raise ValueError(f"--reward: {where} has no attribute {name!r}")
    obj = getattr(module, name)
    return obj() if isinstance(obj, type) else obj


def load_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": "..."} per line) or a text file (one per line); a bad line is
    reported with the file and its line number."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {path!r} does not exist")
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix != ".jsonl":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{n}: not JSON ({exc.msg}); write one JSON object per line"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{n}: no "prompt" string; write lines like {{"prompt": "..."}}')
            prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompt")
    return prompts


def load_policy(policy: str, tokenizer: str | None):
    if policy.endswith(".bin"):
        from rlaif_fast.models.llama2c import Llama2cTokenizer, load_llama2c

        if tokenizer is None:
            raise ValueError("a llama2.c .bin policy needs --tokenizer path/to/tok*.bin")
        return load_llama2c(policy).train(), Llama2cTokenizer(tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(tokenizer or policy)


def _checked_inputs(args: dict) -> tuple[RLAIFConfig, list[str]]:
    """Every user input checked before anything heavy loads: the config (YAML and flags), a resume under
    the same settings, the prompts, the policy and tokenizer paths, the reward and the output folder."""
    from rlaif_fast import _inputs
    from rlaif_fast.trainer import checkpoint as ckpt

    values = {}
    if args.get("config"):
        # the keys the file sets, not a resolved config: a default derived from a YAML value (mini_batch_size
        # from batch_size) must follow a flag that overrides that value
        values = yaml_values(args["config"], section=args.get("config_section"))
    values.update({k: v for k, v in args.items() if k in RLAIFConfig.field_names()})
    config = RLAIFConfig.from_dict(values)
    if config.resume and (latest := ckpt.latest_checkpoint(config.output_dir)) is not None:
        ckpt.check_resume_config(latest, config.to_json())
    prompts = load_prompts(args["prompts"])
    _inputs.check_model_path("--policy", args["policy"])
    if args["policy"].endswith(".bin") and args.get("tokenizer") is None:
        raise ValueError("a llama2.c .bin policy needs --tokenizer path/to/tok*.bin")
    if args.get("tokenizer") is not None and not Path(args["tokenizer"]).exists():
        raise ValueError(f"--tokenizer {args['tokenizer']!r} does not exist")
    check_reward(args["reward"])
    _inputs.check_writable_dir("output_dir", config.output_dir)
    return config, prompts


def main(argv: list[str] | None = None) -> int:
    from rlaif_fast.cli import user_error

    args = vars(build_parser().parse_args(argv))
    try:
        config, prompts = _checked_inputs(args)
    except (ValueError, TypeError) as exc:
        return user_error("rlaif-fast train", exc)
    reward = load_callable(
        args["reward"], labeler_template=args["labeler_template"], labeler_model=args.get("labeler_model")
    )
    policy, tokenizer = load_policy(args["policy"], args.get("tokenizer"))
    from rlaif_fast.trainer import RLAIFTrainer, ValueModel

    value_model = ValueModel.from_policy(policy) if config.uses_critic else None
    trainer = RLAIFTrainer(policy, tokenizer, reward, config, value_model=value_model)
    summary = trainer.train(prompts)
    if trainer.strategy.is_main:
        summary.pop("history", None)
        (Path(config.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    trainer.strategy.close()
    return 0 if summary["stopped"] == "completed" else 130
