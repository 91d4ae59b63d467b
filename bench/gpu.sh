#!/usr/bin/env bash
# Run GPU benchmarks on a lent machine with no network: install the carried wheels (.whl/), then run
# each named benchmark, writing JSON and a log per benchmark into $OUT (or ./bench_results).
#   bash bench/gpu.sh capture saes layers        # names of bench/*.py
set -uo pipefail
out=${OUT:-bench_results}; mkdir -p "$out"
if [ -d .whl ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/pip.log" 2>&1 || { tail -5 "$out/pip.log"; exit 1; }
  # sae-lens imports wandb at module load but never uses it here: an empty module stands in
  mkdir -p /tmp/stub/wandb && : > /tmp/stub/wandb/__init__.py
  export PYTHONPATH=/tmp/site:$PWD:/tmp/stub
fi
export INTERP_HOME=${INTERP_HOME:-/tmp/interp_home} PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for name in "$@"; do
  echo "=== $name"
  start=$(date +%s)
  timeout ${BENCH_TIMEOUT:-480} python3 "bench/$name.py" --out "$out/$name.json" ${BENCH_ARGS:-} 2>&1 \
    | grep -v -i "warn" | tee "$out/$name.log" | tail -25
  echo "--- $name took $(( $(date +%s) - start )) s"
done
