"""What the hivemind benchmarks share: the import check, one DHT per
process on loopback (rank 0 bootstraps the others), and running N spawned
workers that each put one result tuple on a queue."""

import json


def hivemind_or_report(line):
    """Adds hivemind's version to `line` and returns True, or prints `line`
    as unavailable (with the import error) and returns False."""
    try:
        import hivemind

        line["hivemind"] = hivemind.__version__
        return True
    except Exception as e:
        line.update(available=False, reason=f"hivemind does not import: {e}")
        print(json.dumps(line), flush=True)
        return False


def start_dht(rank, world, addrs):
    """Rank 0 starts the DHT and hands its addresses to the other ranks
    through `addrs`; they bootstrap from it. Loopback only."""
    import hivemind

    if rank == 0:
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        for _ in range(world - 1):
            addrs.put(maddrs)
        return dht
    return hivemind.DHT(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addrs.get(timeout=120), start=True
    )


def run_workers(ctx, target, args_of, world, queue, timeout):
    """Starts `world` processes of `target(*args_of(rank))`, waits for one
    result per process on `queue` (a tuple whose last item is an error or
    None), then reaps them. A missing result becomes
    `(None, ..., "no result: ...")`, so callers always get `world` tuples or
    an error among them."""
    procs = [ctx.Process(target=target, args=args_of(r)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(queue.get(timeout=timeout))
    except Exception as e:
        results.append((None, f"no result: {type(e).__name__}"))
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return results


def failure_reported(line, results, world):
    """If a worker failed or gave no result, prints `line` as unavailable
    with the reasons and returns True."""
    errors = [r[-1] for r in results if r[-1]]
    if not errors and len(results) >= world:
        return False
    line.update(available=False, reason="; ".join(errors) or "a peer gave no result")
    print(json.dumps(line), flush=True)
    return True
