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


class Counts:
    """What :class:`ForwardTimer` counts: forwards and their seconds, by kind."""

    def __init__(self):
        self.prefill_s = self.decode_s = self.packed_s = 0.0
        self.prefill_calls = self.decode_steps = 0
        self.prefill_slots = self.prefill_tokens = self.decode_slots = 0
        self.decode_ctx = []  # (kv length, seconds) per decode step
        self.packed_calls = self.packed_tokens = self.packed_batch_rows = 0


class ForwardTimer:
    """Times every top-level forward of a model, split into prefill and decode calls."""

    def __init__(self, model):
        import torch  # noqa: F401

        self.model = model
        self.cuda = model.device.type == "cuda"  # kernels run asynchronously: synchronise to time them whole
        self.reset()
        self._t = 0.0
        self._h = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def reset(self):
        self.c = Counts()

    @contextmanager
    def counting(self, counts: Counts):
        """Count the forwards inside the block into ``counts`` instead (generate's batches run
        in between a rollout's steps)."""
        saved, self.c = self.c, counts
        try:
            yield
        finally:
            self.c = saved

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _pre(self, module, args, kwargs):
        self._sync()
        self._t = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self._sync()
        dt = time.perf_counter() - self._t
        ids = kwargs.get("input_ids", args[0] if args else None)
        attn = kwargs.get("attention_mask")
        b, n = ids.shape
        c = self.c
        plan = kwargs.get("webqa_packed")
        if plan is not None:  # joining rows' new ids side by side, after the decode batch's tokens
            rows = 0 if plan.batch is None else len(plan.batch.ids)
            c.packed_s += dt
            c.packed_calls += 1
            c.packed_tokens += n
            c.packed_batch_rows += rows
            c.decode_slots += rows
        elif n > 1:
            c.prefill_s += dt
            c.prefill_calls += 1
            c.prefill_slots += b * n
            c.prefill_tokens += int(attn[:, -n:].sum()) if attn is not None else b * n  # new tokens only
        else:
            c.decode_s += dt
            c.decode_steps += 1
            c.decode_slots += b
            c.decode_ctx.append((int(attn.shape[1]) if attn is not None else -1, dt))

    def stats(self, c: Counts | None = None) -> dict:
        c = c or self.c
        ctx = c.decode_ctx
        return {
            "prefill_seconds": round(c.prefill_s, 3),
            "prefill_calls": c.prefill_calls,
            "prefill_tokens": c.prefill_tokens,
            "prefill_padded_slots": c.prefill_slots,
            "decode_seconds": round(c.decode_s, 3),
            "decode_steps": c.decode_steps,
            "decode_slots": c.decode_slots,
            "ms_per_decode_step": round(1000 * c.decode_s / max(c.decode_steps, 1), 2),
            "mean_decode_context": round(sum(n for n, _ in ctx) / max(len(ctx), 1), 1),
            "packed_seconds": round(c.packed_s, 3),
            "packed_calls": c.packed_calls,
            "packed_tokens": c.packed_tokens,  # fed: joining rows' ids + one per decode-batch row
            "packed_batch_rows": c.packed_batch_rows,
        }

    def close(self):
        for h in self._h:
            h.remove()


class TimedScheduler:
    def __init__(self, sched, owner):
        self.s, self.o = sched, owner
        self.started: set = set()

    def __getattr__(self, name):
        return getattr(self.s, name)

    def submit(self, key, ids, max_new_tokens, context=None):
        if key not in self.started:
            self.started.add(key)
            if len(self.started) == self.o.episodes and self.o.episodes > self.o.batch:
                # the last episode starts: the queue is empty and the drain begins. Sampled so
                # far: the turns returned, plus the ids of the turns under way in the batch.
                rows, batch = self.s.rows, set(self.s.batch)
                live = sum(len(r.ids) - r.start for k, r in rows.items() if k in batch)
                self.o.queue_empty = (self.o.elapsed(), sum(map(sum, self.o.completions)) + live)
        return self.s.submit(key, ids, max_new_tokens, context)

    def advance(self):
        t = time.perf_counter()
        out = self.s.advance()
        self.o.generate_s += time.perf_counter() - t
        self.o.generate_calls += 1
        self.o.completions.append([len(c.token_ids) for _, c in out])
        self.o.between()
        return out


