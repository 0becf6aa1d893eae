"""A static HTML page for an eval/trajectory JSONL file: one collapsible card per episode.

    python -m benchmarks.viewer results/eval/hotpotqa.jsonl [-o view.html]

Each card shows the question, gold answers, every turn's action and observation, the final
answer and its EM/F1. Self-contained (inline CSS), escaped, opens from disk in any browser.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from common.files import atomic_write_text

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
details{border:1px solid #ccc;border-radius:6px;margin:.5em 0;padding:.4em .8em}
summary{cursor:pointer} .ok{color:#0a7d28;font-weight:600} .bad{color:#b3261e;font-weight:600}
.act{background:#eef4ff;border-left:3px solid #3366cc} .obs{background:#f6f6f6;border-left:3px solid #999}
pre{white-space:pre-wrap;word-break:break-word;padding:.5em;margin:.3em 0} .meta{color:#666;font-size:12px}"""


def render(records: list[dict], title: str) -> str:
    n = len(records) or 1
    em = sum(r.get("em", 0) for r in records) / n
    f1 = sum(r.get("f1", 0) for r in records) / n
    out = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style>",
           f"<h1>{html.escape(title)}</h1><p>{len(records)} episodes &middot; EM {em:.3f} &middot; F1 {f1:.3f}</p>"]
    for r in records:
        cls = "ok" if r.get("em") else "bad"
        head = (f"<span class='{cls}'>EM {r.get('em', 0):.0f} F1 {r.get('f1', 0):.2f}</span> "
                f"{html.escape(str(r.get('question', '')))}")
        out.append(f"<details><summary>{head}</summary>")
        out.append(f"<p class='meta'>id {html.escape(str(r.get('question_id')))} &middot; gold: "
                   f"{html.escape(' | '.join(map(str, r.get('gold_answers') or [])))} &middot; answer: "
                   f"<b>{html.escape(str(r.get('answer')))}</b> &middot; turns {r.get('turns')} &middot; "
                   f"invalid {r.get('invalid_actions', 0)} &middot; end {html.escape(str(r.get('truncation') or 'answer'))}</p>")
        obs = r.get("observations") or []
        for i, act in enumerate(r.get("actions") or []):
            out.append(f"<div class='meta'>turn {i + 1}</div><pre class='act'>{html.escape(act)}</pre>")
            if i < len(obs) and obs[i]:
                out.append(f"<pre class='obs'>{html.escape(obs[i].strip())}</pre>")
        out.append("</details>")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.viewer", description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("-o", "--out", default=None)
    args = ap.parse_args(argv)
    src = Path(args.results)
    records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    dest = Path(args.out) if args.out else src.with_suffix(".html")
    atomic_write_text(dest, render(records, src.name))
    print(f"wrote {dest} ({len(records)} episodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
