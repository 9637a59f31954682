"""hivemind's DecentralizedAverager averaging an f32 vector among N local
processes (its own libp2p daemon, loopback only). Each round starts after a
multiprocessing barrier, so every peer looks for a group at once; a round is
one `averager.step()` (matchmaking + all-reduce), its time the fastest
peer's, the figure the median over rounds after the first (as for
p2ptrain). Prints one JSON line; if hivemind cannot be imported or a round
fails, prints the line with "available": false and the reason."""

import argparse
import json
import statistics
import time
import traceback

import torch.multiprocessing as mp

from hivemind_procs import failure_reported, hivemind_or_report, run_workers


def worker(rank, world, values, rounds, queue, addrs, barrier):
    try:
        import multiprocessing

        # This worker was spawned, which made spawn its default start method;
        # hivemind starts its own helper processes and needs fork for them.
        multiprocessing.set_start_method("fork", force=True)
        import torch
        import hivemind
        from hivemind_procs import start_dht

        torch.set_num_threads(1)
        dht = start_dht(rank, world, addrs)
        t = torch.full((values,), float(rank))
        averager = hivemind.averaging.DecentralizedAverager(
            [t],
            dht,
            start=True,
            prefix="bench",
            target_group_size=world,
            min_group_size=world,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
        )
        times = []
        for _ in range(rounds):
            barrier.wait(timeout=300)
            start = time.perf_counter()
            out = averager.step(timeout=120)
            times.append(time.perf_counter() - start if out is not None else None)
        with averager.get_tensors() as tensors:
            correct = bool(abs(float(tensors[0][0]) - (world - 1) / 2) < 1e-4)
        queue.put((rank, times, correct, None))
        barrier.wait(timeout=300)
        averager.shutdown()
        dht.shutdown()
    except Exception as e:  # reported, not hidden
        queue.put((rank, None, False, f"{type(e).__name__}: {e}"))
        traceback.print_exc()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--values", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    line = {
        "bench": "allreduce",
        "impl": "hivemind",
        "peers": a.peers,
        "values": a.values,
        "compression": "f32",
    }
    if not hivemind_or_report(line):
        return
    ctx = mp.get_context("spawn")
    queue, addrs, barrier = ctx.Queue(), ctx.Queue(), ctx.Barrier(a.peers)
    results = run_workers(
        ctx, worker, lambda r: (r, a.peers, a.values, a.rounds, queue, addrs, barrier),
        a.peers, queue, 900,
    )
    if failure_reported(line, results, a.peers):
        return
    per_rank = [times for _, times, _, _ in sorted(results, key=lambda r: r[0])]
    per_round = []
    failed = 0
    for i in range(1, a.rounds):
        ts = [rt[i] for rt in per_rank]
        if any(t is None for t in ts):
            failed += 1
        else:
            per_round.append(min(ts))
    if not per_round:
        line.update(available=False, reason=f"all {a.rounds - 1} timed rounds failed")
        print(json.dumps(line), flush=True)
        return
    s = statistics.median(per_round)
    bound = 2 * (a.peers - 1) / a.peers * a.values * 4
    line.update(
        available=True,
        rounds_timed=len(per_round),
        rounds_failed=failed,
        s_median=s,
        s_min=min(per_round),
        s_max=max(per_round),
        bound_bytes_per_peer=bound,
        busbw_mb_s=bound / s / 1e6,
        correct=all(c for _, _, c, _ in results),
    )
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