class TimedPolicy:
    """A policy proxy that times ``generate`` (or its turn scheduler's ``advance``) and
    ``encode`` (observation tokenising)."""

    def __init__(self, policy, episodes: int = 0, batch: int = 0, interleave=None):
        self.p = policy
        self.episodes, self.batch = episodes, batch  # for the time the queue empties (TimedScheduler)
        self.t0, self.queue_empty = time.perf_counter(), None
        self.generate_s = self.encode_s = self.paused_s = 0.0
        self.generate_calls = 0
        self.completions = []
        self.due = list(interleave or [])  # (seconds, job): each job runs once the rollout's own time passes its seconds

    def __getattr__(self, name):
        return getattr(self.p, name)

    def elapsed(self) -> float:
        """Seconds since ``t0``, less the time spent in interleaved jobs."""
        return time.perf_counter() - self.t0 - self.paused_s

    def between(self) -> None:
        """Between two scheduler calls (or lockstep turns): run the interleaved jobs now due,
        off the rollout's clock."""
        while self.due and self.elapsed() >= self.due[0][0]:
            t = time.perf_counter()
            self.due.pop(0)[1]()
            self.paused_s += time.perf_counter() - t

    def generate(self, prompts, sampling, contexts=None):
        t = time.perf_counter()
        out = self.p.generate(prompts, sampling, contexts)
        self.generate_s += time.perf_counter() - t
        self.generate_calls += 1
        self.completions.append([len(c.token_ids) for c in out])
        self.between()
        return out

    def turn_scheduler(self, sampling):
        sched = self.p.turn_scheduler(sampling)
        return None if sched is None else TimedScheduler(sched, self)

    def encode(self, text):
        t = time.perf_counter()
        out = self.p.encode(text)
        self.encode_s += time.perf_counter() - t
        return out


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


