"""What the multi-turn machinery costs: rollout tokens/s against plain batched generation.

    python -m benchmarks.rollout_speed                       # model=small batch_size=8 episodes=16
    python -m benchmarks.rollout_speed model=student out=results/rollout_speed_student.json

Same model, same prompts (the chat-templated WebQA prompts of the first ``episodes`` questions
of ``dataset``), same batch size B, greedy, ``dtype`` (float32) on ``device`` (cpu), ``threads`` torch threads:

(a) ``generate``  - plain ``model.generate`` (transformers) over the prompts in batches of B,
    left-padded, ``T`` new tokens for every row (``min_new_tokens = max_new_tokens = T``, no stop
    strings, so EOS cannot end a row early): the best case of batched decoding.
(b) ``rollout``   - ``agents.rollout.rollout`` with a :class:`TransformersPolicy`, greedy,
    ``batch_size=B``, once per schedule in ``schedules`` (``continuous``: a row whose turn ends
    rejoins the batch as soon as its observation is in, and a finished episode's place goes to
    the next question, its prefill packed into a decode step (``agents.packed``);
    ``continuous/unpacked``: the same with separate, padded prefill forwards; ``lockstep``: one
    batched generate per turn). Counted: agent tokens only
    (loss-mask 1); timed: the whole call (policy, env steps, retrieval, tokenising observations,
    bookkeeping).
(c) ``policy``    - ``TransformersPolicy.generate`` on the same prompts in batches of B, forced
    to ``T`` tokens (no stop strings, EOS ignored): our decode loop against (a)
    (``policy_generate=false`` skips it).

The comparison. A rollout's turns stop at action ends, so its rows generate different numbers
of tokens, and its work also includes things plain generation does not have (prefilling the
observations each turn, retrieval, and in lockstep rows that already stopped waiting for the
turn's longest one). To compare like with like we give (a) and (c) the same *useful* work the
first rollout did: ``T = round(agent tokens / episodes)`` by default, so all produce about the
same number of tokens from the same prompts, and the ratio

    rollout / generate = (agent tokens / rollout seconds) / (episodes*T / generate seconds)

is the fraction of plain-generation throughput the multi-turn loop keeps (target >= 0.8).
``T`` can be fixed with ``new_tokens=N``.

Plain generation has no drain: every row makes T tokens. A rollout of E > B episodes runs B at
a time until the last one starts (the queue is empty), then drains: the last episodes decode
with fewer and fewer rows, and no episode can finish faster than its own turns one after
another (``longest_episode_tokens``). So each continuous rollout also reports its tokens and
seconds up to the moment the queue empties (``steady_tokens_per_s``; ``steady_ratios_by_round``
against generate in the same round) and the drain after it. The headline ratio is the whole
run's.

Every model forward is timed (a forward pre/post hook), split into prefill (input length > 1:
tokens fed, padded slots), decode steps (batch slots vs tokens that were kept) and packed
forwards (joining rows' tokens plus the decode batch's step, no padding), plus the time in
observation tokenising and in the rest (env steps, retrieval, Python).

A warm-up (a short ``model.generate`` and a short rollout) runs first; each measurement runs
once; ``repeats=R`` runs R rounds of all of them (rollouts, generate, policy) and keeps each
one's best (every round's seconds and tokens are in the JSON as ``round_seconds`` and
``round_tokens``). The load average is recorded. Writes ``out`` (JSON) and prints a table.

A shared box drifts: the same forward can be 10% or more slower a few minutes later, which is
the size of the effect measured. So from round 2 on (``interleave=true``, the default), when T
and the rollout's length are known, (a) does not run after the rollout but inside it: its
B-row batches run one at a time between the scheduler calls of the first schedule's rollout,
spread evenly over the time that rollout took in the round before, and their time is taken off
the rollout's clock (batches not yet due at the end run after it). Both then see the same
spells, and the ratio within those rounds (``ratios_by_round``, ``rounds_interleaved``) is a
paired measurement; ``ratio_interleaved_rounds`` pools them (tokens over seconds, summed over
the interleaved rounds). Round 1 runs each measurement in turn.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.rollout_ratios import print_report, ratios
from benchmarks.rollout_timing import Counts, ForwardTimer, TimedPolicy
from benchmarks.rollout_timing import TimedScheduler  # noqa: F401  (re-exported: it lived here)


@dataclass
class SpeedConfig:
    model: str = "small"
    batch_size: int = 8
    episodes: int = 0  # questions rolled out (0 = 2 x batch_size)
    schedules: str = "continuous,lockstep"  # rollouts to time; the first sets T
    dataset: str = "hotpotqa"
    new_tokens: int = 0  # T for (a) and (c); 0 = agent tokens of the first rollout / episodes
    max_tokens_per_turn: int = 500
    max_total_tokens: int = 4096
    top_k: int = 3
    max_turns: int = 4
    retriever: str = "bundled"
    dtype: str = "float32"
    device: str = "cpu"  # cuda: a GPU (the timer then synchronises around every forward)
    threads: int = 1  # torch threads; 0 = torch's default
    repeats: int = 1
    reuse_cache: bool = True  # TransformersPolicy keeps the KV cache between turns (false: re-prefill)
    packed: bool = True  # continuous: joining rows prefilled inside a decode step (false: padded prefill forwards)
    policy_generate: bool = True  # also time (c); false skips it (it does not enter the rollout ratio)
    interleave: bool = True  # from round 2, (a)'s batches run spread over the first schedule's rollout
    out: str = ""  # default results/rollout_speed.json (small) or results/rollout_speed_<model>.json


@contextmanager
def no_eos(policy):
    saved = policy.eos_ids
    policy.eos_ids = set()
    try:
        yield
    finally:
        policy.eos_ids = saved


def left_pad(prompts, pad_id):
    import torch

    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = 1
    return ids, attn


def hf_generate(model, prompts, pad_id, T):
    import torch

    ids, attn = left_pad(prompts, pad_id)
    ids, attn = ids.to(model.device), attn.to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=T, min_new_tokens=T,
                             pad_token_id=pad_id, num_beams=1, temperature=None, top_p=None, top_k=None)
    return out[:, ids.shape[1]:]


def keep_best(best, r, label):
    """``best`` (or None) and the new result ``r``: the faster, with every round's seconds,
    tokens and steady tok/s."""
    print(f"{label}: {r['tokens']} tokens in {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    out = dict(r if best is None or r["seconds"] < best["seconds"] else best)
    for key in ("seconds", "tokens", "steady_tokens_per_s"):  # every round's, as round_<key>
        if key in r:
            out[f"round_{key}"] = (best or {}).get(f"round_{key}", []) + [r[key]]
    return out


@dataclass
class Bench:
    """What the measurements of one run share: the model and policy, the questions and their
    prompts, the schedules to time, and the forward timer."""

    cfg: SpeedConfig
    model: Any
    policy: Any  # TransformersPolicy
    make_env: Callable[[], Any]
    qids: list[str]
    prompts: list[list[int]]
    schedules: list[str]
    timer: ForwardTimer
    load0: tuple[float, float, float]  # load average before the measurements

    @property
    def B(self) -> int:
        return self.cfg.batch_size

    @property
    def E(self) -> int:
        return len(self.qids)

    @property
    def chunks(self) -> list[list[list[int]]]:
        return [self.prompts[i : i + self.B] for i in range(0, self.E, self.B)]


def setup(cfg: SpeedConfig) -> Bench:
    """Load the env, the questions, the model and the policy; warm up (a short generate and a
    short rollout: the retrieval kernels compile, a GPU loads each kernel)."""
    import gymnasium as gym
    import torch

    import envs  # noqa: F401
    from agents.hf_policy import TransformersPolicy
    from agents.models import load_model
    from agents.policy import SamplingParams
    from agents.rollout import rollout
    from benchmarks.eval import dataset_env_ids

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    (name, env_id), = dataset_env_ids(cfg.dataset)
    env_kwargs = dict(top_k=cfg.top_k, max_turns=cfg.max_turns, retriever=cfg.retriever)
    make_env = lambda: gym.make(env_id, **env_kwargs)  # noqa: E731
    probe = make_env().unwrapped
    B = cfg.batch_size
    qids = [q["id"] for q in probe.questions[: cfg.episodes or 2 * B]]
    schedules = [x.strip() for x in cfg.schedules.split(",") if x.strip()]
    for sch in schedules:
        if sch.partition("/")[2] not in ("", "unpacked"):
            raise ValueError(f"schedule {sch!r}: the only variant is 'continuous/unpacked'")

    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    policy = TransformersPolicy(model, tok, reuse_cache=cfg.reuse_cache, packed=cfg.packed)
    prompts = [policy.prompt_ids(make_env().reset(options={"question_id": q})[0]) for q in qids]
    load0 = os.getloadavg()

    timer = ForwardTimer(model)
    # warm-up
    hf_generate(model, prompts[:B], policy.pad_id, 4)
    rollout(policy, make_env, [{"question_id": q} for q in qids[:B]], sampling=SamplingParams(temperature=0.0),
            max_tokens_per_turn=8, batch_size=B)
    return Bench(cfg, model, policy, make_env, qids, prompts, schedules, timer, load0)


def run_rollout(bench: Bench, schedule: str, interleave=None) -> dict:
    """(b) One rollout, natural (stops at action ends), greedy; ``interleave`` [(seconds, job)]
    runs the jobs in between its steps, off its clock."""
    from agents.policy import SamplingParams
    from agents.rollout import rollout

    cfg, policy, timer, E = bench.cfg, bench.policy, bench.timer, bench.E
    timer.reset()
    tp = TimedPolicy(policy, E, bench.B, interleave)
    name, _, variant = schedule.partition("/")
    policy.packed = cfg.packed and variant != "unpacked"
    tp.t0 = time.perf_counter()
    trajs = rollout(tp, bench.make_env, [{"question_id": q} for q in bench.qids], sampling=SamplingParams(temperature=0.0),
                    max_tokens_per_turn=cfg.max_tokens_per_turn, max_total_tokens=cfg.max_total_tokens,
                    batch_size=bench.B, schedule=name)
    secs = tp.elapsed()
    for _, run in tp.due:  # jobs not yet due when the rollout ended
        run()
    agent = sum(tr.num_agent_tokens for tr in trajs)
    obs_tokens = sum(len(tr.loss_mask) - tr.num_agent_tokens for tr in trajs)
    steady = {}
    if tp.queue_empty:  # continuous schedules: until the last episode starts, then the drain
        qs, qt = tp.queue_empty
        steady = {"queue_empty_seconds": round(qs, 3), "queue_empty_tokens": qt,
                  "steady_tokens_per_s": round(qt / qs, 2),
                  "drain_seconds": round(secs - qs, 3), "drain_tokens": agent - qt}
    return {
        "schedule": schedule,
        "seconds": round(secs, 3),
        "tokens": agent,
        "tokens_per_s": round(agent / secs, 2),
        "turns": [len(tr.actions) for tr in trajs],
        "episode_agent_tokens": [tr.num_agent_tokens for tr in trajs],
        "scheduler_calls": tp.generate_calls,
        "observation_tokens": obs_tokens,
        "final_context_tokens": [tr.num_tokens for tr in trajs],
        "policy_generate_seconds": round(tp.generate_s, 3),
        "encode_seconds": round(tp.encode_s, 3),
        "env_and_other_seconds": round(secs - tp.generate_s - tp.encode_s, 3),
        "em": sum(tr.em for tr in trajs) / E,
        "longest_episode_tokens": max(tr.num_agent_tokens for tr in trajs),
        **steady,
        **timer.stats(),
    }


def generate_jobs(bench: Bench, T: int):
    """(a) plain ``model.generate``, forced to ``T`` tokens per row, batches of B: one job per
    batch, and a function that returns the result once every job has run."""
    counts, secs, chunks, E = Counts(), [], bench.chunks, bench.E

    def job(chunk):
        def run():
            with bench.timer.counting(counts):
                t = time.perf_counter()
                gen = hf_generate(bench.model, chunk, bench.policy.pad_id, T)
                secs.append(time.perf_counter() - t)
            assert gen.shape == (len(chunk), T), gen.shape
        return run

    def result():
        assert len(secs) == len(chunks), "a generate batch did not run"
        s = sum(secs)
        return {"seconds": round(s, 3), "tokens": E * T, "tokens_per_s": round(E * T / s, 2), **bench.timer.stats(counts)}

    return [job(c) for c in chunks], result


def run_generate(bench: Bench, T: int) -> dict:
    """(a), its batches one after another."""
    jobs, result = generate_jobs(bench, T)
    for run in jobs:
        run()
    return result()


def run_policy(bench: Bench, T: int) -> dict:
    """(c) ``TransformersPolicy.generate`` alone, one turn, forced to ``T`` tokens per row, batches of B."""
    from agents.policy import SamplingParams

    bench.timer.reset()
    sp = SamplingParams(temperature=0.0, max_new_tokens=T, stop=())
    n = 0
    with no_eos(bench.policy):
        t = time.perf_counter()
        for chunk in bench.chunks:
            n += sum(len(c.token_ids) for c in bench.policy.generate(chunk, sp))
        secs = time.perf_counter() - t
    assert n == bench.E * T, n
    return {"seconds": round(secs, 3), "tokens": n, "tokens_per_s": round(n / secs, 2), **bench.timer.stats()}


def measure(bench: Bench):
    """``repeats`` rounds of every measurement, each one's best: (a), {schedule: (b)}, (c), T,
    and per round whether (a) ran interleaved with the first schedule's rollout."""
    cfg, schedules = bench.cfg, bench.schedules
    r_b, r_a, r_c, T = {sch: None for sch in schedules}, None, None, cfg.new_tokens
    interleaved = []  # per round: whether (a) ran interleaved with the first schedule's rollout
    for _ in range(max(1, cfg.repeats)):
        inside = None
        for i, sch in enumerate(schedules):
            inter = None
            if cfg.interleave and i == 0 and r_b[sch] is not None:  # T and the rollout's length are known
                jobs, inside = generate_jobs(bench, T)  # spread evenly over the time the last round's rollout took
                last = r_b[sch]["round_seconds"][-1]
                inter = [((k + 0.5) * last / len(jobs), run) for k, run in enumerate(jobs)]
            r_b[sch] = keep_best(r_b[sch], run_rollout(bench, sch, inter), f"rollout {sch}")
        T = T or max(1, round(r_b[schedules[0]]["tokens"] / bench.E))
        r_a = keep_best(r_a, inside() if inside else run_generate(bench, T),
                        "model.generate" + (" (interleaved)" if inside else ""))
        interleaved.append(inside is not None)
        if cfg.policy_generate:
            r_c = keep_best(r_c, run_policy(bench, T), "policy.generate")
    return r_a, r_b, r_c, T, interleaved


