"""Markdown tables from one bench/run.sh results file (for BENCHMARKS.md).
Usage: python bench/py/table.py bench/results/<run>.jsonl"""

import json
import sys


def main():
    lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
    steps = [l for l in lines if l.get("bench") == "step"]
    if steps:
        print("| step (batch 128) | threads | ms median | p10-p90 |")
        print("| --- | --- | --- | --- |")
        for l in steps:
            threads = l.get("threads", round(l.get("cores_busy") or 1))
            print(f"| {l['impl']} | {threads} | {l['ms_median']:.2f} | "
                  f"{l['ms_p10']:.2f}-{l['ms_p90']:.2f} |")
        print()
    bd = [l for l in lines if l.get("bench") == "step_breakdown"]
    if bd:
        print("| phase (ms) | " + " | ".join(
            f"{l['impl']}" + (f" {l['threads']}t" if "threads" in l else "") for l in bd) + " |")
        print("| --- |" + " --- |" * len(bd))
        for k in ("forward_ms", "backward_ms", "adam_ms", "matmuls_only_ms"):
            print(f"| {k[:-3]} | " + " | ".join(
                f"{l[k]:.2f}" if k in l else "" for l in bd) + " |")
        print()
    ar = [l for l in lines if l.get("bench") == "allreduce"]
    if ar:
        impls = ["raw-quinn-pattern", "p2ptrain", "p2ptrain int8", "torch-gloo", "hivemind",
                 "raw-quinn-pattern-other-packets"]
        print("| peers | values | " + " | ".join(impls) + " | bound bytes/peer |")
        print("| --- | --- |" + " --- |" * (len(impls) + 1))
        for peers, values in sorted({(l["peers"], l["values"]) for l in ar}):
            cells = []
            for name in impls:
                impl, comp = (name.split() + ["f32"])[:2]
                found = [x for x in ar if x["impl"] == impl and x["peers"] == peers
                         and x["values"] == values
                         and str(x.get("compression", "f32")).startswith(comp)]
                times = sorted(x["s_median"] for x in found if x.get("s_median") is not None)
                if not found:
                    cells.append("-")
                elif not times:
                    cells.append("n/a")
                else:
                    # Runs taken in turns (run.sh): their median, as report.py uses.
                    n = len(times)
                    mid = times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2
                    cells.append(f"{mid:.3f} s")
            bound = 2 * (peers - 1) / peers * values * 4 / 1e6
            print(f"| {peers} | {values / 1e6:g}M | " + " | ".join(cells) + f" | {bound:.0f} MB |")
        print()
    codec = [l for l in lines if l.get("bench") == "codec"]
    if codec:
        print("| part values | codec | payload encode | wire encode | wire decode | payload decode | total ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for l in codec:
            print(f"| {l['values'] / 1e6:g}M | {l['compression']} | {l['payload_encode_ms']:.1f} | "
                  f"{l['wire_encode_ms']:.1f} | {l['wire_decode_ms']:.1f} | "
                  f"{l['payload_decode_ms']:.1f} | {l['total_ms']:.1f} |")
        print()
    tta = [l for l in lines if l.get("bench") == "time_to_accuracy"]
    if tta:
        print("| training, 3 epochs | peers | wall s | test accuracy | samples/s | time to 97% |")
        print("| --- | --- | --- | --- | --- | --- |")
        for l in tta:
            ttt = l.get("time_to_target_s")
            print(f"| {l['impl']} | {l['peers']} | {l['wall_s']:.1f} | {l['test_accuracy']:.4f} | "
                  f"{l['samples_per_s']:.0f} | {'-' if ttt is None else f'{ttt:.1f} s'} |")
        print()
    targets = [l for l in lines if l.get("bench") == "target"]
    if targets:
        print("| target | where | figure | met |")
        print("| --- | --- | --- | --- |")
        for t in targets:
            where = ", ".join(f"{k} {t[k]}" for k in ("peers", "values", "threads") if k in t)
            fig = next((f"{k} {t[k]:.3g}" for k in ("ratio", "fraction_of_bound", "speedup")
                        if isinstance(t.get(k), (int, float))), t.get("reason", ""))
            print(f"| {t['name']} | {where} | {fig} | {t['met']} |")


if __name__ == "__main__":
    main()
