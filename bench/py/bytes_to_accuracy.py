#!/usr/bin/env python3
"""Bytes and time a testnet run needed to first reach a test accuracy.

Usage: bench/py/bytes_to_accuracy.py --target 0.97 NAME=RUN_DIR:SUMMARY_JSON ...

RUN_DIR is a testnet's --run-dir (its node-0/metrics.jsonl holds the
periodic evaluations of --eval-every), SUMMARY_JSON the file holding the
testnet's final JSON line. Every averaging round of a run sends the same
bytes, so the bytes at the first round whose evaluation reaches the target
are the run's total times that round's share of the rounds. Prints one JSON
line per run, then ratios against the first run.
"""
import argparse
import json
import sys
from pathlib import Path


def first_crossing(run_dir: Path, target: float):
    for line in (run_dir / "node-0" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and (rec.get("accuracy") or 0) >= target:
            return rec
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR:SUMMARY_JSON")
    args = p.parse_args()
    rows = []
    for spec in args.runs:
        name, _, paths = spec.partition("=")
        run_dir, _, summary = paths.partition(":")
        lines = [l for l in Path(summary).read_text().splitlines() if l.startswith("{")]
        final = json.loads(lines[-1])
        hit = first_crossing(Path(run_dir), args.target)
        row = {
            "run": name,
            "target": args.target,
            "final_accuracy": final["test_accuracy"],
            "rounds": final["rounds"],
            "bytes_total": final["bytes_sent"],
        }
        if hit:
            row.update(
                reached_at_round=hit["round"],
                reached_at_step=hit["step"],
                reached_at_s=round(hit["time_s"], 1),
                bytes_to_target=int(final["bytes_sent"] * hit["round"] / final["rounds"]),
            )
        rows.append(row)
        print(json.dumps(row))
    base = rows[0].get("bytes_to_target")
    for row in rows[1:]:
        if base and row.get("bytes_to_target"):
            print(json.dumps({"run": row["run"], "fewer_bytes_than": rows[0]["run"],
                              "ratio": round(base / row["bytes_to_target"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
