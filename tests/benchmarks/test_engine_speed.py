"""The engine-speed benchmark (transformers vs vLLM, same rollout): refuses clearly without vLLM,
runs end to end where vLLM can (``scripts/test_vllm_cpu.sh``)."""
import json

import pytest

from agents.vllm_policy import vllm_device
from benchmarks.engine_speed import main


def test_bad_key_is_named():
    with pytest.raises(SystemExit, match="unknown config key 'batchsize'"):
        main(["batchsize=2"])


@pytest.mark.skipif(vllm_device() is not None, reason="vLLM can run here")
def test_without_vllm_says_what_to_install():
    with pytest.raises(SystemExit, match="needs vLLM"):
        main(["model=small"])


@pytest.mark.skipif(vllm_device() is None, reason="needs vLLM on a CUDA GPU or vLLM's CPU build (vllm-cpu)")
def test_runs_both_engines_and_writes_the_ratio(tmp_path, capsys):
    from agents.models import MissingModelPackage, resolve_model

    try:
        resolve_model("small")
    except MissingModelPackage as exc:
        pytest.skip(str(exc))
    out = tmp_path / "engine.json"
    assert main(["model=small", "episodes=2", "batch_size=2", "max_tokens_per_turn=16", "max_turns=2", "repeats=1",
                 "enforce_eager=true", "kv_cache_gib=0.5", f"out={out}"]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["rounds"]) == {"transformers", "vllm"}
    for rs in rep["rounds"].values():
        assert len(rs) == 1 and rs[0]["tokens"] > 0 and len(rs[0]["turns"]) == 2
        assert rs[0]["tokens_per_s"] == pytest.approx(rs[0]["tokens"] / rs[0]["seconds"], rel=1e-2)
    assert rep["rounds"]["vllm"][0]["engine_start_seconds"] > 0
    tps = rep["tokens_per_s"]
    assert rep["ratio_vllm_over_transformers"] == pytest.approx(tps["vllm"] / tps["transformers"], abs=1e-3)
    assert "vllm / transformers:" in capsys.readouterr().out
