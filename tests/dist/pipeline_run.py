"""`rlaif-fast run` as a launcher starts it (``torchrun ... tests/dist/pipeline_run.py run CONFIG``), with two
test hooks, each set by an environment variable:

RLAIF_TEST_GREEDY_RL=1   the RL stage's rollouts decode greedily. The trainer samples each rank's rows from its
                         own RNG stream, so sampled rollouts differ between 1 and 2 ranks; greedy ones do not,
                         which lets the test compare the RL update itself.
RLAIF_TEST_CRASH_RANK=R  rank R dies (os._exit, like kill -9) right after appending its first chunk of labels.
"""

import os
import sys


def install_hooks() -> None:
    from rlaif_fast.pipeline import stages
    from rlaif_fast.trainer import trainer

    if os.environ.get("RLAIF_TEST_GREEDY_RL") == "1":
        real_sample = trainer.sample

        def greedy(*args, **kwargs):
            return real_sample(*args, **{**kwargs, "temperature": 0.0})

        trainer.sample = greedy
    if os.environ.get("RLAIF_TEST_CRASH_RANK") is not None:
        crash_rank = int(os.environ["RLAIF_TEST_CRASH_RANK"])
        real_append = stages._append_lines

        def append_then_die(path, rows):
            real_append(path, rows)
            if int(os.environ.get("RANK", 0)) == crash_rank:
                os._exit(9)

        stages._append_lines = append_then_die


if __name__ == "__main__":
    install_hooks()
    from rlaif_fast import cli

    sys.exit(cli.main(sys.argv[1:]))
