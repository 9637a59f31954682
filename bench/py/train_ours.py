"""Runs `p2ptrain-bench testnet` (p2ptrain's own testnet command) and tags
its JSON summary as a time_to_accuracy line. Usage:
train_ours.py BIN PEERS DATA [EPOCHS]"""

import json
import subprocess
import sys
import time


def main():
    binary, peers, data = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    epochs = sys.argv[4] if len(sys.argv) > 4 else "3"
    t0 = time.perf_counter()
    out = subprocess.run(
        [binary, "testnet", "--nodes", str(peers), "--data", data, "--epochs", epochs],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    summary = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    line = {
        "bench": "time_to_accuracy",
        "impl": "p2ptrain",
        "peers": peers,
        "epochs": float(epochs),
        "batch": 64,
        "lr": 0.003,
        "average_every": 10,
        "wall_with_startup_s": time.perf_counter() - t0,
        **{k: v for k, v in summary.items() if k != "nodes"},
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
