#!/usr/bin/env bash
# p2ptrain benchmark harness (issue 5). One command:
#
#   bash bench/run.sh [--quick] [--data DIR] [--train] [--skip-python] [--skip-hivemind]
#
# Sets up bench/.venv (PyTorch, hivemind) on first use, builds
# p2ptrain-bench, then measures ours and the peers in the same run and prints
# JSON lines on stdout (also saved under bench/results/), ending with ratio
# and target lines. Progress goes to stderr. See bench/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=bench/lib.sh
. bench/lib.sh

QUICK=0
TRAIN=0
SKIP_PY=0
SKIP_HM=0
DATA="$ROOT/../shared/data/mnist"
PROFILE="${BENCH_PROFILE:-bench-opt}"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --train) TRAIN=1 ;;
    --skip-python) SKIP_PY=1 ;;
    --skip-hivemind) SKIP_HM=1 ;;
    --data) DATA="$2"; shift ;;
    --data=*) DATA="${1#--data=}" ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "[bench] $*" >&2; }

DATA="$(mnist_dir "$DATA")"

if [ "$QUICK" = 1 ]; then
  VALUES="1000000 10000000"; ROUNDS=4; STEPS=100; STEP_PAIRS=1; AR_PAIRS=1
else
  VALUES="1000000 10000000 25000000"; ROUNDS=6; STEPS=300; STEP_PAIRS=3; AR_PAIRS=3
fi
PEERS="2 4"

mkdir -p bench/results
RESULTS="bench/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl"
: > "$RESULTS"

# --- machine --------------------------------------------------------------
CPU_MODEL="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || echo unknown)"
# UDP receive buffers decide how often a QUIC burst loses packets (README,
# "Running a node on real machines"): nodes and the raw-quinn processes raise
# their sockets' buffers up to rmem_max. Recorded, not changed.
RMEM_DEFAULT="$(cat /proc/sys/net/core/rmem_default 2>/dev/null || echo null)"
RMEM_MAX="$(cat /proc/sys/net/core/rmem_max 2>/dev/null || echo null)"
printf '{"bench":"machine","cores":%s,"cpu":"%s","mem_gib":%s,"kernel":"%s","rmem_default":%s,"rmem_max":%s,"profile":"%s","quick":%s}\n' \
  "$(nproc)" "$CPU_MODEL" "$(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo)" \
  "$(uname -r)" "$RMEM_DEFAULT" "$RMEM_MAX" "$PROFILE" "$([ "$QUICK" = 1 ] && echo true || echo false)" | tee -a "$RESULTS"

# --- Python side -------------------------------------------------------------
VENV="$ROOT/bench/.venv"
PY="$VENV/bin/python"
setup_venv() {
  if [ -f "$VENV/.bench-ready" ] && "$PY" -c 'import torch' 2>/dev/null; then
    return 0
  fi
  log "setting up $VENV (first run only; pip caches wheels, so a rerun is quick)"
  python3 -m venv "$VENV"
  local pip=("$VENV/bin/pip" --disable-pip-version-check)
  # A CPU-only wheel where PyTorch's own index is reachable; otherwise PyPI's
  # torch, which is the CUDA build (several GB with its nvidia-* packages)
  # but runs on a CPU-only machine. Its import needs those packages' libraries,
  # so `--no-deps` does not work.
  if ! "${pip[@]}" install --timeout 10 --retries 0 \
        --index-url https://download.pytorch.org/whl/cpu torch >&2 2>/dev/null; then
    log "PyTorch's CPU index is unreachable; installing torch from PyPI"
    "${pip[@]}" install torch >&2
  fi
  "${pip[@]}" install numpy >&2
  rm -f "$VENV/hivemind-unavailable"
  if ! "${pip[@]}" install hivemind >"$VENV/hivemind-install.log" 2>&1; then
    tail -3 "$VENV/hivemind-install.log" | tr '\n"' ' ' > "$VENV/hivemind-unavailable"
    log "hivemind did not install: $(cat "$VENV/hivemind-unavailable")"
  fi
  "$PY" -c 'import torch' >&2
  touch "$VENV/.bench-ready"
}
PYRUN=python3
if [ "$SKIP_PY" = 0 ]; then
  setup_venv
  PYRUN="$PY"
fi

# --- Rust side ---------------------------------------------------------------
log "building p2ptrain-bench (profile $PROFILE)"
case "$PROFILE" in
  dev) BUILD=(cargo build -p p2ptrain-bench); OUTDIR=debug ;;
  release) BUILD=(cargo build --release -p p2ptrain-bench); OUTDIR=release ;;
  *) BUILD=(cargo build --config bench/profile.toml --profile "$PROFILE" -p p2ptrain-bench); OUTDIR="$PROFILE" ;;
esac
SWARM=1
if ! "${BUILD[@]}" >&2; then
  # Without p2ptrain-node only the step and raw-quinn benchmarks build.
  log "p2ptrain-bench does not build with p2ptrain-node; building step and quinn only"
  "${BUILD[@]}" --no-default-features >&2
  SWARM=0
fi
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$OUTDIR/p2ptrain-bench"

