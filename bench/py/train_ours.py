"""Runs `p2ptrain-bench testnet` (p2ptrain's own testnet command) and tags
its JSON summary as a time_to_accuracy line, with the time to the target
accuracy from its --run-dir evaluations (every --eval-every rounds, i.e.
every 50 local steps at the default 10 steps per round, as the PyTorch and
hivemind counterparts evaluate). Usage:
train_ours.py BIN PEERS DATA [EPOCHS] [TARGET] [DEVICE]"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bytes_to_accuracy import first_crossing

AVERAGE_EVERY = 10
EVAL_EVERY_ROUNDS = 5


def main():
    binary, peers, data = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    epochs = sys.argv[4] if len(sys.argv) > 4 else "3"
    target = float(sys.argv[5]) if len(sys.argv) > 5 else 0.97
    device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
    with tempfile.TemporaryDirectory(prefix="p2ptrain-bench-") as run_dir:
        t0 = time.perf_counter()
        out = subprocess.run(
            [binary, "testnet", "--nodes", str(peers), "--data", data, "--epochs", epochs,
             "--average-every", str(AVERAGE_EVERY), "--eval-every", str(EVAL_EVERY_ROUNDS),
             "--run-dir", run_dir, "--device", device],
            check=True, stdout=subprocess.PIPE, text=True,
        ).stdout
        hit = first_crossing(Path(run_dir), target)
    summary = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    line = {
        "bench": "time_to_accuracy",
        "impl": "p2ptrain",
        "peers": peers,
        "device": device,
        "epochs": float(epochs),
        "batch": 64,
        "lr": 0.003,
        "average_every": AVERAGE_EVERY,
        "target": target,
        "eval_every_steps": AVERAGE_EVERY * EVAL_EVERY_ROUNDS,
        "wall_with_startup_s": time.perf_counter() - t0,
        **{k: v for k, v in summary.items() if k != "nodes"},
        "time_to_target_s": hit["time_s"] if hit else None,
        "target_at_step": hit["step"] if hit else None,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
