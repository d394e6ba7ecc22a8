#!/usr/bin/env bash
# Every check that needs a GPU, in one call (a lent GPU machine's minutes are few): the tests
# marked `gpu`, then CUDA training figures (2 workers x 2 servers on digits, plain and
# --push-early, with the CPU run beside them). On a machine without CUDA the tests are skipped
# and the CUDA runs say so: run it there first to check the script itself.
#   benchmarks/gpu_check.sh            (results also under $OUT, default /tmp/ps-gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ps-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"
timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
for device in cpu cuda; do
  for extra in "" "--push-early"; do
    echo "== ps-launch --device $device $extra" | tee -a "$OUT/train.txt"
    start=$(date +%s.%N)
    timeout 240 $PY -m ps.cli.launch --workers 2 --servers 2 --device "$device" --epochs 3 --eval-every 0 \
      $extra 2>&1 | grep -E "done:|error" | tee -a "$OUT/train.txt"
    echo "wall $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a "$OUT/train.txt"
  done
done
