"""Evaluate any policy on the QA suite with the same env and rollout code as training.

    python -m benchmarks.eval model=scripted datasets=hotpotqa,nq limit=100 out=results/eval_baseline
    python -m benchmarks.eval model=student datasets=hotpotqa limit=20 greedy=true
    python -m benchmarks.eval model=oracle datasets=WebQA-v0

``model``: ``scripted`` (= ``baseline``), ``oracle``, ``student``, ``teacher``, ``small`` (the
embedded models), a local path or hub id (transformers). ``datasets``: a comma list of QA names
(``nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle``) or env ids. Every override
is ``key=value``; an unknown key is an error that names it.

Writes ``OUT/<dataset>.jsonl`` (one line per finished episode; a rerun skips the ids already
there, so an interrupted run resumes with no episode lost or duplicated), ``OUT/summary.json``
and ``OUT/summary.md`` (the table plus a fingerprint: corpus, index, model, prompt, top-k,
code version). ``python -m benchmarks.viewer OUT/hotpotqa.jsonl`` renders trajectories as HTML.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from agents.evaluation import episode_record, evaluate, summarise  # noqa: F401 (episode_record: re-exported)


@dataclass
class EvalConfig:
    model: str = "scripted"
    datasets: str = "hotpotqa"
    limit: int | None = 100
    out: str = "results/eval"
    summarise_only: bool = False  # no new episodes: the table of what the results files hold (a stopped run)
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 3  # retrieved passages per search
    max_turns: Optional[int] = None  # None: the env's own default (WebQA-v0: 4)
    max_tokens_per_turn: int = 500  # agents.evaluation.MAX_TOKENS_PER_TURN
    max_total_tokens: int = 4096  # agents.evaluation.MAX_TOTAL_TOKENS
    batch_size: int = 8  # episodes decoding at once (a finished one's place goes to the next question)
    schedule: str = "auto"  # rollout schedule: auto (continuous where the policy has it), lockstep, continuous
    dtype: str = "float32"
    device: str = "cpu"
    retriever: str = "bundled"
    seed: int = 0
    threads: int = 0  # torch threads, 0 = torch's default
    env_kwargs: dict = field(default_factory=dict)
    # teacher feedback at inference (benchmarks/feedback.py): the teacher scores each turn prefix
    # and acts on from the first scoring below threshold; reported apart from the student's numbers
    adapter: str = ""  # a peft adapter folder (a training run's final_adapter) applied to the model
    feedback: bool = False
    teacher: str = "teacher"  # a local/embedded model name, or http://host:port/v1[#model]
    threshold: float = 5.0


def parse_config(argv: list[str], schema=EvalConfig):
    """``key=value`` overrides on a typed schema; unknown keys and bad values name the key."""
    base = OmegaConf.structured(schema)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"error: arguments must be key=value, got {bad}")
    try:
        return OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    except ConfigKeyError as exc:
        raise SystemExit(f"error: unknown config key {exc.key!r}; known keys: {sorted(OmegaConf.to_container(base))}") from None
    except ValidationError as exc:
        raise SystemExit(f"error: bad value for {exc.full_key!r}: {exc.msg}") from None


_CODE_DIRS = ("envs", "corpora", "agents", "distill", "benchmarks", "pyproject.toml")


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root, timeout=5)
        if sha.returncode == 0:
            # "+dirty": the package code differs from that commit (results files do not count)
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *_CODE_DIRS], cwd=root, timeout=5).returncode == 1
            return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("webqa-gym")
    except PackageNotFoundError:
        return "unknown"


def _scripted(cfg, name: str):
    from agents.models import byte_tokenizer
    from agents.scripted import AGENTS
    from agents.scripted_policy import ScriptedPolicy

    return ScriptedPolicy(AGENTS[name], byte_tokenizer()), name == "oracle", f"scripted:{name}"


def _http(cfg, name: str):  # an OpenAI-compatible endpoint, e.g. http://host:8001/v1#small
    from agents.http_policy import OpenAIPolicy, parse_model_url

    url, tok = parse_model_url(name)
    pol = OpenAIPolicy(url, tokenizer=tok)
    return pol, False, f"openai:{url}:{pol.model}"


def _transformers(cfg, name: str):  # an embedded name, a folder or a hub id; "tiny": the trainer's random model (tests)
    import torch

    from agents.hf_policy import TransformersPolicy
    from agents.models import load_model, tiny_random_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if name == "tiny":
        model, tok = tiny_random_model("small", seed=cfg.seed)
    else:
        model, tok = load_model(name, dtype=cfg.dtype, device=cfg.device)
    desc = f"transformers:{name}:{cfg.dtype}"
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter).eval()
        desc += f"+{cfg.adapter}"
    return TransformersPolicy(model, tok), False, desc


def _is_scripted(name: str) -> bool:
    from agents.scripted import AGENTS

    return name in AGENTS


# (matches the model name, builds (policy, needs privileged info, description)): the first row that
# matches builds the policy. A backend is a builder and a line.
POLICY_BACKENDS = [
    (_is_scripted, _scripted),
    (lambda name: name.startswith(("http://", "https://")), _http),
    (lambda name: True, _transformers),
]


def build_policy(cfg):
    """(policy, needs_privileged, description) for ``cfg.model`` (``scripted`` = ``baseline``)."""
    name = {"scripted": "baseline"}.get(cfg.model, cfg.model)
    return next(build for matches, build in POLICY_BACKENDS if matches(name))(cfg, name)


def dataset_env_ids(spec: str) -> list[tuple[str, str]]:
    import envs

    out = []
    for d in [x.strip() for x in spec.split(",") if x.strip()]:
        if d in envs.REGISTRY:
            out.append((d, d))
        elif d.lower() in envs.DATASET_ENV_IDS:
            out.append((d.lower(), envs.DATASET_ENV_IDS[d.lower()]))
        else:
            raise SystemExit(f"error: unknown dataset {d!r}; known: {sorted(envs.DATASET_ENV_IDS)} or an env id {sorted(envs.REGISTRY)}")
    return out


def read_done(path: Path) -> dict[str, dict]:
    """Finished episodes in a results file; a torn last line (killed mid-write) is cut off."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    good_bytes = 0
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                break
            if not raw.endswith(b"\n"):
                break
            done[rec["question_id"]] = rec
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
    return done


