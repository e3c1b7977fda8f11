#!/usr/bin/env bash
# On the GPU machine, as ONE run of about 8 minutes (prepare here first: benchmarks/gpu_prepare.sh):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu-shared"], timeout_s=600)
# The prepared GPU presets, each under its own time limit so that one that hangs leaves the others' results:
# bench_optimizers on CUDA, bench_memory's GPU preset, bench_zero3's GPU preset (only with 2 GPUs or more),
# and a short real job through `lomo serve` on CUDA. Everything lands in $OUT (at most 8 files come back):
# nvidia-smi.txt, optimizers.md, memory.md, zero3.md, gpu-job.md, gpu-job.json, logs.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "the wheels did not install" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())" \
  >> "$OUT/nvidia-smi.txt" 2>&1
: > "$OUT/logs.txt"
step() {  # step NAME SECONDS COMMAND...: run it with a limit; its output's tail goes to logs.txt
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "/tmp/$name.log" 2>&1
  local rc=$?
  { echo "=== $name: exit $rc after $((SECONDS - started)) s (limit $limit s)"; tail -40 "/tmp/$name.log"; } >> "$OUT/logs.txt"
}
step optimizers 150 $PY benchmarks/bench_optimizers.py --device cuda --out "$OUT/optimizers.md"
step memory 200 $PY benchmarks/bench_memory.py --preset gpu --out "$OUT/memory.md"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)" -ge 2 ]; then
  step zero3 120 $PY benchmarks/bench_zero3.py --preset gpu --out "$OUT/zero3.md"
else
  echo "=== zero3: skipped (fewer than 2 GPUs)" >> "$OUT/logs.txt"
fi
step job 120 $PY benchmarks/gpu_job.py --device cuda --shared .gpu-shared --out "$OUT/gpu-job.md"
ls -la "$OUT"
