"""The report of ``benchmarks/retrieval.py``: linear projections (rank-bm25 at the largest size,
ours at Wikipedia's passage count) and the printed tables (speed and memory per backend,
supporting-title recall, ours against rank-bm25)."""
from __future__ import annotations


def _ours(backends: dict) -> dict:
    """Our backend's row: ``bm25``, or ``bm25s`` (its name before the rename) in older results."""
    return backends["bm25"] if "bm25" in backends else backends["bm25s"]


def projections(big: dict, refs: list[dict], project: int) -> dict:
    """rank-bm25 at the big size and ours at ``project`` passages, linear in passages."""
    n = big["passages"]
    ours = _ours(big["backends"])
    ref = max(refs, key=lambda r: r["passages"])
    rb = ref["backends"]["rank_bm25"]
    m = ref["passages"]
    rank_build = rb["build_s"] / m * n
    rank_query_ms = 1000 / rb["single_qps"] / m * n
    f = project / n
    return {
        "rank_bm25_at_size": {"from_passages": m, "build_s": rank_build, "query_ms": rank_query_ms,
                              "build_ratio_to_ours": rank_build / ours["build_s"],
                              "query_ratio_to_ours_single": rank_query_ms / ours["p50_ms"],
                              "query_ratio_to_ours_batched": rank_query_ms / (1000 / ours["batched_qps"])},
        "ours_at_project": {"passages": project, "build_s": ours["build_s"] * f, "disk_mb": ours["disk_mb"] * f,
                            "p50_ms": ours["p50_ms"] * f, "p95_ms": ours["p95_ms"] * f, "batched_qps": ours["batched_qps"] / f,
                            "scratch_mb_per_thread": 8 * project / 2**20},
    }


def table_lines(results: list[dict], proj: dict | None) -> list[str]:
    """The tables and summary lines as markdown (printed by the benchmark, reused by benchmarks.report)."""
    out: list[str] = []
    say = out.append
    cols = ["corpus", "backend", "passages", "build s", "build RSS MB", "disk MB", "load s", "1st query s", "p50 ms", "p95 ms",
            "batched q/s", "query RSS MB (anon)"]
    say("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for res in results:
        for name, r in res["backends"].items():
            say(f"| {res['corpus']} | {name} | {r['passages']:,} | {r['build_s']:.1f} | {r['build_peak_rss_mb']:.0f} | {r['disk_mb']:.0f} | "
                  f"{r['load_s']:.3f} | {r['first_query_s']:.3f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['batched_qps']:.1f} | "
                  f"{r['query_peak_rss_mb']:.0f} ({r['query_rss_anon_mb']:.0f}) |")
    if proj:
        rp, op = proj["rank_bm25_at_size"], proj["ours_at_project"]
        big = results[-1]
        say(f"| {big['corpus']} | rank_bm25 (projected from {rp['from_passages']:,}) | {big['passages']:,} | {rp['build_s']:.0f} | - | - | - | - | "
              f"{rp['query_ms']:.0f} | - | {1000 / rp['query_ms']:.3f} | - |")
        say(f"| projected | bm25 (linear) | {op['passages']:,} | {op['build_s']:.0f} | - | {op['disk_mb']:.0f} | - | - | "
              f"{op['p50_ms']:.1f} | {op['p95_ms']:.1f} | {op['batched_qps']:.1f} | - |")
    recalls = [(res["corpus"], name, r["title_recall"]) for res in results for name, r in res["backends"].items() if "title_recall" in r]
    if recalls:
        say("\n| corpus | backend | recall@1 | recall@3 | recall@10 |\n|---|---|---|---|---|")
        for corpus, name, rec in recalls:
            say(f"| {corpus} | {name} | {rec['recall@1']:.3f} | {rec['recall@3']:.3f} | {rec['recall@10']:.3f} |")
    say("")
    for res in results:
        b = res["backends"]
        if "dense" in b:
            ours = _ours(b)
            say(f"{res['corpus']}, relative to bm25 in this run: batched q/s dense {b['dense']['batched_qps'] / ours['batched_qps']:.3f}x, "
                f"hybrid {b['hybrid']['batched_qps'] / ours['batched_qps']:.3f}x; build time dense "
                f"{b['dense']['build_s'] / ours['build_s']:.0f}x (encoding every passage)")
    for res in results:
        if "overlap_at_10" in res:
            say(f"{res['corpus']}: ours/rank-bm25 batched speed ratio {res['batched_speedup_vs_rank_bm25']:.0f}x "
                  f"(single-query {res['single_speedup_vs_rank_bm25']:.0f}x); top-10 overlap {res['overlap_at_10']:.4f} "
                  f"({res['identical_top10']} identical lists, max relative score difference {res['max_rel_score_diff']:.1e})")
    if proj:
        rp = proj["rank_bm25_at_size"]
        say(f"{results[-1]['corpus']}: rank-bm25 projected build {rp['build_s']:.0f} s = {rp['build_ratio_to_ours']:.1f}x ours; "
              f"projected query {rp['query_ms']:.0f} ms = {rp['query_ratio_to_ours_single']:.0f}x our single-query p50, "
              f"{rp['query_ratio_to_ours_batched']:.0f}x our batched per-query time")
    return out


def print_table(results: list[dict], proj: dict | None) -> None:
    print("\n".join(table_lines(results, proj)))
