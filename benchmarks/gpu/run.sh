#!/usr/bin/env bash
# One prepared script for a lent GPU (15 minutes of device time in all): correctness at full size first,
# then timings, for every kernel. Prints one table per script and writes JSON under $OUT (or ./gpu_out).
#
#   bash benchmarks/gpu/run.sh            # on the GPU machine
#   bash benchmarks/gpu/run.sh --smoke    # here, on CPU tensors through the Triton interpreter
#
# Record the printed figures with the card's name in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
PY="${PY:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ "${1:-}" = "--smoke" ]; then export TRITON_INTERPRET=1; fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tee "$OUT/device.txt"
status=0
for script in benchmarks/gpu/bench_ops.py benchmarks/gpu/bench_linear.py; do
  [ -f "$script" ] || { echo "missing $script"; status=1; continue; }
  echo "== $script $*"
  "$PY" "$script" --out "$OUT" "$@" || status=1
done
echo "== benchmarks/bench_gae.py --gpu"
if [ "${1:-}" != "--smoke" ]; then "$PY" benchmarks/bench_gae.py --gpu --out "$OUT" || status=1; fi
exit $status
