#!/usr/bin/env bash
# One prepared script for a lent GPU (15 minutes of device time in all): correctness at full size first,
# then timings, for every kernel. Prints one table per script and writes JSON under $OUT (or ./gpu_out),
# then summarize.py's verdict on each GPU goal of issues 2 and 3 ($OUT/summary.md).
#
#   bash benchmarks/gpu/run.sh            # on the GPU machine
#   bash benchmarks/gpu/run.sh --smoke    # here, on CPU tensors through the Triton interpreter
#
# Record the printed figures with the card's name in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
# The python that holds torch + triton: the project's .venv here, the image's python3 on a bare GPU box.
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python
  elif command -v python3 >/dev/null; then PY=python3
  else PY=python; fi
fi
if [ "${1:-}" = "--smoke" ]; then export TRITON_INTERPRET=1; fi
# A bare GPU box has torch and triton but not rlaif_fast: install it in place, offline, without the C++
# extension (these scripts run only the Triton kernels), so rlaif_fast.kernels maps to kernels/.
if ! "$PY" -c "import rlaif_fast.kernels" 2>/dev/null; then
  echo "== installing rlaif_fast (editable, no deps, no C++ extension)"
  RLAIF_FAST_NO_BUILD_EXT=1 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    > "$OUT/install.log" 2>&1 || { echo "install failed:"; tail -20 "$OUT/install.log"; exit 1; }
fi
"$PY" -c "import triton; print('triton', triton.__version__)" | tee -a "$OUT/device.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tee -a "$OUT/device.txt"
status=0
for script in benchmarks/gpu/bench_ops.py benchmarks/gpu/bench_linear.py; do
  [ -f "$script" ] || { echo "missing $script"; status=1; continue; }
  echo "== $script $*"
  "$PY" "$script" --out "$OUT" "$@" || status=1
done
echo "== benchmarks/bench_gae.py --gpu"
if [ "${1:-}" != "--smoke" ]; then "$PY" benchmarks/bench_gae.py --gpu --out "$OUT" || status=1; fi
echo "== benchmarks/bench_rollout_engine.py (whole RL step, rollout_engine hf vs vllm; needs a CUDA vllm)"
if [ "${1:-}" != "--smoke" ] && "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" benchmarks/bench_rollout_engine.py --repeats 1 --steps 2 | tee "$OUT/rollout_engine.md" || status=1
else echo "skipped (vllm not importable, or --smoke)"; fi
echo "== summary (goals of issues 2 and 3; also in $OUT/summary.md)"
"$PY" benchmarks/gpu/summarize.py "$OUT" --write || status=1
exit $status
