"""Load test of the retrieval server: N concurrent clients, Search-R1 requests, a fixed count.

    python -m benchmarks.server_load [url=http://127.0.0.1:8000] [clients=64] [requests=2000]
                                     [topk=3] [out=results/server_load.json]
    python -m benchmarks.server_load clients=16 client_procs=2 compare_unbatched=true

Every option is ``key=value`` on :class:`ServerLoadConfig` (an unknown key is an error that
names it). Without ``url`` it starts ``python -m corpora.serve --index bundled`` (``index=`` to
change) on a free loopback port and stops it at the end; ``server_args`` passes options to it,
e.g. ``server_args="--max-batch 1"`` to see the server without micro-batching
(``compare_unbatched=true`` adds that run to the micro-batched one). Each request is one
real HotpotQA question (``corpora.qa.load_qa('hotpotqa')``, cycled) with ``topk`` 3 and
``return_scores`` true, sent by plain ``requests`` from ``clients`` threads (one keep-alive
session each; spread over ``client_procs`` processes) that together send ``requests`` requests.
Prints a table (throughput, latency p50/p90/p99/max, errors, the server's mean batch size) and
writes the same as JSON to ``out``.
Client threads and the server share the machine's cores, so the figures are a lower bound for
a server with a machine of its own.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests

from common.files import atomic_write_json
from corpora.qa import load_qa


@dataclass
class ServerLoadConfig:
    url: Optional[str] = None  # an already running server; empty: start one
    index: str = "bundled"  # the started server's --index
    clients: int = 64
    requests: int = 2000
    topk: int = 3
    client_procs: int = 1  # spread the client threads over this many processes
    server_args: str = ""  # options for the started server, one string, e.g. "--max-batch 1"
    compare_unbatched: bool = False  # also run a server with --max-batch 1
    out: str = "results/server_load.json"


def percentile(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return float("nan")
    i = min(len(sorted_ms) - 1, max(0, int(round(p / 100.0 * (len(sorted_ms) - 1)))))
    return sorted_ms[i]


def _drive_threads(url: str, queries: list[str], clients: int, indices: list[int], topk: int, timeout: float) -> dict:
    """One process: ``clients`` threads share the request indices; raw latencies and errors."""
    counter = iter(indices)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = threading.Barrier(clients + 1)

    def client() -> None:
        session = requests.Session()
        start.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            payload = {"queries": [queries[i % len(queries)]], "topk": topk, "return_scores": True}
            t0 = time.perf_counter()
            try:
                r = session.post(url + "/retrieve", json=payload, timeout=timeout)
                ok = r.status_code == 200 and len(r.json()["result"][0]) <= topk
                why = "" if ok else f"HTTP {r.status_code}"
            except (requests.RequestException, ValueError, KeyError) as exc:
                ok, why = False, type(exc).__name__
            dt = 1000 * (time.perf_counter() - t0)
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    errors[why] = errors.get(why, 0) + 1
        session.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t_start = time.time()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors, "start": t_start, "end": time.time()}


def drive(url: str, queries: list[str], clients: int, n_requests: int, topk: int, procs: int = 1, timeout: float = 60.0) -> dict:
    """Send ``n_requests`` one-query requests from ``clients`` threads (spread over ``procs``
    client processes, so that the client's own GIL is not what is measured)."""
    if procs <= 1:
        parts = [_drive_threads(url, queries, clients, list(range(n_requests)), topk, timeout)]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(procs, mp_context=mp.get_context("fork")) as pool:
            futs = [pool.submit(_drive_threads, url, queries, max(1, clients // procs), list(range(p, n_requests, procs)), topk, timeout)
                    for p in range(procs)]
            parts = [f.result() for f in futs]
    lat = sorted(x for p in parts for x in p["latencies"])
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    return {
        "requests": n_requests, "clients": clients, "client_processes": max(1, procs), "topk": topk, "ok": len(lat),
        "errors": sum(errors.values()), "error_kinds": errors, "seconds": round(wall, 3),
        "throughput_rps": round(len(lat) / wall, 1),
        "latency_ms": {"p50": round(percentile(lat, 50), 2), "p90": round(percentile(lat, 90), 2),
                       "p99": round(percentile(lat, 99), 2), "max": round(lat[-1], 2) if lat else None,
                       "mean": round(sum(lat) / len(lat), 2) if lat else None},
    }


def table(rows: list[dict]) -> str:
    head = "| server | clients (procs) | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | queries/batch |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {r['label']} | {r['clients']} ({r['client_processes']}) | {r['requests']} | {r['throughput_rps']:.1f} | {lat['p50']:.1f} | "
                     f"{lat['p90']:.1f} | {lat['p99']:.1f} | {lat['max']:.1f} | {r['errors']} | {r.get('mean_queries_per_batch', '-')} |")
    return "\n".join(lines)


def run_one(args: ServerLoadConfig, queries: list[str], label: str, server_args: list[str]) -> dict:
    from corpora.serve import ServerProcess

    srv = None
    url = args.url
    if not url:
        srv = ServerProcess(args.index, extra_args=["--log-every", "5", *server_args]).start()
        url = srv.url
    try:
        requests.post(url + "/retrieve", json={"queries": queries[:8], "topk": args.topk}, timeout=60)  # warm-up
        before = requests.get(url + "/health", timeout=10).json()
        res = drive(url, queries, args.clients, args.requests, args.topk, args.client_procs)
        after = requests.get(url + "/health", timeout=10).json()
    finally:
        if srv:
            srv.stop()
    b0, b1 = before["batcher"], after["batcher"]
    batches = b1["batches"] - b0["batches"]
    res.update(label=label, url=url, server_args=server_args, num_passages=after.get("num_passages"),
               index_calls=batches, mean_queries_per_batch=round((b1["queries"] - b0["queries"]) / max(batches, 1), 2))
    return res


def main(argv: list[str] | None = None) -> int:
    from benchmarks.eval import typed_config

    args: ServerLoadConfig = typed_config(sys.argv[1:] if argv is None else argv, ServerLoadConfig)
    queries = [q["question"] for q in load_qa("hotpotqa")]
    runs = [run_one(args, queries, "micro-batched" if not args.url else args.url, shlex.split(args.server_args))]
    if args.compare_unbatched and not args.url:
        runs.append(run_one(args, queries, "no batching (--max-batch 1)", [*shlex.split(args.server_args), "--max-batch", "1"]))
    print(table(runs))
    out = {"benchmark": "server_load", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                   "platform": platform.platform()}, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), out)
    print(f"wrote {args.out}")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
