"""The same rollout on two engines: our TransformersPolicy against vLLM (VLLMPolicy).

    .venv-vllm/bin/python -m benchmarks.engine_speed model=student episodes=24   # vLLM's CPU build
    python -m benchmarks.engine_speed model=student dtype=bfloat16               # a GPU with vLLM

(``bash scripts/test_vllm_cpu.sh`` makes ``.venv-vllm`` and runs the vLLM tests there.)

Same model, dtype, questions (the first ``episodes`` of ``dataset``), greedy, same per-turn and
total token budgets, ``batch_size`` live episodes at most on both sides:

* ``transformers`` - :class:`agents.hf_policy.TransformersPolicy` with the continuous schedule
  (the rollout_speed benchmark's engine), ``threads`` torch threads.
* ``vllm`` - :class:`agents.vllm_policy.VLLMPolicy` (``max_num_seqs=batch_size``), the lockstep
  schedule (one ``generate`` call per turn for all live episodes; vLLM batches inside the call).
  On a CPU, vLLM's CPU build with a ``kv_cache_gib`` KV cache; its worker binds the cores it
  finds (``VLLM_CPU_OMP_THREADS_BIND``).

Counted: agent tokens (loss mask 1); timed: the whole rollout call. The engines run in turn,
``repeats`` rounds (T V T V ...), so a drift of the box falls on both; the vLLM engine is
started before its timed rollout and stopped after it each round (its start-up time is reported
apart), so it holds no cores while transformers runs. Greedy decoding on both sides gives the
same episodes up to near-ties between kernels, so EM is reported too. ``ratio`` is vLLM
tokens/s over transformers tokens/s, pooled over the rounds (tokens over seconds).

Writes ``out`` (JSON, default ``results/engine_speed_<model>.json``) and prints a table.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EngineSpeedConfig:
    model: str = "small"
    batch_size: int = 8
    episodes: int = 16
    dataset: str = "hotpotqa"
    max_tokens_per_turn: int = 128
    max_total_tokens: int = 2048
    top_k: int = 3
    max_turns: int = 4
    dtype: str = "float32"
    threads: int = 2  # torch threads for transformers
    kv_cache_gib: float = 2.0  # vLLM's KV cache on a CPU
    enforce_eager: bool = False  # vLLM without torch.compile (starts faster, decodes slower)
    repeats: int = 2
    out: str = ""


def timed_rollout(policy, make_env, ids: list[str], cfg: EngineSpeedConfig, schedule: str) -> dict:
    """One greedy rollout of the questions ``ids``: seconds, agent tokens, tokens/s, EM, turns."""
    from agents.policy import SamplingParams
    from agents.rollout import rollout

    t = time.perf_counter()
    trajs = rollout(policy, make_env, [{"question_id": q} for q in ids], sampling=SamplingParams(temperature=0.0),
                    max_tokens_per_turn=cfg.max_tokens_per_turn, max_total_tokens=cfg.max_total_tokens,
                    batch_size=cfg.batch_size, schedule=schedule)
    secs = time.perf_counter() - t
    tokens = sum(tr.num_agent_tokens for tr in trajs)
    return {"seconds": round(secs, 3), "tokens": tokens, "tokens_per_s": round(tokens / secs, 2),
            "em": round(sum(tr.em for tr in trajs) / len(trajs), 4),
            "turns": [len(tr.actions) for tr in trajs]}


def vllm_round(make_env, ids: list[str], cfg: EngineSpeedConfig, device: str) -> dict:
    """Start vLLM, warm it up, time the lockstep rollout, stop it (its start-up time apart)."""
    from agents.vllm_policy import VLLMPolicy

    kw = {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * (1 << 30))} if device == "cpu" else {}
    t = time.perf_counter()
    vp = VLLMPolicy(cfg.model, dtype=cfg.dtype, enable_lora=False, max_num_seqs=cfg.batch_size,
                    enforce_eager=cfg.enforce_eager, max_model_len=cfg.max_total_tokens + 1024, seed=0, **kw)
    start = time.perf_counter() - t
    try:
        timed_rollout(vp, make_env, ids[:2], cfg, "lockstep")  # warm-up
        r = timed_rollout(vp, make_env, ids, cfg, "lockstep")
    finally:
        vp.close()
    r["engine_start_seconds"] = round(start, 2)
    return r


def run_rounds(hf, make_env, qids: list[str], cfg: EngineSpeedConfig, device: str) -> dict[str, list[dict]]:
    """``repeats`` rounds of transformers then vLLM, after one transformers warm-up."""
    timed_rollout(hf, make_env, qids[:2], cfg, "continuous")  # warm-up (retrieval kernels compile)
    rounds = {"transformers": [], "vllm": []}
    for i in range(cfg.repeats):
        rounds["transformers"].append(timed_rollout(hf, make_env, qids, cfg, "continuous"))
        rounds["vllm"].append(vllm_round(make_env, qids, cfg, device))
        print(f"round {i + 1}: transformers {rounds['transformers'][-1]['tokens_per_s']} tok/s, "
              f"vllm {rounds['vllm'][-1]['tokens_per_s']} tok/s", flush=True)
    return rounds


def make_report(cfg: EngineSpeedConfig, device: str, rounds: dict[str, list[dict]]) -> dict:
    """The JSON report: tokens/s per engine pooled over the rounds (tokens over seconds), the ratio."""
    import torch
    import vllm
    from omegaconf import OmegaConf

    tps = {k: round(sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs), 2) for k, rs in rounds.items()}
    return {
        "config": OmegaConf.to_container(cfg), "device": device, "vllm": vllm.__version__, "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "tokens_per_s": tps, "ratio_vllm_over_transformers": round(tps["vllm"] / tps["transformers"], 3),
        "rounds": rounds,
    }


def print_table(cfg: EngineSpeedConfig, report: dict, n_questions: int, out_path: Path) -> None:
    rounds, tps = report["rounds"], report["tokens_per_s"]
    print(f"\n{cfg.model} {cfg.dtype} on {report['device']}, {n_questions} {cfg.dataset} questions, "
          f"batch {cfg.batch_size}, greedy")
    print(f"{'engine':<14}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'EM':>7}{'start s':>9}")
    for k, rs in rounds.items():
        start = sum(r.get("engine_start_seconds", 0) for r in rs) / len(rs)
        print(f"{k:<14}{sum(r['tokens'] for r in rs):>8}{sum(r['seconds'] for r in rs):>10.1f}{tps[k]:>10.2f}"
              f"{sum(r['em'] for r in rs) / len(rs):>7.3f}{start:>9.1f}")
    print(f"vllm / transformers: {report['ratio_vllm_over_transformers']:.3f}   -> {out_path}")


def main(argv: list[str] | None = None) -> int:
    from benchmarks.eval import dataset_env_ids, parse_config

    cfg = parse_config(sys.argv[1:] if argv is None else argv, EngineSpeedConfig)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(cfg.threads))  # retrieval's OpenMP runtime is torch's too
    import gymnasium as gym
    import torch

    import envs  # noqa: F401
    from agents.hf_policy import TransformersPolicy
    from agents.models import load_model
    from agents.vllm_policy import vllm_device
    from common.files import atomic_write_json

    device = vllm_device()
    if device is None:
        raise SystemExit("engine_speed needs vLLM: a CUDA GPU with 'webqa-gym[vllm]', or vLLM's CPU build "
                         "(bash scripts/test_vllm_cpu.sh makes .venv-vllm)")
    torch.set_num_threads(cfg.threads)
    out_path = Path(cfg.out or f"results/engine_speed_{Path(cfg.model).name}.json")
    (_, env_id), = dataset_env_ids(cfg.dataset)
    make_env = lambda: gym.make(env_id, top_k=cfg.top_k, max_turns=cfg.max_turns)  # noqa: E731
    qids = [q["id"] for q in make_env().unwrapped.questions[: cfg.episodes]]
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=device)
    rounds = run_rounds(TransformersPolicy(model, tok), make_env, qids, cfg, device)
    report = make_report(cfg, device, rounds)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, report)
    print_table(cfg, report, len(qids), out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
