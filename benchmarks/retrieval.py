"""Retrieval at scale: build, memory, disk, load and query speed of our BM25 index, against rank-bm25,
with dense and hybrid retrieval beside them on the bundled corpus.

    python -m benchmarks.retrieval size=5000000                   # the issue-5 scale run
    python -m benchmarks.retrieval size=0 ref_sizes=              # bundled corpus only (BM25, dense, hybrid)
    python -m benchmarks.retrieval size=200000 ref_sizes=20000 out=results/retrieval_200k.json
    python -m benchmarks.retrieval size=0 ref_sizes= bundled_limit=300 queries=50 single=20  # a smoke run

Every option is ``key=value`` on :class:`RetrievalConfig` (an unknown key is an error that names
it); ``ref_sizes`` is a comma list (``ref_sizes=100000,200000``), empty for none.

Rows (each build and each query phase runs in a fresh spawned process, so its peak RSS is its
own; peak RSS is ``VmHWM`` and counts memory-mapped index pages that were touched, the
query phase also reports anonymous memory, ``RssAnon``, at its end):

* ``bundled-22980`` (unless ``bundled=false``): the packaged corpus, ours (``bm25``) and
  rank-bm25, and (unless ``dense=false``) ``dense`` (the embedded all-MiniLM-L6-v2 or
  ``dense_model``, faiss ``dense_faiss``: ``flat`` or ``hnsw``) and
  ``hybrid`` (BM25 + dense by reciprocal rank fusion, k=60); the hybrid row queries the dense
  row's folder (which holds both), so its build figures are the dense build's. Each of bm25,
  dense and hybrid gets supporting-title recall@1/3/10 on the HotpotQA subset (its 500 questions
  as queries, the share of their ``supporting_titles`` among the top-k hits' titles).
  ``bundled_limit=N`` takes the first N passages only (for a quick check);
* ``synthetic-R`` for each ``ref_sizes`` R (default 100k, 200k): ours and rank-bm25 on the
  same corpus and queries; top-10 overlap and identical lists between them;
* ``synthetic-SIZE`` (``size``, 0 for none): ours only. rank-bm25 cannot be built at millions of passages here (it
  keeps a dict per passage and scores every passage in Python), so its build and query costs
  are projected linearly from the largest reference size (both are linear in passages) and
  printed with the ratio to ours;
* a projection of ours to ``project`` passages (default 21M, Wikipedia's 100-word
  passages): build time and disk linear in passages; query latency linear in postings
  touched, i.e. in passages for a fixed word distribution.

Per backend: build wall time and peak RSS, disk size, load time, first-query time, single-query
p50/p95 latency (``single`` queries one at a time), batched queries/s (one ``search`` call for
``queries`` queries), query-phase peak RSS. rank-bm25 answers ``ref_queries`` queries (0: 100
bundled, 20 synthetic).

``reuse_builds=JSON`` re-measures the query side on indexes an earlier run built (its build
figures are copied from that run's JSON and marked ``build_reused_from``).

Synthetic corpus (``benchmarks/synthetic.py``): Zipfian vocabulary (100k words, exponent 1.07 over ranks 51+, the head
standing for stop words, so the commonest term is in ~28% of passages, as in real text),
60-140 words per passage; streamed to the cache in 10k-passage blocks, each from its own seed,
so a smaller corpus is a prefix of a larger one. Queries: 3-6 words drawn from passages of the
first 100k. Prints a table and writes JSON (``out``). The machine may be shared: the load
average before and after is recorded.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.retrieval_report import print_table, projections
from benchmarks.synthetic import synthetic_corpus, synthetic_queries
from common.files import atomic_write_json, cache_root


def _status_mb(field: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (reset at exec, unlike ru_maxrss, which keeps the parent's)."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_anon_mb() -> float:
    anon = _status_mb("RssAnon")
    return anon if anon is not None else float("nan")


DENSE_KINDS = ("dense", "hybrid")
DENSE: dict = {"model": None, "faiss": "flat"}  # dense_model, dense_faiss (read by the build worker)
OURS = "bm25"  # our backend (corpora.index; "bm25s" before the rename, in older results and folders)


@dataclass
class RetrievalConfig:
    size: int = 1_000_000  # synthetic corpus size for ours only (0: skip)
    ref_sizes: Optional[str] = "100000,200000"  # sizes run with both backends, comma-separated (empty: none)
    queries: int = 2000  # queries for the batched measurement
    single: int = 300  # queries timed one at a time (ours)
    ref_queries: int = 0  # queries for rank-bm25 (0: 100 bundled, 20 synthetic)
    project: int = 21_000_000  # passages to project ours to
    bundled: bool = True  # the bundled corpus rows
    bundled_limit: int = 0  # only the first N bundled passages (0: all; for a quick check)
    dense: bool = True  # the dense and hybrid rows
    dense_model: Optional[str] = None  # encoder for the dense rows (default: the embedded all-MiniLM-L6-v2)
    dense_faiss: str = "flat"  # flat or hnsw
    reuse_builds: Optional[str] = None  # skip builds whose index folder exists; build figures from this earlier out JSON
    out: str = "results/retrieval.json"


def parse_args(argv: list[str]) -> tuple[RetrievalConfig, list[int]]:
    """The config and its ``ref_sizes`` as a list of ints."""

    from benchmarks.eval import typed_config

    cfg: RetrievalConfig = typed_config(argv, RetrievalConfig, {"dense_faiss": ("flat", "hnsw")})
    try:
        ref_sizes = [int(x) for x in (cfg.ref_sizes or "").split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: bad value for 'ref_sizes': {cfg.ref_sizes!r}; a comma list of passage counts") from None
    return cfg, ref_sizes


def _build_worker(corpus: str, out_dir: str, backend: str, pages: str | None, total: int | None, progress: bool,
                  dense: dict, q) -> None:
    from corpora.index import build_index

    t0 = time.perf_counter()
    if backend in DENSE_KINDS:
        from corpora.dense import FaissParams, build_dense_index
        from corpora.encoder import DEFAULT_ENCODER, Encoder

        build_dense_index(corpus, out_dir, kind=backend, encoder=Encoder(dense["model"] or DEFAULT_ENCODER),
                          faiss_params=FaissParams(dense["faiss"]), pages=pages, show_progress=progress, total=total)
    else:
        build_index(corpus, out_dir, backends=(backend,), pages=pages, show_progress=progress, total=total)
    q.put({"build_s": time.perf_counter() - t0, "build_peak_rss_mb": _peak_rss_mb()})


def _title_recall(idx, recall_qs: list[tuple[str, list[str]]], ks=(1, 3, 10)) -> dict:
    """Share of each question's supporting titles among the titles of its top-k hits, averaged."""
    hits = idx.search([qt for qt, _ in recall_qs], k=max(ks))
    return {f"recall@{k}": float(np.mean([sum(t in {h.title for h in hs[:k]} for t in titles) / len(titles)
                                          for (_, titles), hs in zip(recall_qs, hits)])) for k in ks}