def markdown_table(summary: dict[str, dict]) -> str:
    head = "| dataset | episodes | EM | F1 | cover-EM | avg turns | avg searches | invalid-action rate | answered |\n|---|---|---|---|---|---|---|---|---|"
    rows = [
        f"| {d} | {s['episodes']} | {s['em']:.3f} | {s['f1']:.3f} | {s['cover_em']:.3f} | {s['avg_turns']:.2f} | {s['avg_searches']:.2f} | {s['invalid_action_rate']:.3f} | {s['answered']:.3f} |"
        for d, s in summary.items() if s.get("episodes")
    ]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    if cfg.threads:
        # numba's OpenMP layer (the retrieval kernel) shares the runtime with torch: left at all
        # cores, the first search would reset torch's thread count
        os.environ.setdefault("NUMBA_NUM_THREADS", str(cfg.threads))
    import gymnasium as gym
    from tqdm.auto import tqdm

    import envs  # noqa: F401
    from agents.policy import SamplingParams
    from corpora.cache import atomic_write_json, atomic_write_text

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = dataset_env_ids(cfg.datasets)
    policy, privileged, model_desc = build_policy(cfg)
    if model_desc.startswith("scripted:"):  # byte-level ids: token budgets do not apply to scripts
        cfg.max_total_tokens = cfg.max_tokens_per_turn = 10**9
    sampling = SamplingParams(temperature=0.0 if cfg.greedy else cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    env_kwargs = dict(top_k=cfg.top_k, retriever=cfg.retriever, **OmegaConf.to_container(cfg.env_kwargs))
    if cfg.max_turns is not None:
        env_kwargs["max_turns"] = cfg.max_turns
    teacher = None
    if cfg.feedback:
        from benchmarks.feedback import build_teacher

        teacher = build_teacher(cfg.teacher, cfg.dtype) if not cfg.summarise_only else object()
    summary, fingerprint, feedback, t_all = {}, {}, {}, time.perf_counter()
    for name, env_id in pairs:
        make_env = lambda: gym.make(env_id, **env_kwargs)  # noqa: E731
        probe = make_env().unwrapped
        questions = probe.questions[: cfg.limit] if cfg.limit else probe.questions
        path = out / f"{name}.jsonl"
        done = read_done(path)
        todo = [] if cfg.summarise_only else [q for q in questions if q["id"] not in done]
        recs = [done[q["id"]] for q in questions if q["id"] in done]
        bar = tqdm(total=len(questions), initial=len(recs), desc=f"{name} [{model_desc}]", unit="q")
        t0 = time.perf_counter()
        if teacher is not None:
            from benchmarks.feedback import run_feedback

            bar.reset(total=len(questions))
            feedback[name] = run_feedback(policy, teacher, make_env, questions, name, out, sampling, cfg, bar)
            todo, recs = [], [r for r in read_done(path).values() if r["question_id"] in {q["id"] for q in questions}]
        with open(path, "a", encoding="utf-8") as fh:

            def write(tr) -> None:  # each episode as it finishes: a kill loses only those under way
                rec = episode_record(tr, name)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                recs.append(rec)
                bar.update(1)
                bar.set_postfix(EM=f"{summarise(recs)['em']:.3f}")

            if todo:
                evaluate(policy, make_env, [q["id"] for q in todo], name, sampling=sampling,
                         max_tokens_per_turn=cfg.max_tokens_per_turn, max_total_tokens=cfg.max_total_tokens,
                         with_privileged=privileged, batch_size=cfg.batch_size, schedule=cfg.schedule, on_episode=write)
        order = {q["id"]: i for i, q in enumerate(questions)}
        recs.sort(key=lambda r: order[r["question_id"]])
        bar.close()
        summary[name] = summarise(recs) | {"seconds_this_run": round(time.perf_counter() - t0, 2)}
        retr = probe.retriever
        meta = getattr(retr, "meta", {})
        fingerprint[name] = {
            "env_id": env_id,
            "qa_set": probe.dataset,
            "corpus": meta.get("source", probe.retriever_spec),
            "corpus_passages": meta.get("num_passages"),
            "index": str(getattr(retr, "folder", probe.retriever_spec)),
            "tokenizer": meta.get("tokenizer"),
            "prompt_sha256": hashlib.sha256(probe.prompt_template.encode()).hexdigest()[:16],
        }
    report = {
        "model": model_desc,
        "config": OmegaConf.to_container(cfg),
        "code_version": code_version(),
        "summary": summary,
        "fingerprint": fingerprint,
        "seconds": round(time.perf_counter() - t_all, 2),
    }
    if feedback:
        report["feedback"] = feedback
    atomic_write_json(out / "summary.json", report)
    table = markdown_table(summary)
    if feedback:
        from benchmarks.feedback import table as feedback_table

        table += "\n\nWith teacher feedback at inference (the teacher's turns are not the student's):\n\n" + feedback_table(feedback)
    atomic_write_text(out / "summary.md", f"# {model_desc}\n\n{table}\n\ncode {report['code_version']}, top-k {cfg.top_k}, max turns {probe.max_turns}\n")
    print("\n" + table)
    print(f"\nwrote {out}/summary.json, {out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
