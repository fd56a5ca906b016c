"""``rlaif-fast train``: RL-train a policy from the command line. Flags are generated from RLAIFConfig.

    rlaif-fast train --policy DIR_OR_LLAMA2C_BIN [--tokenizer PATH] --prompts prompts.jsonl \\
        --reward my_rewards.py:score [--config run.yaml [--config-section rl]] [--algorithm ppo ...]

Precedence: RLAIFConfig defaults < the YAML file < flags. Many ranks: ``torchrun --nproc_per_node=N
-m rlaif_fast.cli train ...`` (or the ``deepspeed`` launcher).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from rlaif_fast.trainer.config import RLAIFConfig, yaml_values

_SKIP = ("extra",)


def _field_docs() -> dict[str, str]:
    """The docstring under each RLAIFConfig field (read from the source, so there is one copy of it)."""
    tree = ast.parse(Path(__file__).with_name("config.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RLAIFConfig")
    docs, last = {}, None
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif last and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant):
            docs[last] = " ".join(str(node.value.value).split())
            last = None
    return docs


def _parser_for(annotation: str):
    optional = "None" in annotation
    base = int if "int" in annotation else float if "float" in annotation else str

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return base(text)

    parse.__name__ = base.__name__
    return parse


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
        "a class is instantiated without arguments",
    )
    job.add_argument("--config", help="YAML file of RLAIFConfig keys")
    job.add_argument("--config-section", help="top-level section of the YAML holding the keys (e.g. rl)")
    docs = _field_docs()
    cfg_group = p.add_argument_group("RLAIFConfig (defaults shown; flags override the YAML)")
    for f in dataclasses.fields(RLAIFConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{docs.get(f.name, '')} (default: {default})"
        if str(f.type) == "bool":
            cfg_group.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_,
            )
        else:
            cfg_group.add_argument(
                flag, dest=f.name, type=_parser_for(str(f.type)), default=argparse.SUPPRESS, help=help_
            )
    return p


def load_callable(spec: str, device=None):
    """The reward: a directory saved by ``rlaif-fast train-rm`` (a distilled reward model and its
    tokenizer), ``pkg.module:name`` or ``path/to/file.py:name``. A reward model is put on ``device``
    (default: this rank's GPU when there is one, so that it does not score on the CPU), in eval mode."""
    from rlaif_fast.reward.model import HEAD_FILE

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
    if ":" not in spec:
        raise ValueError(
            f"--reward {spec!r} must be a reward-model directory saved by `rlaif-fast train-rm`, "
            "MODULE:NAME or FILE.py:NAME"
        )
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--reward file {where!r} does not exist")
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
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {path!r} does not exist")
    if p.suffix == ".jsonl":
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        missing = [i for i, r in enumerate(rows) if "prompt" not in r]
        if missing:
            raise ValueError(f"{path}: line {missing[0] + 1} has no 'prompt' field")
        return [r["prompt"] for r in rows]
    return [line for line in p.read_text().splitlines() if line.strip()]


def load_policy(policy: str, tokenizer: str | None):
    if policy.endswith(".bin"):
        from rlaif_fast.models.llama2c import Llama2cTokenizer, load_llama2c

        if tokenizer is None:
            raise ValueError("a llama2.c .bin policy needs --tokenizer path/to/tok*.bin")
        return load_llama2c(policy).train(), Llama2cTokenizer(tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(tokenizer or policy)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    values = {}
    if args.get("config"):
        # the keys the file sets, not a resolved config: a default derived from a YAML value (mini_batch_size
        # from batch_size) must follow a flag that overrides that value
        values = yaml_values(args["config"], section=args.get("config_section"))
    values.update({k: v for k, v in args.items() if k in RLAIFConfig.field_names()})
    config = RLAIFConfig.from_dict(values)
    reward = load_callable(args["reward"])
    prompts = load_prompts(args["prompts"])
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
