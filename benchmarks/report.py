"""``python -m benchmarks.report``: the results pages and plots, regenerated from ``results/``.

Reads every results file the benchmarks write and writes ``docs/results.md`` (one section per
benchmark, each table with the file it came from) and its plots under ``docs/img/``: rollout
speed against plain generation, learning curves, grader AUROC. Nothing here measures anything:
a section whose results file is missing says so.
"""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

from common.files import save_figure

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(x, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def evaluation(results: Path) -> list[str]:
    out = ["## Evaluation (`python -m benchmarks.eval`)", "",
           "| results | model | retriever | dataset | episodes | EM | F1 | avg turns | answered |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(results.glob("eval_*/summary.json")):
        d = _load(p)
        conf = (d or {}).get("config", {})
        retriever = Path(conf.get("retriever", "bundled")).name  # an index folder by its name
        if (conf.get("env_kwargs") or {}).get("backend"):
            retriever += f" as {conf['env_kwargs']['backend']}"
        for ds, s in (d or {}).get("summary", {}).items():
            if s.get("episodes"):
                out.append(f"| `{p.relative_to(results.parent)}` | {d['model']} | {retriever} | {ds} | {s['episodes']} | {_f(s['em'])} | "
                           f"{_f(s['f1'])} | {_f(s['avg_turns'], 2)} | {_f(s['answered'], 2)} |")
        for ds, fb in (d or {}).get("feedback", {}).items():
            a, w = fb["student_alone"], fb["with_feedback"]
            out.append(f"| `{p.relative_to(results.parent)}` | {d['model']} + teacher feedback | {retriever} | {ds} | {w['episodes']} | "
                       f"{_f(w['em'])} (alone {_f(a['em'])}) | {_f(w['f1'])} (alone {_f(a['f1'])}) | {_f(w['avg_turns'], 2)} | "
                       f"teacher's turns {_f(fb['teacher_turn_share'])} |")
    return out + [""]


def grader(results: Path, img: Path) -> list[str]:
    d = _load(results / "grader" / "summary.json")
    out = ["## Grader quality (`python -m benchmarks.grader`)", ""]
    if not d:
        return out + ["No `results/grader/summary.json` yet.", ""]
    out += [f"Recorded set: `{d['recorded']}` ({d['records']} trajectories scored).", "",
            "| config | teacher | prompt | gold | readout | n | AUROC (EM=1) | Spearman (F1) | tied pairs | AUROC models only | s/score |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["configs"]:
        mo = r.get("models_only", {})
        out.append(f"| {r['name']} | {r['teacher']} | {r['prompt']} | {r['show_gold']} | {r['readout']} | {r['n']} | "
                   f"{_f(r['auroc'])} | {_f(r['spearman'])} | {_f(r['ties'])} | {_f(mo.get('auroc'))} ({mo.get('n', '-')}) | "
                   f"{_f(r['sec_per_score'], 2)} |")
    _bars(img / "grader_auroc.png", [f"{r['name']}\n{r['teacher']}" for r in d["configs"]],
          [r["auroc"] or 0 for r in d["configs"]], "AUROC of the score against EM = 1")
    return out + ["", "![grader AUROC](img/grader_auroc.png)", ""]


def learning(results: Path, img: Path) -> list[str]:
    """One section per learning series (``results/learning*/learning.json``: the canonical series,
    a series in another dtype, the Math-v0 one), each with its settings and plot."""
    out = ["## Learning (`python -m benchmarks.learning`)", ""]
    found = [(p.parent, d) for p in sorted(results.glob("learning*/learning.json")) if (d := _load(p))]
    if not found:
        return out + ["No `results/learning/learning.json` yet.", ""]
    from benchmarks.learning import markdown

    for folder, d in found:
        st = d["settings"]
        out += [f"### `{folder.relative_to(results.parent)}` ({st.get('env', 'webqa')}, dtype {st.get('dtype', 'float32')})", "",
                markdown(d), "", f"Settings: `{json.dumps(st)}`", ""]
        if (folder / "learning.png").exists():
            out += [f"![learning curves](../{folder.relative_to(results.parent)}/learning.png)", ""]
    return out


def rollout_speed(results: Path, img: Path) -> list[str]:
    rows, names, ratios = [], [], []
    for p in sorted(results.glob("rollout_speed*.json")):
        d = _load(p) or {}
        r = d.get("ratio_interleaved_rounds") or d.get("ratio_rollout_over_generate")
        if r is None:
            continue
        cfg = d.get("config", {})
        rows.append(f"| `{p.name}` | {cfg.get('model', '-')} | {cfg.get('dtype', 'float32')} | {d.get('episodes', '-')} | {_f(r)} |")
        names.append(p.stem.replace("rollout_speed_", ""))
        ratios.append(r)
    out = ["## Rollout speed (`python -m benchmarks.rollout_speed`)", "",
           "Throughput of the multi-turn rollout over plain batched `model.generate` on the same prompts "
           "(interleaved rounds pooled where measured). Analysis: [rollouts.md](rollouts.md).", "",
           "| results | model | dtype | episodes | rollout / generate |", "|---|---|---|---|---|", *rows, ""]
    if ratios:
        _bars(img / "rollout_speed.png", names, ratios, "rollout throughput / plain generate")
        out += ["![rollout speed](img/rollout_speed.png)", ""]
    return out


def engine_speed(results: Path) -> list[str]:
    out = ["## Engines (`python -m benchmarks.engine_speed`)", "", "| results | tokens/s | vLLM / transformers |", "|---|---|---|"]
    for p in sorted(results.glob("engine_speed*.json")):
        d = _load(p) or {}
        tps = ", ".join(f"{k} {_f(v, 2)}" for k, v in (d.get("tokens_per_s") or {}).items())
        out.append(f"| `{p.name}` | {tps} | {_f(d.get('ratio_vllm_over_transformers'), 2)} |")
    return out + [""]


def hostile(results: Path) -> list[str]:
    d = _load(results / "hostile.json")
    out = ["## Hostile input (`python -m benchmarks.hostile`)", ""]
    if not d:
        return out + ["No `results/hostile.json` yet.", ""]
    rows = d.get("rows") or d.get("requests") or []
    out += [f"{len(rows)} requests; see `results/hostile.json` for each one's status, latency and RSS.", ""]
    return out


def retrieval(results: Path, img: Path) -> list[str]:
    from benchmarks.retrieval_report import table_lines

    d = _load(results / "retrieval.json")
    out = ["## Retrieval (`python -m benchmarks.retrieval`)", ""]
    if not d:
        return out + ["No `results/retrieval.json` yet.", ""]
    out += [f"From `results/retrieval.json` (arguments: `{json.dumps(d['args'])}`). Recall: the share of a HotpotQA "
            "question's supporting titles among the titles of its top-k passages, averaged over the bundled questions.", ""]
    out += table_lines(d["results"], d.get("projections")) + [""]
    rows = [(res["corpus"], name, r["title_recall"]) for res in d["results"] for name, r in res["backends"].items()
            if "title_recall" in r]
    if rows:
        _grouped(img / "retrieval_recall.png", [f"{name}" for _, name, _ in rows],
                 {f"recall@{k}": [rec[f"recall@{k}"] for _, _, rec in rows] for k in (1, 3, 10)},
                 f"supporting-title recall, {rows[0][0]}")
        out += ["![retrieval recall](img/retrieval_recall.png)", ""]
    return out


def _grouped(path: Path, labels: list[str], series: dict[str, list[float]], title: str, ylim=(0, 1)) -> None:
    """A bar chart, one group of bars a label and one bar a series (a legend when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(labels)), 3.2))
    width = 0.8 / max(1, len(series))
    for j, (name, values) in enumerate(series.items()):
        ax.bar([i + j * width for i in range(len(values))], values, width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, fontsize=7, rotation=20, ha="right")
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def _bars(path: Path, labels: list[str], values: list[float], title: str) -> None:
    _grouped(path, labels, {"": values}, title, ylim=None)


def main(argv: list[str] | None = None, results: Path = ROOT / "results", docs: Path = ROOT / "docs") -> int:
    from common.files import atomic_write_text

    img = docs / "img"
    lines = ["# Results", "", "Generated by `python -m benchmarks.report` from `results/`; do not edit by hand. "
             "Each number comes from the file named next to it; the commands that produced them are in the benchmarks' "
             "docstrings and the pages linked from the [README](../README.md).", ""]
    lines += evaluation(results) + grader(results, img) + learning(results, img) + rollout_speed(results, img)
    lines += engine_speed(results) + retrieval(results, img) + hostile(results)
    atomic_write_text(docs / "results.md", "\n".join(lines) + "\n")
    print(f"wrote {docs / 'results.md'} and {len(glob.glob(str(img / '*.png')))} plots in {img}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
