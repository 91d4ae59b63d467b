#!/usr/bin/env bash
# Run one script on NPROC GPUs of this machine (one process each), with bench/gpu.sh's setup: the carried
# wheels (.whl/), an offline hub, INTERP_HOME. Run from the repository root, as bench/gpu.sh:
#   bash bench/launch.sh 2 bench/lora_ddp.py --workdir /tmp/two --out two.json --compare /tmp/one
# Uses `accelerate launch` (with --multi_gpu for NPROC > 1), or torchrun where accelerate's launcher is
# missing. CUDA_LAUNCH_BLOCKING is cleared: it serialises every kernel launch and would falsify timings.
set -uo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash bench/launch.sh NPROC SCRIPT.py [ARGS...]  (NPROC: processes, one per GPU, >= 1)" >&2; exit 2
fi
[ -f bench/gpu.sh ] || { echo "run bench/launch.sh from the repository root (no bench/gpu.sh in $PWD)" >&2; exit 2; }
[ -f "$2" ] || { echo "no script '$2' (paths are relative to the repository root)" >&2; exit 2; }
nproc=$1 script=$2; shift 2
# gpu.sh with no benchmark names only sets up: it installs the wheels and exports the environment
# (`set --` first: a sourced file sees this script's arguments as benchmark names otherwise)
args=("$@"); set --
# shellcheck source=bench/gpu.sh
source bench/gpu.sh > /dev/null || exit 1
set -- "${args[@]}"
unset CUDA_LAUNCH_BLOCKING
if python3 -c "import accelerate.commands.launch" 2> /dev/null; then
  multi=(); [ "$nproc" -gt 1 ] && multi=(--multi_gpu)
  exec python3 -m accelerate.commands.launch --num_processes "$nproc" "${multi[@]}" --num_machines 1 \
    --mixed_precision no --dynamo_backend no "$script" "$@"
fi
exec python3 -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$script" "$@"
