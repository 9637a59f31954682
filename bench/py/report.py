"""Reads the JSON lines of one bench/run.sh run and prints the comparisons:
`{"bench": "ratio", ...}` lines (ours / theirs, measured in this run; above
1 means ours is slower) and one `{"bench": "target", ...}` line per target of
issue 5 that this run could judge, with "met": true/false. Only figures
from the same run are compared: the machine is shared and noisy."""

import json
import sys


def load(path):
    lines = []
    with open(path) as f:
        for raw in f:
            raw = raw.strip()
            if raw.startswith("{"):
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError:
                    pass
    return lines


TARGETS = []


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


# Set from the run's machine line: a `--quick` run has too few rounds and
# no repeated pairs to judge targets by.
QUICK = False


def emit(obj):
    if obj.get("bench") == "target":
        if QUICK and obj.get("met") is not None:
            obj = {**obj, "met": None, "reason": "a --quick run: too few rounds to judge"}
        TARGETS.append(obj)
    print(json.dumps(obj), flush=True)


def doubt(line):
    """Why a measured all-reduce line cannot back a verdict, if it cannot:
    a round that left peers out (its time is not an all-reduce's), or a
    result that was not the mean."""
    if line is None:
        return None
    where = f"{line['impl']} {line['peers']}/{line['values']}"
    if line.get("all_rounds_complete") is False:
        return f"{where}: not every round averaged every peer"
    if line.get("correct") is False or line.get("rounds_failed"):
        return f"{where}: a round failed or gave a wrong mean"
    if line.get("compression", "f32") == "f32" and (line.get("max_abs_err") or 0) > 1e-3:
        return f"{where}: the f32 mean was off by {line['max_abs_err']}"
    return None


def judged(target, *lines):
    """`target`, with its verdict withdrawn (and the reason given) when one
    of the lines it rests on cannot back it."""
    reason = next((d for d in map(doubt, lines) if d), None)
    if reason and target.get("met") is not None:
        return {**target, "met": None, "reason": reason}
    return target


def summarise():
    """One human-readable line per target on stderr."""
    for t in TARGETS:
        state = {True: "MET", False: "NOT MET", None: "not judged"}[t["met"]]
        where = ", ".join(f"{k}={t[k]}" for k in ("peers", "values", "threads") if k in t)
        figure = next((f"{k}={t[k]:.3g}" for k in ("ratio", "fraction_of_bound", "speedup")
                       if isinstance(t.get(k), (int, float))), t.get("reason", ""))
        print(f"target {t['name']} [{where}]: {state} ({figure})", file=sys.stderr)