def summarize(bench: Bench, r_a: dict, r_b: dict, r_c: dict | None, T: int, interleaved: list[bool]) -> dict:
    """The JSON report: the measurements, their ratios to (a), and the machine."""
    import torch

    cfg = bench.cfg
    return {
        "config": asdict(SpeedConfig(**{k: getattr(cfg, k) for k in SpeedConfig.__dataclass_fields__})),
        "batch": bench.B,
        "episodes": bench.E,
        "T": T,
        "prompt_tokens": [len(p) for p in bench.prompts],
        "generate": r_a,
        "rollouts": r_b,
        "policy_generate": r_c,
        **ratios(r_a, r_b, r_c, interleaved, bench.schedules[0]),
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in bench.load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.eval import parse_config

    cfg = parse_config(sys.argv[1:] if argv is None else argv, SpeedConfig)
    if cfg.threads:
        # the retrieval kernel runs on numba's OpenMP layer, which shares the OpenMP runtime with
        # torch: with numba's default (all cores) the first search would reset torch to all cores
        os.environ.setdefault("NUMBA_NUM_THREADS", str(cfg.threads))
    default = "results/rollout_speed.json" if cfg.model == "small" else f"results/rollout_speed_{Path(cfg.model).name}.json"
    out_path = Path(cfg.out or default)
    bench = setup(cfg)
    r_a, r_b, r_c, T, interleaved = measure(bench)
    bench.timer.close()
    report = summarize(bench, r_a, r_b, r_c, T, interleaved)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from common.files import atomic_write_text

    atomic_write_text(out_path, json.dumps(report, indent=1) + "\n")
    print_report(cfg.model, cfg.repeats, report, bench.schedules)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
