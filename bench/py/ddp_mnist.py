"""PyTorch DDP (gloo, loopback) counterpart of `p2ptrain testnet`: N
processes train the MNIST MLP 784-256-256-10 with Adam, the same batch per
process, learning rate and total epochs as the testnet's defaults, each on
its 1/N of every epoch, gradients all-reduced every step. Evaluates the test
set every --eval-every-steps steps and at the end (rank 0), as the testnet's
--eval-every does, so time to the target is found at the same granularity.
Prints one JSON line."""

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mnist_idx


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlp():
    """The MNIST MLP of p2ptrain's default model (784-256-256-10)."""
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def accuracy(model, vx, vy):
    with torch.no_grad():
        return (model(vx).argmax(1) == vy).float().mean().item()


def worker(rank, a, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=a.peers)
    started = time.perf_counter()
    tx, ty, vx, vy = (torch.from_numpy(v) for v in mnist_idx.load(a.data))
    torch.manual_seed(a.seed)
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=a.lr)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(a.seed)
    samples, reached, reached_step, acc, train_s, step = 0, None, None, None, 0.0, 0
    for epoch in range(a.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(tx), generator=g)[rank :: a.peers]
        # Every rank takes the same number of steps (DDP needs it).
        steps = len(tx) // a.peers // a.batch
        for s in range(steps):
            idx = perm[s * a.batch : (s + 1) * a.batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(ddp(tx[idx]), ty[idx]).backward()
            opt.step()
            samples += len(idx)
            step += 1
            last = epoch == a.epochs - 1 and s == steps - 1
            if a.eval_every_steps and step % a.eval_every_steps == 0 or last:
                if rank == 0:
                    accuracy_now = accuracy(model, vx, vy)
                    if reached is None and accuracy_now >= a.target:
                        reached = time.perf_counter() - started
                        reached_step = step
                    acc = accuracy_now
                dist.barrier()
        train_s += time.perf_counter() - t0
    wall = time.perf_counter() - started
    total = torch.tensor([samples], dtype=torch.int64)
    dist.all_reduce(total)
    if rank == 0:
        queue.put({
            "wall_s": wall,
            "test_accuracy": acc,
            "samples": int(total.item()),
            "samples_per_s": int(total.item()) / wall,
            "training_s": train_s,
            "time_to_target_s": reached,
            "target_at_step": reached_step,
        })
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=1)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-every-steps", type=int, default=50)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=worker, args=(r, a, port, queue)) for r in range(a.peers)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join(timeout=60)
    line = {
        "bench": "time_to_accuracy",
        "impl": "torch-ddp-gloo",
        "peers": a.peers,
        "epochs": a.epochs,
        "batch": a.batch,
        "lr": a.lr,
        "target": a.target,
        "eval_every_steps": a.eval_every_steps,
        "wall_with_startup_s": time.perf_counter() - t0,
        **result,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
