#!/usr/bin/env bash
# Run GPU benchmarks on a lent machine with no network: install the carried wheels (.whl/), then run
# each named benchmark, writing JSON and a log per benchmark into $OUT (or ./bench_results).
#   bash bench/gpu.sh capture saes layers        # names of bench/*.py
#   bash bench/gpu.sh hotspots:capture           # NAME:ARG passes ARG first (hotspots.py's target)
# Every benchmark checks its own values against its reference in the same run and ends with a line
# "STATUS <name>: PASS|FAIL ..."; this script prints those lines and exits 1 if any benchmark FAILed,
# crashed, timed out (BENCH_TIMEOUT seconds, default 560) or printed no status.
set -uo pipefail
out=${OUT:-bench_results}; mkdir -p "$out"
wheels=${WHEELS:-.whl}
if [ -d "$wheels" ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    > "$out/pip.log" 2>&1 || { tail -5 "$out/pip.log"; exit 1; }
  # sae-lens imports wandb at module load but never uses it here: an empty module stands in
  mkdir -p /tmp/stub/wandb && : > /tmp/stub/wandb/__init__.py
  export PYTHONPATH=/tmp/site:$PWD:/tmp/stub
fi
export INTERP_HOME=${INTERP_HOME:-/tmp/interp_home} PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
summary=() failed=()
for spec in "$@"; do
  script=${spec%%:*}; target=""; [ "$spec" != "$script" ] && target=${spec#*:}
  name=${spec//:/-}
  echo "=== $name"
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-560}" python3 "bench/$script.py" $target --out "$out/$name.json" ${BENCH_ARGS:-} > "$out/$name.log" 2>&1
  rc=$?
  grep -v -i "warn" "$out/$name.log" | tail -25
  status=$(grep '^STATUS ' "$out/$name.log" | tail -1)
  [ -n "$status" ] || status="STATUS $name: FAIL (no status line)"
  [ "$rc" -eq 124 ] && status="$status [timed out after ${BENCH_TIMEOUT:-560} s]"
  if [ "$rc" -ne 0 ] || [[ "$status" != *": PASS"* ]]; then failed+=("$name"); fi
  summary+=("$status [exit $rc, $(( $(date +%s) - start )) s]")
  echo "--- $name took $(( $(date +%s) - start )) s"
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
