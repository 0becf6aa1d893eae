"""Hostile-input benchmark: both servers on 127.0.0.1 against a catalogue of bad requests.

    python -m benchmarks.hostile [model=tiny-random|small] [servers=retrieval,model]
                                 [only=NAME,...] [timeouts=5] [out=results/hostile.json]
    python -m benchmarks.hostile model=small 'only="half-open,Content-Length: -1"' timeouts=2

Every option is ``key=value`` on :class:`HostileConfig` (an unknown key is an error that names
it); a value holding ``": "`` is quoted, as above, or it reads as a mapping.

Starts the retrieval server (``python -m corpora.serve --index bundled``) and the model server
(``python -m agents.openai_server --model tiny-random``; ``model=small`` for the real one) on
free loopback ports, replays every case of :data:`benchmarks.hostile_cases.CASES` (the attack
clients and the catalogue live there; this module runs them and reports) against each, one at a
time, and reports per case: the outcome (an HTTP status, or ``closed`` when the server closed the
connection without an answer, as it should for a client too slow to finish its request),
whether it was one of the expected ones, the latency, whether the server still answered
``/health`` afterwards, and its RSS before and after. The last case of each server is SIGTERM:
the exit code and how long it took. Prints a table and writes ``out`` atomically.

Everything is bounded: each case has a timeout, a bounded number of sockets is opened at
once, slow clients stop after ``timeouts`` + 3 s, and the servers run with their default
limits except ``timeouts`` seconds for their ``--idle-timeout``/``--read-timeout`` (default 5, so a
slow client is cut off within seconds instead of 30) and a model ``--request-timeout`` of 2 s
(so the deadline case fits). Only 127.0.0.1 is ever contacted.

Exit code 0 when every case got an expected outcome, no server died and each server's RSS at
the end is within 10% of its baseline, measured on a warm server: after one valid request of
each kind at the largest size the limits allow (the index reads passages lazily, the model
sizes its buffers on the first long prompt). The RSS right after start-up is reported too.
"""
from __future__ import annotations

import http.client
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.hostile_cases import CASES, HOST, WARM_UP, Case, Target, post, request
from common.files import atomic_write_json


@dataclass
class HostileConfig:
    model: str = "tiny-random"  # the model server's --model (tiny-random or small)
    servers: str = "retrieval,model"  # which servers to run, comma-separated
    only: str = ""  # run only the cases whose name contains one of these, comma-separated
    timeouts: float = 5.0  # seconds: the servers' --idle-timeout and --read-timeout
    out: str = "results/hostile.json"


# -- running --------------------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def health(port: int, path: str = "/health") -> bool:
    status, _ = request(port, "GET", path, timeout=10)
    return status == 200


def run_server(name: str, srv, cases: list[Case], timeouts: float, context: int = 0) -> tuple[list[dict], dict]:
    """Each case in turn, with RSS before and after and a /health check after."""
    target = Target(name, srv.port, srv.proc.pid, timeouts, context)
    hpath = "/health"
    rows = []
    for case in cases:
        before = rss_mb(target.pid)
        t0 = time.perf_counter()
        try:
            outcome, detail = case.run(target)
        except Exception as exc:  # noqa: BLE001 - a client-side failure is a result too
            outcome, detail = "client-error", f"{type(exc).__name__}: {exc}"[:160]
        latency = time.perf_counter() - t0
        up = srv.proc.poll() is None and health(target.port, hpath)
        if not up and srv.proc.poll() is None:  # every slot may still be held by the case's sockets
            time.sleep(1)
            up = health(target.port, hpath)
        after = rss_mb(target.pid) if srv.proc.poll() is None else None
        rows.append({"server": name, "case": case.name, "expected": [str(e) for e in case.expect], "outcome": str(outcome),
                     "ok": outcome in case.expect and up, "latency_s": round(latency, 3), "server_up": up,
                     "rss_before_mb": before, "rss_after_mb": after, "detail": detail})
        if not up:
            break
    return rows, {"pid": target.pid}