def _query_worker(index_dir: str, backend: str, queries: list[str], n_single: int, batch: bool,
                  recall_qs: list | None, q) -> None:
    from corpora.retrievers import open_index

    t0 = time.perf_counter()
    idx = open_index(index_dir, backend)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx.search_ids([queries[0]], k=10)  # a dense index loads its encoder here
    first_s = time.perf_counter() - t0
    lat, ranked = [], []
    for qtext in queries[:n_single]:
        t0 = time.perf_counter()
        ranked.append(idx.search_ids([qtext], k=10)[0])
        lat.append(time.perf_counter() - t0)
    out = {
        "load_s": load_s,
        "first_query_s": first_s,
        "p50_ms": 1000 * float(np.percentile(lat, 50)),
        "p95_ms": 1000 * float(np.percentile(lat, 95)),
        "single_qps": len(lat) / sum(lat),
        "n_single": len(lat),
        "top10": ranked,
    }
    if batch:
        idx.search_ids(queries[:64], k=10)  # warm the parallel kernel
        t0 = time.perf_counter()
        idx.search_ids(queries, k=10)
        out["batched_qps"] = len(queries) / (time.perf_counter() - t0)
        out["n_batched"] = len(queries)
    else:
        out["batched_qps"] = out["single_qps"]  # no batch API: a batch is a loop
        out["n_batched"] = len(lat)
    if recall_qs:
        out["title_recall"] = _title_recall(idx, recall_qs)
    out["query_peak_rss_mb"] = _peak_rss_mb()
    out["query_rss_anon_mb"] = _rss_anon_mb()
    q.put(out)


def _in_child(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"benchmark worker {fn.__name__} failed with exit code {p.exitcode}")
    return res


def _disk_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


REUSE: dict[tuple[str, str], dict] = {}  # (corpus, backend) -> build figures of an earlier run (reuse_builds)


