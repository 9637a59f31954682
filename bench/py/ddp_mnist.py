"""PyTorch DDP (gloo, loopback) counterpart of `p2ptrain testnet`: N
processes train the MNIST MLP 784-256-256-10 with Adam, the same batch per
process, learning rate and total epochs as the testnet's defaults, each on
its 1/N of every epoch, gradients all-reduced every step. Evaluates the test
set after every epoch (rank 0). Prints one JSON line."""

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


def worker(rank, a, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=a.peers)
    started = time.perf_counter()
    tx, ty, vx, vy = (torch.from_numpy(v) for v in mnist_idx.load(a.data))
    torch.manual_seed(a.seed)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=a.lr)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(a.seed)
    samples, reached, accuracy, train_s = 0, None, None, 0.0
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
        train_s += time.perf_counter() - t0
        if rank == 0:
            with torch.no_grad():
                accuracy = (model(vx).argmax(1) == vy).float().mean().item()
            if reached is None and accuracy >= a.target:
                reached = time.perf_counter() - started
        dist.barrier()
    wall = time.perf_counter() - started
    total = torch.tensor([samples], dtype=torch.int64)
    dist.all_reduce(total)
    if rank == 0:
        queue.put({
            "wall_s": wall,
            "test_accuracy": accuracy,
            "samples": int(total.item()),
            "samples_per_s": int(total.item()) / wall,
            "training_s": train_s,
            "time_to_target_s": reached,
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
        "wall_with_startup_s": time.perf_counter() - t0,
        **result,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