def start(name: str, model: str, timeouts: float):
    t = str(timeouts)
    if name == "retrieval":
        from corpora.serve import ServerProcess

        args = ["--idle-timeout", t, "--read-timeout", t]
        return ServerProcess("bundled", extra_args=args).start(), args
    from agents.openai_server import ModelServerProcess

    args = ["--threads", "1", "--idle-timeout", t, "--read-timeout", t, "--request-timeout", "2"]
    return ModelServerProcess(model, args).start(), args


def table(rows: list[dict], servers: dict) -> str:
    lines = ["| server | case | expected | got | ok | latency s | up | RSS MB before -> after | detail |",
             "|---|---|---|---|---|---:|---|---|---|"]
    for r in rows:
        after = "-" if r["rss_after_mb"] is None else f"{r['rss_after_mb']:.0f}"
        lines.append(f"| {r['server']} | {r['case']} | {'/'.join(r['expected'])} | {r['outcome']} | {'yes' if r['ok'] else 'NO'} | "
                     f"{r['latency_s']:.2f} | {'yes' if r['server_up'] else 'NO'} | {r['rss_before_mb']:.0f} -> {after} | "
                     f"{r['detail'][:70].replace('|', '/')} |")
    for name, s in servers.items():
        lines.append(f"\n{name}: RSS at start {s['rss_started_mb']:.0f} MB, baseline (warm) {s['rss_baseline_mb']:.0f} MB, at the end {s['rss_final_mb']:.0f} MB "
                     f"({s['rss_change_pct']:+.1f}%), SIGTERM -> exit {s['exit_code']} in {s['stop_s']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.eval import typed_config

    args: HostileConfig = typed_config(sys.argv[1:] if argv is None else argv, HostileConfig)
    wanted = [w for w in args.servers.split(",") if w]
    only = [o.strip().lower() for o in args.only.split(",") if o.strip()]
    t_start = time.perf_counter()
    rows, servers = [], {}
    for name in wanted:
        cases = [c for c in CASES if c.server == name and (not only or any(o in c.name.lower() for o in only))]
        if not cases:
            continue
        srv, server_args = start(name, args.model, args.timeouts)
        try:
            started_rss = rss_mb(srv.proc.pid)
            context = 0
            if name == "model":
                conn = http.client.HTTPConnection(HOST, srv.port, timeout=10)
                conn.request("GET", "/v1/models")
                context = json.loads(conn.getresponse().read())["data"][0]["max_model_len"]
                conn.close()
            for path, body in WARM_UP[name](context):  # the largest valid requests, once: the baseline is a warm server
                post(srv.port, path, body)
            baseline = rss_mb(srv.proc.pid)
            got, _ = run_server(name, srv, cases, args.timeouts, context)
            rows += got
            final = rss_mb(srv.proc.pid) if srv.proc.poll() is None else float("nan")
        finally:
            t0 = time.perf_counter()
            code = srv.stop(timeout=30)
            stop_s = time.perf_counter() - t0
        servers[name] = {"args": server_args, "model": args.model if name == "model" else "bundled index",
                         "rss_started_mb": started_rss, "rss_baseline_mb": baseline, "rss_final_mb": final,
                         "rss_change_pct": round(100 * (final - baseline) / baseline, 1),
                         "exit_code": code, "stop_s": round(stop_s, 2), "context": context or None}
    print(table(rows, servers))
    all_ok = all(r["ok"] for r in rows) and all(
        s["exit_code"] == 0 and abs(s["rss_change_pct"]) <= 10 for s in servers.values())
    out = {"benchmark": "hostile", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                               "platform": platform.platform()},
           "seconds": round(time.perf_counter() - t_start, 1), "all_ok": all_ok, "servers": servers, "cases": rows,
           "summary": {"cases": len(rows), "expected": sum(r["ok"] for r in rows),
                       "server_deaths": sum(not r["server_up"] for r in rows)}}
    atomic_write_json(Path(args.out), out)
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} cases as expected in {out['seconds']} s; wrote {args.out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