def main(argv: list[str] | None = None) -> int:
    from benchmarks.eval import dataset_env_ids, parse_config

    cfg = parse_config(sys.argv[1:] if argv is None else argv, SpeedConfig)
    if cfg.threads:
        # the retrieval kernel runs on numba's OpenMP layer, which shares the OpenMP runtime with
        # torch: with numba's default (all cores) the first search would reset torch to all cores
        os.environ.setdefault("NUMBA_NUM_THREADS", str(cfg.threads))
    import gymnasium as gym
    import torch

    import envs  # noqa: F401
    from agents.hf_policy import TransformersPolicy
    from agents.models import load_model
    from agents.policy import SamplingParams
    from agents.rollout import rollout

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_path = Path(cfg.out or ("results/rollout_speed.json" if cfg.model == "small" else f"results/rollout_speed_{Path(cfg.model).name}.json"))
    (name, env_id), = dataset_env_ids(cfg.dataset)
    env_kwargs = dict(top_k=cfg.top_k, max_turns=cfg.max_turns, retriever=cfg.retriever)
    make_env = lambda: gym.make(env_id, **env_kwargs)  # noqa: E731
    probe = make_env().unwrapped
    B = cfg.batch_size
    qids = [q["id"] for q in probe.questions[: cfg.episodes or 2 * B]]
    E = len(qids)
    schedules = [x.strip() for x in cfg.schedules.split(",") if x.strip()]
    for sch in schedules:
        if sch.partition("/")[2] not in ("", "unpacked"):
            raise ValueError(f"schedule {sch!r}: the only variant is 'continuous/unpacked'")

    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    policy = TransformersPolicy(model, tok, reuse_cache=cfg.reuse_cache, packed=cfg.packed)
    prompts = [policy.prompt_ids(make_env().reset(options={"question_id": q})[0]) for q in qids]
    chunks = [prompts[i : i + B] for i in range(0, E, B)]
    load0 = os.getloadavg()

    timer = ForwardTimer(model)
    # warm-up: a short generate and a short rollout (the retrieval kernels compile, a GPU loads each kernel)
    hf_generate(model, prompts[:B], policy.pad_id, 4)
    rollout(policy, make_env, [{"question_id": q} for q in qids[:B]], sampling=SamplingParams(temperature=0.0),
            max_tokens_per_turn=8, batch_size=B)

    # (b) the rollout, natural (stops at action ends), greedy
    def run_rollout(schedule, interleave=None):
        """One rollout; ``interleave`` [(seconds, job)] runs the jobs in between its steps, off its clock."""
        timer.reset()
        tp = TimedPolicy(policy, E, B, interleave)
        name, _, variant = schedule.partition("/")
        policy.packed = cfg.packed and variant != "unpacked"
        tp.t0 = time.perf_counter()
        trajs = rollout(tp, make_env, [{"question_id": q} for q in qids], sampling=SamplingParams(temperature=0.0),
                        max_tokens_per_turn=cfg.max_tokens_per_turn, max_total_tokens=cfg.max_total_tokens,
                        batch_size=B, schedule=name)
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

    r_b, r_a, r_c, T = {sch: None for sch in schedules}, None, None, cfg.new_tokens

    # (a) plain model.generate, forced to T tokens per row, batches of B: one job per batch
    def generate_jobs():
        counts, secs = Counts(), []

        def job(chunk):
            def run():
                with timer.counting(counts):
                    t = time.perf_counter()
                    gen = hf_generate(model, chunk, policy.pad_id, T)
                    secs.append(time.perf_counter() - t)
                assert gen.shape == (len(chunk), T), gen.shape
            return run

        def result():
            assert len(secs) == len(chunks), "a generate batch did not run"
            s = sum(secs)
            return {"seconds": round(s, 3), "tokens": E * T, "tokens_per_s": round(E * T / s, 2), **timer.stats(counts)}

        return [job(c) for c in chunks], result

    def run_generate():
        jobs, result = generate_jobs()
        for run in jobs:
            run()
        return result()

    # (c) TransformersPolicy.generate alone, one turn, forced to T tokens per row, batches of B
    def run_policy():
        timer.reset()
        sp = SamplingParams(temperature=0.0, max_new_tokens=T, stop=())
        n = 0
        with no_eos(policy):
            t = time.perf_counter()
            for chunk in chunks:
                n += sum(len(c.token_ids) for c in policy.generate(chunk, sp))
            secs = time.perf_counter() - t
        assert n == E * T, n
        return {"seconds": round(secs, 3), "tokens": n, "tokens_per_s": round(n / secs, 2), **timer.stats()}

    interleaved = []  # per round: whether (a) ran interleaved with the first schedule's rollout
    for _ in range(max(1, cfg.repeats)):
        inside = None
        for i, sch in enumerate(schedules):
            inter = None
            if cfg.interleave and i == 0 and r_b[sch] is not None:  # T and the rollout's length are known
                jobs, inside = generate_jobs()  # spread evenly over the time the last round's rollout took
                last = r_b[sch]["round_seconds"][-1]
                inter = [((k + 0.5) * last / len(jobs), run) for k, run in enumerate(jobs)]
            r_b[sch] = keep_best(r_b[sch], run_rollout(sch, inter), f"rollout {sch}")
        T = T or max(1, round(r_b[schedules[0]]["tokens"] / E))
        r_a = keep_best(r_a, inside() if inside else run_generate(), "model.generate" + (" (interleaved)" if inside else ""))
        interleaved.append(inside is not None)
        if cfg.policy_generate:
            r_c = keep_best(r_c, run_policy(), "policy.generate")
    timer.close()

    ratios = {sch: round(r["tokens_per_s"] / r_a["tokens_per_s"], 3) for sch, r in r_b.items()}
    per_round = {sch: [round(n * ga / (r_a["tokens"] * gb), 3) for n, gb, ga in zip(r["round_tokens"], r["round_seconds"], r_a["round_seconds"])]
                 for sch, r in r_b.items()}  # the ratio within each round
    first = r_b[schedules[0]]
    paired = [i for i, x in enumerate(interleaved) if x]  # rounds where (a) ran inside the first rollout
    pooled = None
    if paired:  # tokens/s over those rounds together, rollout against generate
        pooled = round(sum(first["round_tokens"][i] for i in paired) / sum(first["round_seconds"][i] for i in paired)
                       / (len(paired) * r_a["tokens"] / sum(r_a["round_seconds"][i] for i in paired)), 3)
    steady = {sch: [round(x * ga / r_a["tokens"], 3) for x, ga in zip(r["round_steady_tokens_per_s"], r_a["round_seconds"])]
              for sch, r in r_b.items() if r.get("round_steady_tokens_per_s")}  # until the queue empties, per round
    report = {
        "config": asdict(SpeedConfig(**{k: getattr(cfg, k) for k in SpeedConfig.__dataclass_fields__})),
        "batch": B,
        "episodes": E,
        "T": T,
        "prompt_tokens": [len(p) for p in prompts],
        "generate": r_a,
        "rollouts": r_b,
        "policy_generate": r_c,
        "ratio_rollout_over_generate": ratios[schedules[0]],
        "ratios_rollout_over_generate": ratios,
        "ratios_by_round": per_round,
        "rounds_interleaved": interleaved,
        "ratio_interleaved_rounds": pooled,
        "steady_ratios_by_round": steady,
        "ratio_policy_over_generate": round(r_c["tokens_per_s"] / r_a["tokens_per_s"], 3) if r_c else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from corpora.cache import atomic_write_text

    atomic_write_text(out_path, json.dumps(report, indent=1) + "\n")

    rows = [("(a) model.generate", r_a)] + [(f"(b) rollout {sch}", r) for sch, r in r_b.items()] + ([("(c) policy.generate", r_c)] if r_c else [])
    print(f"\nmodel={cfg.model} B={B} episodes={E} T={T} threads={torch.get_num_threads()} prompts "
          f"{min(report['prompt_tokens'])}-{max(report['prompt_tokens'])} tokens, "
          f"load avg {report['loadavg_before'][0]} -> {report['loadavg_after'][0]}")
    print(f"{'':32} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'ratio':>6} {'prefill s':>9} {'packed s':>9} {'decode s':>9} {'steps':>6} {'ms/step':>8} {'ctx':>7}")
    for label, r in rows:
        print(f"{label:32} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>8.2f} {r['tokens_per_s'] / r_a['tokens_per_s']:>6.3f} "
              f"{r['prefill_seconds']:>9.2f} {r['packed_seconds']:>9.2f} {r['decode_seconds']:>9.2f} {r['decode_steps']:>6} {r['ms_per_decode_step']:>8.1f} {r['mean_decode_context']:>7.0f}")
    for sch, r in r_b.items():
        print(f"rollout {sch}: {r['decode_slots']} decode slots for {r['tokens']} agent tokens, prefill {r['prefill_tokens']} tokens "
              f"({r['prefill_padded_slots']} padded slots) in {r['prefill_calls']} calls, packed {r['packed_tokens']} tokens in "
              f"{r['packed_calls']} calls ({r['packed_batch_rows']} of them decode-batch rows), {r['observation_tokens']} observation tokens; "
              f"encode {r['encode_seconds']} s, env+other {r['env_and_other_seconds']} s, EM {r['em']:.3f}")
    for sch, r in r_b.items():
        if "drain_seconds" in r:
            print(f"rollout {sch}: until the queue empties {r['queue_empty_tokens']} tokens in {r['queue_empty_seconds']} s "
                  f"({r['steady_tokens_per_s']} tok/s, ratio per round {steady[sch]}), "
                  f"then the drain: {r['drain_tokens']} tokens in {r['drain_seconds']} s; longest episode {r['longest_episode_tokens']} tokens")
    if cfg.repeats > 1:
        print("ratio within each round: " + ", ".join(f"{sch} {per_round[sch]}" for sch in ratios)
              + (f"   (generate interleaved with {schedules[0]} in rounds {[i + 1 for i in paired]})" if paired else ""))
    if pooled is not None:
        print(f"ratio rollout/generate over the interleaved rounds together: {schedules[0]} {pooled:.3f}")
    print("ratio rollout/generate (best of each): " + ", ".join(f"{sch} {x:.3f}" for sch, x in ratios.items())
          + (f"   policy/generate = {report['ratio_policy_over_generate']:.3f}" if r_c else ""))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
