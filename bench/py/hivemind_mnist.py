"""hivemind.Optimizer counterpart of `p2ptrain testnet` (loopback, its own
libp2p daemons): N processes train the MNIST MLP 784-256-256-10 with Adam at
the testnet's batch, learning rate and total epochs, each on its 1/N of
every epoch. The settings that match our default (local Adam steps, the
parameters averaged every 10 steps) are hivemind's `use_local_updates=True`
with `target_batch_size = N x batch x 10`: each peer steps locally and the
swarm averages parameters once per hivemind epoch. `matchmaking_time` is
1 s instead of hivemind's 15 s default, which would dominate a run this
short. Averaging is synchronous (`delay_state_averaging=False`): with the
default, each step waited for the last round outside the progress
tracker's pause, so stale progress reports made it estimate the target
batch as reached at once and end an epoch nearly every step (663 epochs in
703 steps at 4 peers). Epochs still end on hivemind's own estimate of the
swarm's progress, so the cadence is about, not exactly, 10 steps; the
tracker refreshes every 0.1 s instead of every 3 s at start, which is
longer than the whole run's compute. Rank 0 evaluates every --eval-every-steps local steps and at the end.
Prints one JSON line; "available": false with the reason if hivemind does not
import or a peer fails."""

import argparse
import json
import time
import traceback

import torch.multiprocessing as mp

from hivemind_procs import failure_reported, hivemind_or_report, run_workers


def worker(rank, a, queue, addrs):
    try:
        import multiprocessing

        # Spawned workers default to spawn; hivemind's helpers need fork.
        multiprocessing.set_start_method("fork", force=True)
        import torch
        import hivemind
        from torch import nn

        import mnist_idx
        from ddp_mnist import accuracy, mlp
        from hivemind_procs import start_dht

        torch.set_num_threads(1)
        started = time.perf_counter()
        dht = start_dht(rank, a.peers, addrs)
        tx, ty, vx, vy = (torch.from_numpy(v) for v in mnist_idx.load(a.data))
        torch.manual_seed(a.seed)
        model = mlp()
        opt = hivemind.Optimizer(
            dht=dht,
            run_id="p2ptrain-bench",
            target_batch_size=a.peers * a.batch * a.average_every,
            batch_size_per_step=a.batch,
            optimizer=lambda params: torch.optim.Adam(params, lr=a.lr),
            params=model.parameters(),
            use_local_updates=True,
            matchmaking_time=a.matchmaking_time,
            averaging_timeout=30.0,
            delay_state_averaging=False,
            tracker_opts=dict(default_refresh_period=0.1, min_refresh_period=0.1),
            verbose=False,
        )
        loss_fn = nn.CrossEntropyLoss()
        g = torch.Generator().manual_seed(a.seed)
        samples, step, reached, reached_step, acc = 0, 0, None, None, None
        steps = len(tx) // a.peers // a.batch
        for epoch in range(a.epochs):
            perm = torch.randperm(len(tx), generator=g)[rank :: a.peers]
            for s in range(steps):
                idx = perm[s * a.batch : (s + 1) * a.batch]
                opt.zero_grad()
                loss_fn(model(tx[idx]), ty[idx]).backward()
                opt.step()
                samples += len(idx)
                step += 1
                last = epoch == a.epochs - 1 and s == steps - 1
                if rank == 0 and (a.eval_every_steps and step % a.eval_every_steps == 0 or last):
                    acc = accuracy(model, vx, vy)
                    if reached is None and acc >= a.target:
                        reached, reached_step = time.perf_counter() - started, step
        wall = time.perf_counter() - started
        queue.put((rank, {
            "wall_s": wall,
            "test_accuracy": acc,
            "samples": samples,
            "hivemind_epochs": opt.local_epoch,
            "time_to_target_s": reached,
            "target_at_step": reached_step,
        }, None))
        opt.shutdown()
        dht.shutdown()
    except Exception as e:  # reported, not hidden
        queue.put((rank, None, f"{type(e).__name__}: {e}"))
        traceback.print_exc()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--average-every", type=int, default=10)
    ap.add_argument("--matchmaking-time", type=float, default=1.0)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-every-steps", type=int, default=50)
    a = ap.parse_args()
    line = {
        "bench": "time_to_accuracy",
        "impl": "hivemind-optimizer",
        "peers": a.peers,
        "epochs": a.epochs,
        "batch": a.batch,
        "lr": a.lr,
        "average_every": a.average_every,
        "matchmaking_time": a.matchmaking_time,
        "target": a.target,
        "eval_every_steps": a.eval_every_steps,
    }
    if not hivemind_or_report(line):
        return
    ctx = mp.get_context("spawn")
    queue, addrs = ctx.Queue(), ctx.Queue()
    t0 = time.perf_counter()
    results = run_workers(ctx, worker, lambda r: (r, a, queue, addrs), a.peers, queue, 3600)
    wall_with_startup = time.perf_counter() - t0
    if failure_reported(line, results, a.peers):
        return
    by_rank = {r: res for r, res, _ in results}
    first = by_rank[0]
    wall = max(res["wall_s"] for res in by_rank.values())
    samples = sum(res["samples"] for res in by_rank.values())
    line.update(
        available=True,
        wall_with_startup_s=wall_with_startup,
        wall_s=wall,
        test_accuracy=first["test_accuracy"],
        samples=samples,
        samples_per_s=samples / wall,
        hivemind_epochs=first["hivemind_epochs"],
        time_to_target_s=first["time_to_target_s"],
        target_at_step=first["target_at_step"],
    )
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
