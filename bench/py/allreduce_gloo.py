"""torch.distributed all_reduce (gloo, TCP on loopback) of an f32 vector
among N local processes, then divided by N (a mean, as p2ptrain averages).
Each round starts after a barrier; a round's time is the fastest rank's,
the figure the median over rounds after the first (as for p2ptrain).
Prints one JSON line."""

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, values, rounds, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    t = torch.full((values,), float(rank))
    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        t.div_(world)
        times.append(time.perf_counter() - start)
    expected = (world - 1) / 2.0
    # After the first round every entry is the mean of the ranks, and stays so.
    ok = bool(torch.all((t - expected).abs() < 1e-5))
    queue.put((rank, times, ok))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--values", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, a.peers, a.values, a.rounds, port, queue))
        for r in range(a.peers)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    per_rank = [times for _, times, _ in sorted(results)]
    correct = all(ok for _, _, ok in results)
    per_round = [min(rt[i] for rt in per_rank) for i in range(1, a.rounds)]
    s = statistics.median(per_round)
    bound = 2 * (a.peers - 1) / a.peers * a.values * 4
    print(
        json.dumps(
            {
                "bench": "allreduce",
                "impl": "torch-gloo",
                "torch": torch.__version__,
                "peers": a.peers,
                "values": a.values,
                "compression": "f32",
                "rounds_timed": len(per_round),
                "s_median": s,
                "s_min": min(per_round),
                "s_max": max(per_round),
                "bound_bytes_per_peer": bound,
                "busbw_mb_s": bound / s / 1e6,
                "correct": correct,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