# --- 1. local step -----------------------------------------------------------
log "local step: MLP 784-256-256-10, batch 128"
# Ours (one thread) and PyTorch at one thread take turns, STEP_PAIRS times:
# one pair on this shared machine can be 30% off either way, so the verdict
# takes the median of the pairs' ratios (bench/py/report.py).
step_torch() {
  record "step-torch-$1" env PYTHONPATH=bench/py "$PY" bench/py/step_torch.py \
    --data "$DATA" --threads "$1" --batch 128 --steps "$STEPS"
}
for pair in $(seq "$STEP_PAIRS"); do
  # Marks which runs belong together, should one of them fail.
  printf '{"bench":"step_pair","pair":%s}\n' "$pair" | tee -a "$RESULTS"
  record step-ours "$BIN" step --data "$DATA" --batch 128 --steps "$STEPS"
  if [ "$SKIP_PY" = 0 ]; then step_torch 1; fi
done
printf '{"bench":"step_pair","pair":null}\n' | tee -a "$RESULTS"
record step-breakdown-ours "$BIN" step-breakdown --batch 128 --steps "$STEPS"
if [ "$SKIP_PY" = 0 ] && [ "$(nproc)" != 1 ]; then step_torch "$(nproc)"; fi

# --- 2. averaging ------------------------------------------------------------
for peers in $PEERS; do
  for values in $VALUES; do
    log "all-reduce: $values f32 values, $peers peers"
    record "codec-$peers-$values" "$BIN" codec --values $((values / peers))
    record "codec-int8-$peers-$values" "$BIN" codec --values $((values / peers)) --compression int8
    # Raw quinn and ours (f32) take turns, AR_PAIRS times: single runs
    # minutes apart moved our fraction of the bound by 20 points on this
    # shared machine, so the verdict takes the median of the pairs'
    # fractions (bench/py/report.py).
    for pair in $(seq "$AR_PAIRS"); do
      printf '{"bench":"allreduce_pair","pair":%s}\n' "$pair" | tee -a "$RESULTS"
      record "quinn-$peers-$values" "$BIN" quinn --peers "$peers" --values "$values" --rounds "$ROUNDS"
      if [ "$SWARM" = 1 ]; then
        record "ours-$peers-$values" "$BIN" allreduce --peers "$peers" --values "$values" --rounds "$ROUNDS"
      fi
    done
    printf '{"bench":"allreduce_pair","pair":null}\n' | tee -a "$RESULTS"
    # For context, not a target: the same pattern with quinn's default
    # packets (at most 1452 bytes), which libp2p's own QUIC transport keeps
    # on every path and an internet path allows (bench/src/quic.rs).
    record "quinn-internet-packets-$peers-$values" "$BIN" quinn --peers "$peers" \
      --values "$values" --rounds "$ROUNDS" --max-udp-payload 1472
    if [ "$SWARM" = 1 ]; then
      record "ours-int8-$peers-$values" "$BIN" allreduce --peers "$peers" --values "$values" \
        --rounds "$ROUNDS" --compression int8
    else
      printf '{"bench":"error","what":"ours-%s-%s","reason":"p2ptrain-node did not build"}\n' \
        "$peers" "$values" | tee -a "$RESULTS"
    fi
    if [ "$SKIP_PY" = 0 ]; then
      record "gloo-$peers-$values" "$PY" bench/py/allreduce_gloo.py --peers "$peers" \
        --values "$values" --rounds "$ROUNDS"
      if [ "$SKIP_HM" = 1 ]; then
        printf '{"bench":"allreduce","impl":"hivemind","peers":%s,"values":%s,"compression":"f32","available":false,"reason":"skipped (--skip-hivemind)"}\n' \
          "$peers" "$values" | tee -a "$RESULTS"
      elif [ -f "$VENV/hivemind-unavailable" ]; then
        printf '{"bench":"allreduce","impl":"hivemind","peers":%s,"values":%s,"compression":"f32","available":false,"reason":"pip install hivemind failed: %s"}\n' \
          "$peers" "$values" "$(cat "$VENV/hivemind-unavailable")" | tee -a "$RESULTS"
      else
        record "hivemind-$peers-$values" timeout 900 "$PY" bench/py/allreduce_hivemind.py \
          --peers "$peers" --values "$values" --rounds "$ROUNDS"
      fi
    fi
  done
done

# --- 3. training (optional, long) ---------------------------------------------
if [ "$TRAIN" = 1 ] && [ "$SWARM" = 1 ]; then
  for peers in 1 2 4; do
    log "training: $peers peers, ours (p2ptrain testnet, 3 epochs)"
    record "train-ours-$peers" env PYTHONPATH=bench/py "$PYRUN" bench/py/train_ours.py "$BIN" "$peers" "$DATA"
    if [ "$SKIP_PY" = 0 ]; then
      log "training: $peers processes, PyTorch DDP (gloo, 3 epochs)"
      record "train-ddp-$peers" env PYTHONPATH=bench/py "$PY" bench/py/ddp_mnist.py \
        --peers "$peers" --data "$DATA"
      if [ "$peers" -gt 1 ] && [ "$SKIP_HM" = 0 ] && [ ! -f "$VENV/hivemind-unavailable" ]; then
        log "training: $peers processes, hivemind.Optimizer (local updates, average every 10 steps)"
        record "train-hivemind-$peers" env PYTHONPATH=bench/py timeout 1800 "$PY" \
          bench/py/hivemind_mnist.py --peers "$peers" --data "$DATA"
      fi
    fi
  done
fi

# --- comparisons ---------------------------------------------------------------
log "comparisons (same run only)"
"$PYRUN" bench/py/report.py "$RESULTS" | tee -a "$RESULTS"
log "results saved in $RESULTS"