def bench_backend(name: str, backend: str, corpus: str, queries: list[str], n_single: int, batch: bool, workdir: Path,
                  pages: str | None = None, total: int | None = None, progress: bool = False,
                  recall_qs: list | None = None, build_from: str | None = None) -> dict:
    """Build (in a child) and query (in another) one backend's index. ``build_from``: query the
    index folder of that backend's row instead of building one (hybrid on the dense folder)."""
    out_dir = workdir / f"{name}-{build_from or backend}"
    legacy = workdir / f"{name}-bm25s"  # our folders before the backend was renamed bm25
    if (name, backend) in REUSE and backend == OURS and not (out_dir / "meta.json").exists() \
            and (legacy / "meta.json").exists():
        out_dir = legacy
    if build_from:
        b = {}
        print(f"[{name}] {backend}: querying the {build_from} index folder ...", flush=True)
    elif (name, backend) in REUSE and (out_dir / "meta.json").exists():
        b = dict(REUSE[(name, backend)])
        print(f"[{name}] {backend}: reusing the index built by an earlier run ({b['build_s']:.1f} s, peak RSS "
              f"{b['build_peak_rss_mb']:.0f} MB); querying ...", flush=True)
    else:
        print(f"[{name}] building {backend} index ...", flush=True)
        b = _in_child(_build_worker, corpus, str(out_dir), backend, pages, total, progress, DENSE)
        print(f"[{name}] {backend}: built in {b['build_s']:.1f} s, peak RSS {b['build_peak_rss_mb']:.0f} MB; querying ...", flush=True)
    qr = _in_child(_query_worker, str(out_dir), backend, queries, n_single, batch, recall_qs)
    qr.update(b)
    qr["disk_mb"] = _disk_mb(out_dir)
    qr["passages"] = json.loads((out_dir / "meta.json").read_text())["num_passages"]
    return qr


def compare(fast: dict, ref: dict) -> dict:
    """Top-10 agreement on the queries both answered: overlap, identical id lists, max score gap."""
    n = min(len(fast["top10"]), len(ref["top10"]))
    pairs = list(zip(fast["top10"][:n], ref["top10"][:n]))
    overlap = [len({i for i, _ in a} & {i for i, _ in b}) / len(b) for a, b in pairs if b]
    identical = sum([i for i, _ in a] == [i for i, _ in b] for a, b in pairs)
    gaps = [abs(sa - sb) / max(abs(sb), 1e-9) for a, b in pairs if [i for i, _ in a] == [i for i, _ in b] for (_, sa), (_, sb) in zip(a, b)]
    return {"overlap_at_10": float(np.mean(overlap)) if overlap else None, "identical_top10": f"{identical}/{n}",
            "max_rel_score_diff": float(max(gaps)) if gaps else None}


def bench_pair(name: str, corpus: str, queries: list[str], n_single: int, ref_queries: int, workdir: Path, pages: str | None = None,
               recall_qs: list | None = None) -> dict:
    fast = bench_backend(name, OURS, corpus, queries, n_single, True, workdir, pages, recall_qs=recall_qs)
    ref = bench_backend(name, "rank_bm25", corpus, queries, ref_queries, False, workdir, pages)
    cmp = compare(fast, ref)
    for r in (fast, ref):
        r.pop("top10")
    return {"corpus": name, "passages": fast["passages"], "backends": {OURS: fast, "rank_bm25": ref}, **cmp,
            "batched_speedup_vs_rank_bm25": fast["batched_qps"] / ref["batched_qps"],
            "single_speedup_vs_rank_bm25": fast["single_qps"] / ref["single_qps"]}


def bench_dense(res: dict, corpus: str, queries: list[str], n_single: int, workdir: Path, pages: str | None,
                recall_qs: list | None) -> None:
    """Add ``dense`` and ``hybrid`` rows to a bench_pair result (one dense build; hybrid queries it)."""
    name = res["corpus"]
    dense = bench_backend(name, "dense", corpus, queries, n_single, True, workdir, pages, recall_qs=recall_qs)
    hybrid = bench_backend(name, "hybrid", corpus, queries, n_single, True, workdir, pages, recall_qs=recall_qs,
                           build_from="dense")
    for key in ("build_s", "build_peak_rss_mb"):
        hybrid[key] = dense[key]
    hybrid["build_shared_with"] = "dense"
    meta = json.loads((workdir / f"{name}-dense" / "meta.json").read_text())
    dense["encoder"] = {k: meta["dense"].get(k) for k in ("model", "dim", "index", "encode_seconds", "passages_per_second")}
    hybrid["fusion"] = meta["fusion"]
    for r in (dense, hybrid):
        r.pop("top10")
    res["backends"].update(dense=dense, hybrid=hybrid)


