# Shell helpers shared by bench/run.sh and bench/gpu.sh (sourced, not run).

# Prints and records (in $RESULTS) the JSON lines a command writes on stdout;
# a failing command becomes an {"bench":"error",...} line instead of ending
# the run. Usage: record WHAT COMMAND [ARGS...]
record() {
  local what="$1"; shift
  local out rc=0
  out="$("$@")" || rc=$?
  local lines
  lines="$(printf '%s\n' "$out" | grep '^{' || true)"
  if [ -n "$lines" ]; then
    printf '%s\n' "$lines" | tee -a "$RESULTS"
  fi
  if [ "$rc" != 0 ]; then
    printf '{"bench":"error","what":"%s","exit_code":%s}\n' "$what" "$rc" | tee -a "$RESULTS"
  fi
}

# The absolute path of MNIST directory $1, or of the bundled subset (with a
# note on stderr) when there is none.
mnist_dir() {
  if [ -d "$1" ]; then
    (cd "$1" && pwd)
  else
    echo "[bench] no MNIST directory at $1; using the bundled subset (node/train/data/mnist)" >&2
    (cd node/train/data/mnist && pwd)
  fi
}
