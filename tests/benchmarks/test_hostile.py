"""benchmarks.hostile on a subset of its catalogue: both servers start on loopback, every case
gets an expected answer, no server dies, SIGTERM exits 0, and the JSON lands atomically."""
from __future__ import annotations

import pytest

import json

from benchmarks import hostile, hostile_cases


def test_catalogue_covers_the_issue():
    names = {(c.server, c.name) for c in hostile_cases.CASES}
    for server in ("retrieval", "model"):
        for words in ("100,000-deep", "5,000 digits", "Content-Length: -1", "no Content-Length", "slow client",
                      "idle connection", "half-open"):
            assert any(s == server and words in n for s, n in names), (server, words)
    for words in ("20 MB string prompt", "1,000,000 prompt ids", "max_tokens 10**9", "past the context",
                  "temperature 1e-300", "seed 10**30", "client gone", "GET /v1/completions", "--request-timeout"):
        assert any(words in n for s, n in names if s == "model"), words
    assert any("topk 100" in n for s, n in names if s == "retrieval")
    assert all(c.expect for c in hostile_cases.CASES)


@pytest.mark.slow
def test_a_subset_runs_against_both_servers(tmp_path):
    out = tmp_path / "hostile.json"
    # quoted: unquoted, "Content-Length: -1" would read as a mapping (key: value)
    code = hostile.main(['only="valid request,nesting,Content-Length: -1,POST /health,half-open,client gone"',
                         "timeouts=2", f"out={out}"])
    res = json.loads(out.read_text())
    assert code == 0 and res["all_ok"], json.dumps(res, indent=1)[:3000]
    assert {r["server"] for r in res["cases"]} == {"retrieval", "model"}
    assert len(res["cases"]) >= 12 and all(r["ok"] and r["server_up"] for r in res["cases"])
    for s in res["servers"].values():
        assert s["exit_code"] == 0 and s["rss_baseline_mb"] > 0
    assert not list(tmp_path.glob(".hostile.json.*"))  # no temp file left behind