def main():
    global QUICK
    lines = load(sys.argv[1])
    QUICK = any(l.get("bench") == "machine" and l.get("quick") for l in lines)
    # Step lines with the pair they were taken in (bench/run.sh marks each
    # pair of turns with a {"bench":"step_pair"} line; None outside pairs).
    steps, pair = [], None
    for l in lines:
        if l.get("bench") == "step_pair":
            pair = l.get("pair")
        elif l.get("bench") == "step":
            steps.append((pair, l))
    ours_steps = [l for _, l in steps if l["impl"].startswith("p2ptrain")]
    ours_by_pair = {p: l for p, l in steps if p is not None and l["impl"].startswith("p2ptrain")}
    torch_steps = {}
    for p, l in steps:
        if l["impl"] == "pytorch":
            torch_steps.setdefault(l["threads"], []).append((p, l))
    if ours_steps:
        # The thread count our step really uses (CPU time / wall time).
        our_threads = max(1, round(median([l.get("cores_busy") or 1 for l in ours_steps])))
        ours_ms = median([l["ms_median"] for l in ours_steps])
        verdict = None
        for threads, ts in sorted(torch_steps.items()):
            # Runs taken in turns: the median of each pair's ratio is what counts.
            # Runs outside pairs: our median over theirs.
            pairs = [ours_by_pair[p]["ms_median"] / t["ms_median"]
                     for p, t in ts if p is not None and p in ours_by_pair]
            theirs_ms = median([t["ms_median"] for _, t in ts])
            r = median(pairs) if pairs else ours_ms / theirs_ms
            line = {
                "bench": "ratio", "what": "step_ms", "ours": ours_ms, "theirs": theirs_ms,
                "vs": f"pytorch-{threads}-thread", "ratio": r,
                "same_threads": threads == our_threads,
            }
            if pairs:
                line["pair_ratios"] = pairs
            emit(line)
            if threads == our_threads:
                verdict = r
        if verdict is not None:
            emit({
                "bench": "target", "name": "step_within_1.2x_of_pytorch_same_threads",
                "threads": our_threads, "ratio": verdict, "met": verdict <= 1.2,
            })

        bd = [l for l in lines if l.get("bench") == "step_breakdown"]
        ours_bd = next((l for l in bd if l["impl"].startswith("p2ptrain")), None)
        torch_bd = next((l for l in bd if l["impl"] == "pytorch"
                         and l.get("threads") == our_threads), None)
        if ours_bd and torch_bd:
            for phase in ("forward_ms", "backward_ms", "adam_ms"):
                emit({"bench": "ratio", "what": f"step_{phase}", "ours": ours_bd[phase],
                      "theirs": torch_bd[phase], "vs": f"pytorch-{our_threads}-thread",
                      "ratio": ours_bd[phase] / torch_bd[phase]})

    # All-reduce lines with the pair they were taken in (bench/run.sh has raw
    # quinn and ours take turns, marking each pair with an
    # {"bench":"allreduce_pair"} line; None outside pairs).
    ar, ar_pairs, pair = [], [], None
    for l in lines:
        if l.get("bench") == "allreduce_pair":
            pair = l.get("pair")
        elif l.get("bench") == "allreduce":
            ar.append(l)
            ar_pairs.append(pair)

    def runs(impl, peers, values, compression="f32"):
        """(pair, line) of every measured run of one implementation and size."""
        return [(p, l) for p, l in zip(ar_pairs, ar)
                if l["impl"] == impl and l["peers"] == peers and l["values"] == values
                and l.get("compression", "f32") == compression
                and l.get("available", True) and l.get("s_median") is not None]

    def find(impl, peers, values, compression="f32"):
        """One figure per implementation and size: the median over its runs
        (a doubt about any run carries over to it)."""
        found = runs(impl, peers, values, compression)
        if not found:
            return None
        doubtful = next((l for _, l in found if doubt(l)), {})
        return {**found[0][1], **doubtful,
                "s_median": median([l["s_median"] for _, l in found])}

    configs = sorted({(l["peers"], l["values"]) for l in ar})
    for peers, values in configs:
        ours = find("p2ptrain", peers, values)
        ours_int8 = next((l for l in ar if l["impl"] == "p2ptrain" and l["peers"] == peers
                          and l["values"] == values
                          and str(l.get("compression", "")).startswith("int8")), None)
        quinn = find("raw-quinn-pattern", peers, values)
        gloo = find("torch-gloo", peers, values)
        hm = find("hivemind", peers, values)
        key = {"peers": peers, "values": values}
        other_packets = find("raw-quinn-pattern-other-packets", peers, values)
        if quinn and other_packets:
            # What the transport's time would be with other packets (1472:
            # libp2p's own QUIC transport, an internet path): context for the
            # bound, not a target.
            emit({"bench": "ratio", "what": "raw_quinn_s_with_other_packets", **key,
                  "vs": "raw-quinn-pattern",
                  "max_udp_payload": other_packets.get("max_udp_payload"),
                  "ours": other_packets["s_median"], "theirs": quinn["s_median"],
                  "ratio": other_packets["s_median"] / quinn["s_median"]})
        if ours:
            for name, other in (("raw-quinn-pattern", quinn), ("torch-gloo", gloo), ("hivemind", hm)):
                if other:
                    emit({"bench": "ratio", "what": "allreduce_s", **key, "vs": name,
                          "ours": ours["s_median"], "theirs": other["s_median"],
                          "ratio": ours["s_median"] / other["s_median"]})
        if ours and quinn:
            # Runs taken in turns: the median of each pair's fraction is what
            # counts. Runs outside pairs: the medians' fraction.
            ours_by_pair = {p: l["s_median"] for p, l in runs("p2ptrain", peers, values)
                            if p is not None}
            fractions = [l["s_median"] / ours_by_pair[p]
                         for p, l in runs("raw-quinn-pattern", peers, values)
                         if p is not None and p in ours_by_pair]
            frac = median(fractions) if fractions else quinn["s_median"] / ours["s_median"]
            line = {"bench": "target", "name": "allreduce_f32_at_least_60pct_of_raw_quinn",
                    **key, "fraction_of_bound": frac, "met": frac >= 0.6}
            if fractions:
                line["pair_fractions"] = fractions
            emit(judged(line, ours, quinn))
        if ours and hm:
            speedup = hm["s_median"] / ours["s_median"]
            emit(judged({"bench": "target", "name": "allreduce_f32_3x_faster_than_hivemind",
                         **key, "speedup": speedup, "met": speedup >= 3.0}, ours, hm))
        elif ours:
            reason = next((l.get("reason") for l in ar if l["impl"] == "hivemind"
                           and l["peers"] == peers and l["values"] == values), None)
            emit({"bench": "target", "name": "allreduce_f32_3x_faster_than_hivemind",
                  **key, "met": None, "reason": reason or "hivemind not measured"})
        if ours_int8 and gloo and ours_int8.get("s_median") is not None:
            r = ours_int8["s_median"] / gloo["s_median"]
            emit(judged({"bench": "target", "name": "allreduce_int8_within_2x_of_gloo_f32",
                         **key, "compression": ours_int8["compression"], "ratio": r,
                         "met": r <= 2.0}, ours_int8, gloo))

    ttas = [l for l in lines if l.get("bench") == "time_to_accuracy"]
    for peers in sorted({l["peers"] for l in ttas}):
        ours = next((l for l in ttas if l["peers"] == peers and l["impl"] == "p2ptrain"), None)
        if not ours:
            continue
        for impl, name, bound in (
            ("torch-ddp-gloo", "time_to_97_4_peers_no_slower_than_ddp", 1.0),
            ("hivemind-optimizer", "time_to_97_4_peers_2x_faster_than_hivemind", 0.5),
        ):
            theirs = next((l for l in ttas if l["peers"] == peers and l["impl"] == impl), None)
            if not theirs or theirs.get("available") is False:
                continue
            if ours.get("wall_s") and theirs.get("wall_s"):
                emit({"bench": "ratio", "what": "train_wall_s", "peers": peers, "vs": impl,
                      "ours": ours["wall_s"], "theirs": theirs["wall_s"],
                      "ratio": ours["wall_s"] / theirs["wall_s"],
                      "ours_accuracy": ours.get("test_accuracy"),
                      "theirs_accuracy": theirs.get("test_accuracy")})
            mine, other = ours.get("time_to_target_s"), theirs.get("time_to_target_s")
            ratio = mine / other if mine and other else None
            if ratio is not None:
                emit({"bench": "ratio", "what": "time_to_target_s", "peers": peers, "vs": impl,
                      "target": ours.get("target"), "ours": mine, "theirs": other, "ratio": ratio})
            if peers != 4:
                continue
            if ratio is not None:
                emit({"bench": "target", "name": name, "peers": 4, "ratio": ratio,
                      "met": ratio <= bound})
            elif mine and not other:
                emit({"bench": "target", "name": name, "peers": 4, "met": True,
                      "reason": f"{impl} never reached the target; ours did in {mine:.1f} s"})
            else:
                emit({"bench": "target", "name": name, "peers": 4,
                      "met": False if other else None,
                      "reason": "ours never reached the target" if other
                      else "neither reached the target"})


if __name__ == "__main__":
    main()
    summarise()
