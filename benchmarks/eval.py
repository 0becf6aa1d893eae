"""Evaluate any policy on the QA suite with the same env and rollout code as training.

    python -m benchmarks.eval model=scripted datasets=hotpotqa,nq limit=100 out=results/eval_baseline
    python -m benchmarks.eval model=student datasets=hotpotqa limit=20 greedy=true
    python -m benchmarks.eval model=oracle datasets=WebQA-v0
    python -m benchmarks.eval model=student datasets=gsm8k,math500 n=8 limit=100   # Math-v0: mean@8, pass@k

``model``: ``scripted`` (= ``baseline``), ``oracle``, ``student``, ``teacher``, ``small`` (the
embedded models), a local path or hub id (transformers). ``datasets``: a comma list of QA names
(``nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle``; ``gsm8k,math500`` for Math-v0)
or env ids. ``n`` samples per question (sampled at ``temperature``) give mean@n accuracy and the
unbiased pass@k for k = 1, 2, 4, ... <= n. Every override
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
    greedy: Optional[bool] = None  # None: greedy when n == 1, sampled at `temperature` when n > 1
    n: int = 1  # samples per question (n > 1: mean@n accuracy and unbiased pass@k, e.g. datasets=gsm8k,math500 n=8)
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
    record: str = ""  # a JSONL path: record every retrieval with its result (corpora/recording.py)
    replay: str = ""  # a recording to serve instead of the index: no index or network needed
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


def typed_config(argv: list[str], schema, choices: dict | None = None):
    """:func:`parse_config` as the schema's dataclass; each key of ``choices`` must be one of its values."""
    cfg = OmegaConf.to_object(parse_config(argv, schema))
    for key, allowed in (choices or {}).items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"error: bad value for {key!r}: {getattr(cfg, key)!r}; choose from {sorted(allowed)}")
    return cfg


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


def record_key(rec: dict) -> str:
    """A results line's key: the question id, plus ``#s`` for sample s > 0 (``n`` > 1)."""
    s = rec.get("sample") or 0
    return rec["question_id"] if not s else f"{rec['question_id']}#{s}"


def read_done(path: Path) -> dict[str, dict]:
    """Finished episodes in a results file by ``record_key`` (a later line for the same key wins);
    a torn last line (killed mid-write) is cut off."""
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
            done[record_key(rec)] = rec
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
    return done


def env_kwargs_for(env_id: str, cfg) -> dict:
    """The CLI's env keys that the env takes: retrieval keys for WebQA envs; none for Math-v0."""
    import envs

    if envs.REGISTRY.get(env_id, ("",))[0] == envs.MATH:
        return {}
    kw = {"top_k": cfg.top_k, "retriever": cfg.retriever}
    if cfg.record or cfg.replay:
        kw |= {"record": cfg.record or None, "replay": cfg.replay or None}
    if cfg.max_turns is not None:
        kw["max_turns"] = cfg.max_turns
    return kw


