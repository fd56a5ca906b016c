"""``rlaif-fast``: one command, one subcommand per job. Each job's flags are generated from its config.

The dispatcher stays tiny and lazy: ``rlaif-fast label --help`` imports the labeling job, not deepspeed.
Each subcommand is a ``main(argv) -> int`` function owned by the module that implements the job.
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module, function, one-line help)
COMMANDS = {
    "demo": (
        "rlaif_fast.pipeline.demo",
        "main",
        "run the whole RLAIF loop offline on the embedded default task",
    ),
    "label": ("rlaif_fast.feedback.job", "main", "label preference pairs with an AI labeler (resumable)"),
    "train-rm": ("rlaif_fast.reward.train", "main", "distill AI soft labels into a reward model"),
    "train": ("rlaif_fast.trainer.cli", "main", "RL-train a policy (REINFORCE / PPO / RLOO / GRPO)"),
    "eval": (
        "rlaif_fast.pipeline.evaluate",
        "main",
        "win rate of a policy against SFT, judged by the labeler",
    ),
    "run": (
        "rlaif_fast.pipeline.run",
        "main",
        "the iterative loop from a YAML config: sample, label, RM, RL, eval",
    ),
    "bench": ("rlaif_fast.bench", "main", "print a CPU benchmark table of the ops"),
}


def _usage() -> str:
    lines = ["usage: rlaif-fast COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "rlaif-fast COMMAND --help shows the flags of one command."]
    return "\n".join(lines)


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` that the ``deepspeed`` launcher (and the legacy
    ``torch.distributed.launch``, as ``--local-rank``) puts before the script's own arguments, so that
    ``deepspeed --module rlaif_fast.cli train ...`` works like torchrun. The launchers also export
    LOCAL_RANK, which the trainer reads; if one did not, the flag's value is exported here."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--local_rank", "--local-rank"):
            if arg == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                i += 2
                break
            if arg.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                i += 1
                break
        else:
            out.append(arg)
            i += 1
    return out


def user_error(prog: str, exc: BaseException) -> int:
    """How every command answers a user's mistake (a bad value, a missing or broken file), as
    ``rlaif-fast label`` does: ``prog: error: message`` on stderr and exit status 2, no traceback."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlaif-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
