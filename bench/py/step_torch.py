"""PyTorch counterpart of `p2ptrain-bench step`: one training step of the
MNIST MLP 784-256-256-10 (batch gather, forward, cross-entropy, backward,
Adam, loss read back), timed per step. Prints one JSON line. With
`--device cuda` the data and model live on the GPU, the loss read back is the
step's synchronisation point, and the CPU-only phase breakdown is skipped."""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch import nn

import mnist_idx


def phase_breakdown(a, model, opt, loss_fn, x_all, y_all):
    """Median forward, backward and Adam times of one fixed batch."""
    x, y = x_all[: a.batch], y_all[: a.batch]
    fwd, bwd, adam = [], [], []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = loss_fn(model(x), y)
        t1 = time.perf_counter()
        out.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= a.warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            adam.append((t3 - t2) * 1e3)
    return {
        "bench": "step_breakdown",
        "impl": "pytorch",
        "threads": a.threads,
        "batch": a.batch,
        "steps": a.steps,
        "forward_ms": statistics.median(fwd),
        "backward_ms": statistics.median(bwd),
        "adam_ms": statistics.median(adam),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    train_x, train_y, _, _ = mnist_idx.load(a.data)
    dev = torch.device(a.device)
    x_all = torch.from_numpy(train_x).to(dev)
    y_all = torch.from_numpy(train_y).to(dev)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(x_all), device=dev)
    cursor = 0

    def step():
        nonlocal cursor
        if cursor + a.batch > len(order):
            cursor = 0
        idx = order[cursor : cursor + a.batch]
        cursor += a.batch
        x, y = x_all[idx], y_all[idx]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step()
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    loss = float("nan")
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - wall0
    cores_busy = (time.process_time() - cpu0) / wall
    # Phase by phase on one fixed batch, as `p2ptrain-bench step-breakdown`
    # does; on a GPU the phases run asynchronously, so only the CPU has one.
    breakdown = None
    if a.device == "cpu":
        breakdown = phase_breakdown(a, model, opt, loss_fn, x_all, y_all)
    times.sort()
    print(
        json.dumps(
            {
                "bench": "step",
                "impl": "pytorch" if a.device == "cpu" else "pytorch-cuda",
                "device": a.device,
                "torch": torch.__version__,
                "threads": a.threads,
                "model": "mlp",
                "batch": a.batch,
                "steps": a.steps,
                "ms_median": statistics.median(times),
                "ms_mean": statistics.fmean(times),
                "ms_p10": times[int(0.1 * (len(times) - 1))],
                "ms_p90": times[int(0.9 * (len(times) - 1))],
                "cores_busy": cores_busy,
                "final_loss": loss,
            }
        ),
        flush=True,
    )
    if breakdown is not None:
        print(json.dumps(breakdown), flush=True)


if __name__ == "__main__":
    main()