def math_table(summary: dict[str, dict]) -> str:
    """Accuracy (mean@n), unbiased pass@k, extraction failures and tokens per answer."""
    ks = sorted({k for s in summary.values() for k in s if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    head = "| dataset | questions | samples/question | accuracy (mean@n) | " + " | ".join(ks) + " | extraction failures | grader fallbacks | tokens/answer |"
    sep = "|" + "---|" * (7 + len(ks))
    rows = [f"| {d} | {s.get('questions', s['episodes'])} | {s.get('samples_per_question', 1)} | {s['em']:.3f} | "
            + "".join(f"{s[k]:.3f} | " if k in s else "- | " for k in ks)
            + f"{s['extraction_failures']:.3f} | {s.get('grader_fallback', 0)} | {s['avg_agent_tokens']:.0f} |"
            for d, s in summary.items() if s.get("episodes")]
    return "\n".join([head.replace("|  |", "|"), sep, *rows])


def markdown_table(summary: dict[str, dict]) -> str:
    """The web-QA table, and the math table for datasets graded by math-verify (``grader_*`` keys)."""
    maths = {d: s for d, s in summary.items() if "grader_fallback" in s}
    summary = {d: s for d, s in summary.items() if d not in maths}
    if not summary:
        return math_table(maths)
    head = "| dataset | episodes | EM | F1 | cover-EM | avg turns | avg searches | invalid-action rate | answered |\n|---|---|---|---|---|---|---|---|---|"
    rows = [
        f"| {d} | {s['episodes']} | {s['em']:.3f} | {s['f1']:.3f} | {s['cover_em']:.3f} | {s['avg_turns']:.2f} | {s['avg_searches']:.2f} | {s['invalid_action_rate']:.3f} | {s['answered']:.3f} |"
        for d, s in summary.items() if s.get("episodes")
    ]
    return "\n".join([head, *rows]) + (f"\n\n{math_table(maths)}" if maths else "")


def sampling_for(cfg):
    """Greedy for n = 1 unless asked otherwise; sampled at ``temperature`` for n > 1."""
    from agents.policy import SamplingParams

    if cfg.n < 1:
        raise SystemExit(f"error: n must be >= 1, got {cfg.n}")
    greedy = cfg.n == 1 if cfg.greedy is None else cfg.greedy
    if greedy and cfg.n > 1:
        raise SystemExit("error: n > 1 samples of a greedy policy are all the same; drop greedy=true (or set greedy=false)")
    if cfg.feedback and cfg.n > 1:
        raise SystemExit("error: feedback=true evaluates one episode per question (n=1)")
    return SamplingParams(temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)


def fingerprint_of(probe, env_id: str, cfg) -> dict:
    """What the numbers depend on besides the model: env, QA set, samples, prompt, corpus and index."""
    fp = {"env_id": env_id, "qa_set": probe.dataset, "samples_per_question": cfg.n,
          "prompt_sha256": hashlib.sha256(probe.prompt_template.encode()).hexdigest()[:16]}
    for key in ("record", "replay"):  # the recording a run wrote or read
        path = getattr(probe, key, None)
        if path:
            fp[key] = str(path)
            if key == "replay":
                fp["replay_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    if hasattr(probe, "retriever_spec"):  # a retrieval env: which corpus and index
        retr = probe.retriever
        meta = getattr(retr, "meta", {})
        fp |= {"corpus": meta.get("source", probe.retriever_spec), "corpus_passages": meta.get("num_passages"),
               "index": str(getattr(retr, "folder", probe.retriever_spec)), "tokenizer": meta.get("tokenizer"),
               "retriever": type(getattr(retr, "inner", retr)).__name__, "backend": getattr(probe, "backend", None)}
        if isinstance(meta.get("dense"), dict):  # dense and hybrid: the encoder
            fp["encoder"] = meta["dense"].get("model")
    return fp


def run_dataset(name: str, make_env, questions: list[dict], out: Path, policy, privileged: bool, sampling, cfg, bar,
                teacher=None, feedback: dict | None = None) -> list[dict]:
    """Every question's ``n`` episodes, resuming from ``OUT/<name>.jsonl``: a question whose n
    records are all there is skipped; one with only some of them (a kill) is rolled out again,
    all n. Each episode is appended (and fsynced) as it finishes. Returns the records in
    question, then sample, order."""
    path = out / f"{name}.jsonl"
    done = read_done(path)
    keys = lambda q: [record_key({"question_id": q["id"], "sample": s}) for s in range(cfg.n)]  # noqa: E731
    complete = [q for q in questions if all(k in done for k in keys(q))]
    todo = [] if cfg.summarise_only else [q for q in questions if q not in complete]
    recs = [done[k] for q in complete for k in keys(q)]
    bar.update(len(recs))
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
                     with_privileged=privileged, batch_size=cfg.batch_size, schedule=cfg.schedule, on_episode=write,
                     samples=cfg.n)
    order = {q["id"]: i for i, q in enumerate(questions)}
    return sorted(recs, key=lambda r: (order[r["question_id"]], r.get("sample") or 0))


def write_report(out: Path, cfg, model_desc: str, summary: dict, fingerprint: dict, feedback: dict, seconds: float,
                 max_turns) -> None:
    from common.files import atomic_write_json, atomic_write_text

    report = {"model": model_desc, "config": OmegaConf.to_container(cfg), "code_version": code_version(),
              "summary": summary, "fingerprint": fingerprint, "seconds": round(seconds, 2)}
    if feedback:
        report["feedback"] = feedback
    atomic_write_json(out / "summary.json", report)
    table = markdown_table(summary)
    if feedback:
        from benchmarks.feedback import table as feedback_table

        table += "\n\nWith teacher feedback at inference (the teacher's turns are not the student's):\n\n" + feedback_table(feedback)
    atomic_write_text(out / "summary.md", f"# {model_desc}\n\n{table}\n\ncode {report['code_version']}, top-k {cfg.top_k}, max turns {max_turns}\n")
    print("\n" + table)
    print(f"\nwrote {out}/summary.json, {out}/summary.md")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    if cfg.threads:
        # numba's OpenMP layer (the retrieval kernel) shares the runtime with torch: left at all
        # cores, the first search would reset torch's thread count
        os.environ.setdefault("NUMBA_NUM_THREADS", str(cfg.threads))
    import gymnasium as gym
    from tqdm.auto import tqdm

    import envs  # noqa: F401

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = dataset_env_ids(cfg.datasets)
    sampling = sampling_for(cfg)
    policy, privileged, model_desc = build_policy(cfg)
    if model_desc.startswith("scripted:"):  # byte-level ids: token budgets do not apply to scripts
        cfg.max_total_tokens = cfg.max_tokens_per_turn = 10**9
    teacher = None
    if cfg.feedback:
        from benchmarks.feedback import build_teacher

        teacher = build_teacher(cfg.teacher, cfg.dtype) if not cfg.summarise_only else object()
    summary, fingerprint, feedback, t_all = {}, {}, {}, time.perf_counter()
    for name, env_id in pairs:
        env_kwargs = env_kwargs_for(env_id, cfg) | OmegaConf.to_container(cfg.env_kwargs)
        make_env = lambda: gym.make(env_id, **env_kwargs)  # noqa: E731
        probe = make_env().unwrapped
        questions = probe.questions[: cfg.limit] if cfg.limit else probe.questions
        t0 = time.perf_counter()
        with tqdm(total=len(questions) * cfg.n, desc=f"{name} [{model_desc}]", unit="ep") as bar:
            recs = run_dataset(name, make_env, questions, out, policy, privileged, sampling, cfg, bar, teacher, feedback)
        summary[name] = summarise(recs) | {"seconds_this_run": round(time.perf_counter() - t0, 2)}
        fingerprint[name] = fingerprint_of(probe, env_id, cfg)
    write_report(out, cfg, model_desc, summary, fingerprint, feedback, time.perf_counter() - t_all, probe.max_turns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
