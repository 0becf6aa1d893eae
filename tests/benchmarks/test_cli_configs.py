"""The benchmark CLIs that take ``key=value`` overrides on a typed config (``benchmarks.eval.parse_config``):
hostile, methods, server_load and retrieval keep every option of their former ``--flags`` under
its underscore name, with the same defaults; an unknown key or an old flag is an error."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from benchmarks import hostile, methods, retrieval, server_load
from benchmarks.eval import parse_config


def _cfg(schema, argv):
    return OmegaConf.to_object(parse_config(argv, schema))


def test_defaults_are_the_former_flag_defaults():
    assert _cfg(hostile.HostileConfig, []) == hostile.HostileConfig("tiny-random", "retrieval,model", "", 5.0, "results/hostile.json")
    m = methods.parse_args([])
    assert (m.model, m.steps, m.questions, m.group, m.tokens_per_turn, m.max_turns, m.threads) == ("small", 2, 2, 2, 96, 3, 1)
    assert (m.learn, m.learn_only, m.learn_steps, m.learn_eval, m.learn_methods, m.skip_done, m.out) == (
        False, False, 4, 10, "grpo,ovd,opd", False, "results/methods")
    assert m.methods.split(",") == list(methods.PRESETS["small"])
    s = _cfg(server_load.ServerLoadConfig, [])
    assert (s.url, s.index, s.clients, s.requests, s.topk, s.client_procs, s.server_args, s.compare_unbatched) == (
        None, "bundled", 64, 2000, 3, 1, "", False)
    r, refs = retrieval.parse_args([])
    assert refs == [100_000, 200_000] and (r.size, r.queries, r.single, r.ref_queries, r.project) == (1_000_000, 2000, 300, 0, 21_000_000)
    assert r.bundled and r.dense and (r.bundled_limit, r.dense_model, r.dense_faiss, r.reuse_builds) == (0, None, "flat", None)


def test_overrides():
    h = _cfg(hostile.HostileConfig, ['only="half-open,Content-Length: -1"', "timeouts=2", "servers=model"])
    assert (h.only, h.timeouts, h.servers) == ("half-open,Content-Length: -1", 2.0, "model")
    m = methods.parse_args(["model=student", "learn_only=true", "learn_steps=3", "tokens_per_turn=64", "skip_done=true"])
    assert (m.model, m.learn_only, m.learn_steps, m.tokens_per_turn, m.skip_done) == ("student", True, 3, 64, True)
    s = _cfg(server_load.ServerLoadConfig, ["server_args=--max-batch 1", "client_procs=2", "compare_unbatched=true"])
    assert (s.server_args, s.client_procs, s.compare_unbatched) == ("--max-batch 1", 2, True)
    for empty in ("ref_sizes=", 'ref_sizes=""'):
        assert retrieval.parse_args(["size=0", empty])[1] == []  # bundled corpus only
    r, refs = retrieval.parse_args(["ref_sizes=20000", "dense=false", "bundled=false", "dense_faiss=hnsw"])
    assert refs == [20000] and not r.dense and not r.bundled and r.dense_faiss == "hnsw"
    assert retrieval.parse_args(["ref_sizes=100000,200000"])[1] == [100_000, 200_000]


@pytest.mark.parametrize("main, argv, words", [
    (hostile.main, ["--timeouts", "2"], "key=value"),
    (hostile.main, ["timeout=2"], "unknown config key 'timeout'"),
    (methods.main, ["tokens-per-turn=64"], "unknown config key 'tokens-per-turn'"),
    (methods.main, ["model=big"], "'model'"),
    (server_load.main, ["--clients", "4"], "key=value"),
    (server_load.main, ["clients=many"], "'clients'"),
    (retrieval.main, ["no_dense=true"], "unknown config key 'no_dense'"),
    (retrieval.main, ["ref_sizes=1,x"], "'ref_sizes'"),
    (retrieval.main, ["dense_faiss=ivf"], "'dense_faiss'"),
])
def test_bad_arguments_fail_naming_them(main, argv, words):
    with pytest.raises(SystemExit, match=words):
        main(argv)