def bundled_slice(limit: int, workdir: Path) -> Path:
    """The first ``limit`` bundled passages as a JSONL file (for a quick run)."""
    from corpora.corpus import BUNDLED_PASSAGES, data_path, iter_passages

    path = workdir / f"bundled-first-{limit}.jsonl"
    if not path.exists():
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as fh:
            for i, p in enumerate(iter_passages(data_path(BUNDLED_PASSAGES))):
                if i >= limit:
                    break
                fh.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n")
        os.replace(path.with_suffix(".tmp"), path)
    return path


def load_reuse(path: str) -> None:
    """Fill ``REUSE`` with the build figures of an earlier run's JSON (``reuse_builds``)."""
    from corpora.index import canonical_backend

    for res in json.loads(Path(path).read_text())["results"]:
        for backend, r in res["backends"].items():
            REUSE[(res["corpus"], canonical_backend(backend))] = {"build_s": r["build_s"], "build_peak_rss_mb": r["build_peak_rss_mb"],
                                               "build_reused_from": path}


def bench_bundled(args: RetrievalConfig, workdir: Path) -> dict:
    """The bundled corpus row (or its first ``bundled_limit`` passages): ours and rank-bm25,
    then dense and hybrid unless ``dense=false``, with HotpotQA supporting-title recall."""
    from corpora.corpus import BUNDLED_PAGES, BUNDLED_PASSAGES, data_path
    from corpora.qa import load_qa

    hotpot = load_qa("hotpotqa")
    recall_qs = [(q["question"], q["supporting_titles"]) for q in hotpot]
    qs = [q["question"] for q in hotpot] + [q["question"] for q in load_qa("nq")]
    corpus, pages, name = str(data_path(BUNDLED_PASSAGES)), str(data_path(BUNDLED_PAGES)), "bundled-22980"
    if args.bundled_limit:
        corpus, pages, name = str(bundled_slice(args.bundled_limit, workdir)), None, f"bundled-first-{args.bundled_limit}"
    res = bench_pair(name, corpus, qs[: args.queries], min(args.single, len(qs)), args.ref_queries or 100, workdir,
                     pages, recall_qs)
    if args.dense:
        bench_dense(res, corpus, qs[: args.queries], min(args.single, len(qs)), workdir, pages, recall_qs)
    return res


def bench_synthetic(args: RetrievalConfig, ref_sizes: list[int], sizes: list[int],
                    workdir: Path) -> tuple[list[dict], list[dict], dict | None, float]:
    """The synthetic rows: ours and rank-bm25 at each of ``ref_sizes``, ours alone at ``size``.
    Returns (rows, the reference rows, the ours-only row or None, corpus generation seconds)."""
    results, refs, big = [], [], None
    t0 = time.perf_counter()
    largest = synthetic_corpus(max(sizes))
    gen_s = time.perf_counter() - t0
    queries = synthetic_queries(largest, args.queries)
    for r in sorted(ref_sizes):
        refs.append(bench_pair(f"synthetic-{r}", str(synthetic_corpus(r)), queries, args.single, args.ref_queries or 20, workdir))
        results.append(refs[-1])
    if args.size and args.size not in ref_sizes:
        fast = bench_backend(f"synthetic-{args.size}", OURS, str(largest), queries, args.single, True, workdir,
                             total=args.size, progress=True)
        fast.pop("top10")
        big = {"corpus": f"synthetic-{args.size}", "passages": fast["passages"], "backends": {OURS: fast}}
        results.append(big)
    return results, refs, big, gen_s


def main(argv: list[str] | None = None) -> None:
    args, ref_sizes = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.reuse_builds:
        load_reuse(args.reuse_builds)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    workdir = cache_root() / "bench-indexes"
    workdir.mkdir(parents=True, exist_ok=True)
    results, refs, big = [], [], None
    DENSE.update(model=args.dense_model, faiss=args.dense_faiss)
    recall = None
    if args.bundled:
        results.append(bench_bundled(args, workdir))
        recall = results[-1]["backends"][OURS]["title_recall"]
    sizes = sorted(set(ref_sizes + ([args.size] if args.size else [])))
    if sizes:
        rows, refs, big, gen_s = bench_synthetic(args, ref_sizes, sizes, workdir)
        results += rows
    proj = projections(big, refs, args.project) if big and refs else None
    print_table(results, proj)
    if sizes:
        print(f"synthetic corpus generation (or cache hit) for {max(sizes):,} passages: {gen_s:.0f} s")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (2-core machine shared with other jobs: timings are lower bounds); "
          f"total {time.perf_counter() - t_start:.0f} s")
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "args": {**asdict(args), "ref_sizes": ref_sizes},
        "results": results,
        "projections": proj,
        "hotpotqa_title_recall": recall,
    }
    atomic_write_json(Path(args.out), report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
