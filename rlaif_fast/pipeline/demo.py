"""``rlaif-fast demo`` (``make demo``): the whole RLAIF loop offline on CPU, on the embedded task.

It runs ``configs/demo.yaml``: a tiny GPT-2 policy learns a toy language by SFT, a tiny LM labeler is
trained for the task (then cached) and queried only through ``PairwiseLabeler`` + ``HFBackend``, its soft
labels are distilled into a reward model, REINFORCE with a baseline trains the policy, and the report
(``demo_out/report.md``, ``report.json``, ``metrics.png``) says how the labeler, the reward model and the
policy did against the task's exact ground truth. A killed demo resumes where it stopped.
Exit status 1 when the ground-truth score did not improve: the demo's promise is checked, not assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from rlaif_fast.cli import user_error
    from rlaif_fast.pipeline.config import RunConfig, packaged_config
    from rlaif_fast.pipeline.run import add_set_argument, finish, parse_overrides

    ap = argparse.ArgumentParser(prog="rlaif-fast demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default: the config's demo_out)")
    add_set_argument(ap)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    args = ap.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if args.out is not None:
            overrides["output_dir"] = args.out
        cfg = RunConfig.from_yaml(packaged_config("demo"), overrides)
    except (ValueError, TypeError) as exc:
        return user_error("rlaif-fast demo", exc)
    t0 = time.perf_counter()
    status = finish(cfg, progress=not args.no_progress, prog="rlaif-fast demo")
    seconds = time.perf_counter() - t0
    if status != 0:  # interrupted: finish said how to resume; report.json is absent or from an older run
        return status
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun: rank 0 reports
        return 0
    rep = json.loads((Path(cfg.output_dir) / "report.json").read_text())
    print(
        f"demo finished in {seconds:.0f} s; report in {cfg.output_dir}/report.md, plot in "
        f"{cfg.output_dir}/metrics.png"
    )
    if not rep.get("gt_improved", False):
        print(f"ground-truth score did NOT improve ({rep.get('gt_sft')} -> {rep.get('gt_policy')})")
        return 1
    return 0
