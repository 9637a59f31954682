#!/usr/bin/env bash
# GPU benchmarks of p2ptrain's CUDA path, side by side in one run with
# PyTorch on the same GPU and with our own CPU path on the same machine:
#
#   bash bench/gpu.sh
#
# Settings come from the environment:
#   BIN    a p2ptrain-bench built with the `cuda` feature (default: build
#          target/bench-opt/p2ptrain-bench with it). burn's CUDA backend needs
#          only the NVIDIA driver and NVRTC at run time, so a GPU machine
#          without Rust can run one built elsewhere.
#   DATA   MNIST IDX directory (default ../shared/data/mnist, else the
#          bundled subset).
#   PYTHON a Python with PyTorch (default python3); PyTorch rows are left out
#          when it has none.
#   STEPS  timed local steps (default 300). TRAIN=0 skips the training runs.
# Prints JSON lines on stdout (tee them to keep them): the machine, the local
# step (ours on CUDA and CPU, PyTorch on CUDA and CPU), time to 97% MNIST
# test accuracy for 1 and 4 peers of ours on CUDA and on the CPU, then ratio
# lines. Relative paths are taken from where it is started.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
[ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] && { sed -n '2,20p' "$SELF"; exit 0; }
BIN="${BIN:+$(realpath "$BIN")}"
DATA="${DATA:+$(realpath "$DATA")}"
ROOT="$(dirname "$SELF")/.."
ROOT="$(cd "$ROOT" && pwd)"
cd "$ROOT"
# shellcheck source=bench/lib.sh
. bench/lib.sh

PY="${PYTHON:-python3}"
STEPS="${STEPS:-300}"
DATA="$(mnist_dir "${DATA:-$ROOT/../shared/data/mnist}")"
log() { echo "[gpu-bench] $*" >&2; }

if [ -z "$BIN" ]; then
  log "building p2ptrain-bench (bench-opt) with the cuda feature"
  cargo build --quiet --config bench/profile.toml --profile bench-opt \
    -p p2ptrain-bench --features cuda >&2
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/bench-opt/p2ptrain-bench"
fi
[ -x "$BIN" ] || { echo "no executable at $BIN" >&2; exit 2; }

RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS"' EXIT

GPU="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)"
printf '{"bench":"machine","cores":%s,"cpu":"%s","gpu":"%s"}\n' "$(nproc)" \
  "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || echo unknown)" \
  "${GPU:-none}" | tee -a "$RESULTS"

log "local step: MLP 784-256-256-10, batch 128, $STEPS steps"
for device in cuda cpu; do
  record "step-ours-$device" "$BIN" step --device "$device" --data "$DATA" --batch 128 --steps "$STEPS"
done
if "$PY" -c 'import torch' 2>/dev/null; then
  record step-torch-cuda env PYTHONPATH=bench/py "$PY" bench/py/step_torch.py \
    --device cuda --data "$DATA" --batch 128 --steps "$STEPS"
  record step-torch-cpu env PYTHONPATH=bench/py "$PY" bench/py/step_torch.py \
    --device cpu --threads "$(nproc)" --data "$DATA" --batch 128 --steps "$STEPS"
else
  log "$PY has no torch: PyTorch rows left out"
fi

if [ "${TRAIN:-1}" != 0 ]; then
  for peers in 1 4; do
    for device in cuda cpu; do
      log "time to 97%: $peers peers of ours on $device"
      record "train-ours-$device-$peers" env PYTHONPATH=bench/py "$PY" bench/py/train_ours.py \
        "$BIN" "$peers" "$DATA" 3 0.97 "$device"
    done
  done
fi

"$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
def pick(bench, **want):
    return next((r for r in rows if r.get("bench") == bench
                 and all(r.get(k) == v for k, v in want.items())), {})
def ratio(what, a, b, key):
    x, y = a.get(key), b.get(key)
    if x and y:
        print(json.dumps({"bench": "ratio", "what": what, "key": key, "ratio": x / y}))
step = {impl: pick("step", impl=impl) for impl in
        ("p2ptrain-burn-cuda", "p2ptrain-burn-ndarray", "pytorch-cuda", "pytorch")}
ratio("step: ours on CUDA / PyTorch on CUDA", step["p2ptrain-burn-cuda"], step["pytorch-cuda"], "ms_median")
ratio("step: ours on CUDA / ours on CPU", step["p2ptrain-burn-cuda"], step["p2ptrain-burn-ndarray"], "ms_median")
ratio("step: ours on CPU / PyTorch on CPU", step["p2ptrain-burn-ndarray"], step["pytorch"], "ms_median")
for peers in (1, 4):
    ratio(f"time to 97%, {peers} peers: CUDA / CPU", pick("time_to_accuracy", device="cuda", peers=peers),
          pick("time_to_accuracy", device="cpu", peers=peers), "time_to_target_s")
EOF
