"""The typed config of ``python -m distill.run`` and how it is composed from Hydra groups.

``distill/conf/config.yaml`` lists the defaults (``env``, ``method``, ``model``, ``teacher``
groups under ``distill/conf/``); ``key=value`` overrides any knob (``steps=4``,
``method.env_weight=0.3``, ``model.lora_r=8``), ``group=option`` picks a preset
(``method=opd``, ``model=small``, ``teacher=http``). Composition uses Hydra's compose API, so
the override grammar is Hydra's; the composed config is then checked against the dataclasses
below, the chosen method's config dataclass and the chosen teacher backend's (``teacher`` is
``kind`` plus that backend's keys, e.g. ``url`` and ``timeout`` for http, ``batch_size`` for
local), so a misspelt key, or one the backend does not have, fails with its name, and
every value against ``RULES`` (one table: key, what is allowed, the check), so a bad value is one
line ``<key>: <what is allowed>, got <value>`` before anything starts.
Only the entry point reads this; components take plain arguments.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from distill.teachers import BACKENDS as TEACHER_BACKENDS
from envs.actions import PROTOCOLS
from envs.grading import REWARD_METRICS

CONF_DIR = Path(__file__).parent / "conf"


@dataclass
class EnvConfig:
    name: str = "webqa"  # webqa | math (distill/train.py ENV_KWARGS: which config keys each env takes)
    id: str = "WebQA-HotpotQA-train-v0"  # training questions (HotpotQA train sample)
    eval_id: str = "WebQA-v0"  # held-out questions (HotpotQA dev subset, never trained on)
    retriever: str = "bundled"
    top_k: int = 3
    max_turns: Optional[int] = None  # None: the env's own default (WebQA-v0: 4)
    reward: str = "auto"  # em | f1 | cover_em; auto: the method's default_reward (ovd: f1, OVD Eq. 2; else em)
    protocol: str = "tags"
    max_tokens_per_turn: Optional[int] = None  # the env's token budget per turn; None: the top-level max_tokens_per_turn


@dataclass
class ModelConfig:
    name: str = "student"  # student | teacher | small | tiny (random, tests) | hub id | path
    dtype: str = "float32"  # fp32 trains faster than bf16 on CPU; bf16 on GPU
    device: str = "auto"
    lora: bool = True  # False = full fine-tuning
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    # recompute each block's activations in the backward pass instead of keeping them: the
    # update's memory drops from ~layers x (attention + MLP activations) to one block's worth
    gradient_checkpointing: bool = True
    tiny_hidden: int = 64  # model=tiny only
    tiny_layers: int = 2


@dataclass
class RolloutConfig:
    """Who samples the student's episodes (``distill/rollout_engine.py``)."""

    engine: str = "transformers"  # transformers: the trained module itself | vllm: an in-process vllm.LLM
    # the sampler's dtype ("": model.dtype); another one samples with a cast copy of the student.
    # fast (default): bfloat16 where this machine computes it natively (agents.models.native_bf16),
    # with the transformers engine and a real model; model.dtype otherwise (and for model=tiny)
    dtype: str = "fast"
    # vllm only: the engine's memory on a GPU (a fraction, shared with the trainer: colocated)
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int = 0  # vllm: the KV cache in bytes (0: from gpu_memory_utilization; vLLM's CPU build needs it)
    max_model_len: int = 0  # vllm: 0 = the model's own
    enforce_eager: bool = False  # vllm: no CUDA graphs (faster start, slower steps)
    sleep: bool = False  # vllm on a GPU: sleep mode frees the engine's weights and KV cache during each update
    url: str = ""  # vllm: a separate `vllm serve` endpoint (http://host:port/v1) instead of the in-process engine
    served_model: str = ""  # its base model's served name ("": the first of its /v1/models)
    timeout: float = 300.0  # seconds per request to that server


@dataclass
class EvalConfig:
    questions: int = 4  # held-out questions evaluated greedily before and after training
    before: bool = True
    after: bool = True


@dataclass
class TrainConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    method: dict = field(default_factory=lambda: {"name": "ovd"})
    model: ModelConfig = field(default_factory=ModelConfig)
    # a plain dict here (``kind`` plus that backend's keys); ``resolve`` turns it into the backend's own
    # config dataclass (``distill.teachers.BACKENDS``), so ``cfg.teacher`` is e.g. a HttpTeacherConfig
    teacher: dict = field(default_factory=lambda: {"kind": "auto"})
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    steps: int = 2
    questions_per_step: int = 2
    group_size: int = 4
    # the evaluation's budgets (agents/evaluation.py): a 4-turn episode with three 3-passage
    # searches needs about 2,600 tokens, and a budget under that truncates before the answer
    max_tokens_per_turn: int = 500
    max_total_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 2
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default
    output_dir: str = ""  # default runs/<env>-<method>-<model>
    resume: str = "false"  # true = continue output_dir; or a run directory
    overwrite: bool = False  # start afresh in an existing run directory
    save_every: int = 1
    keep_checkpoints: int = 2
    max_empty_steps: int = 2  # this many steps in a row that drop every trajectory stop the run with an error
    tensorboard: bool = True
    wandb: bool = False  # log to Weights & Biases too (when installed)
    progress: bool = True




class ConfigError(ValueError):
    """One line for the user: ``<key>: <what is allowed>, got <value>``."""


# -- validation: one table, one line per key ------------------------------------------------------------
ENV_NAMES = ("webqa", "math")  # env=<name> presets (distill/conf/env/), kwargs in distill/train.py ENV_KWARGS
TEACHER_KINDS = ("auto", *TEACHER_BACKENDS)  # auto: the method's default_teacher; else a row of distill.teachers.BACKENDS
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "auto", "fast")  # agents.models (fast: resolved in _typed)


@dataclass(frozen=True)
class Rule:
    key: str  # dotted path in TrainConfig
    allowed: str  # what the error line says is allowed
    ok: Callable[[Any], bool]
    when: Optional[Callable[["TrainConfig"], bool]] = None  # the rule applies only where this holds


def _at_least(lo: int) -> tuple[str, Callable[[Any], bool]]:
    return f"an integer >= {lo}", lambda v: v >= lo


def _positive() -> tuple[str, Callable[[Any], bool]]:
    return "a finite number > 0", lambda v: math.isfinite(v) and v > 0


def _non_negative() -> tuple[str, Callable[[Any], bool]]:
    return "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0


def _one_of(*xs: str) -> tuple[str, Callable[[Any], bool]]:
    return "one of " + ", ".join(xs), lambda v: v in xs


def _url_list(v: str) -> bool:
    """One http(s) URL, or several separated by commas, none twice."""
    urls = [u.strip().rstrip("/") for u in v.split(",")]
    return all(re.fullmatch(r"https?://[^\s/,]+(/\S*)?", u) for u in urls) and len(set(urls)) == len(urls)


RULES: tuple[Rule, ...] = (
    Rule("steps", *_at_least(1)),
    Rule("questions_per_step", *_at_least(1)),
    Rule("group_size", *_at_least(1)),
    Rule("micro_batch_size", *_at_least(1)),
    Rule("max_tokens_per_turn", *_at_least(1)),
    Rule("max_total_tokens", *_at_least(1)),
    Rule("save_every", *_at_least(1)),
    Rule("keep_checkpoints", *_at_least(1)),
    Rule("max_empty_steps", *_at_least(1)),
    Rule("warmup_steps", *_at_least(0)),
    Rule("threads", "an integer >= 0 (0: torch's default)", lambda v: v >= 0),
    Rule("seed", "an integer in [0, 2**32)", lambda v: 0 <= v < 2**32),
    Rule("lr", *_positive()),
    Rule("weight_decay", *_non_negative()),
    Rule("max_grad_norm", *_positive()),
    Rule("temperature", "a finite number >= 0 (0: greedy)", lambda v: math.isfinite(v) and v >= 0),
    Rule("top_p", "a number in (0, 1]", lambda v: 0 < v <= 1),
    Rule("eval.questions", *_at_least(0)),
    Rule("env.name", *_one_of(*ENV_NAMES)),
    Rule("env.id", "a Gymnasium env id", lambda v: bool(v.strip())),
    Rule("env.eval_id", "a Gymnasium env id", lambda v: bool(v.strip())),
    Rule("env.retriever", "bundled, an index dir, a corpus file or http://host:port", lambda v: bool(v.strip())),
    Rule("env.top_k", *_at_least(1)),
    Rule("env.max_turns", "an integer >= 1, or null for the env's default", lambda v: v is None or v >= 1),
    Rule("env.max_tokens_per_turn", "an integer >= 1, or null for the top-level max_tokens_per_turn", lambda v: v is None or v >= 1),
    Rule("env.reward", *_one_of("auto", *REWARD_METRICS)),
    Rule("env.protocol", *_one_of(*PROTOCOLS)),
    Rule("model.dtype", *_one_of(*DTYPES)),
    Rule("model.lora_r", *_at_least(1)),
    Rule("model.lora_alpha", *_positive()),
    Rule("model.lora_dropout", "a number in [0, 1)", lambda v: 0 <= v < 1),
    Rule("model.tiny_hidden", *_at_least(1)),
    Rule("model.tiny_layers", *_at_least(1)),
    Rule("rollout.engine", *_one_of("transformers", "vllm")),
    Rule("rollout.dtype", *_one_of("", *(d for d in DTYPES if d != "auto"))),
    Rule("rollout.gpu_memory_utilization", "a number in (0, 1]", lambda v: 0 < v <= 1),
    Rule("rollout.kv_cache_memory_bytes", *_at_least(0)),
    Rule("rollout.max_model_len", *_at_least(0)),
    Rule("rollout.url", "empty (the in-process engine) or the http:// or https:// base URL of a `vllm serve` endpoint",
         lambda v: v == "" or bool(re.fullmatch(r"https?://[^\s/,]+(/\S*)?", v))),
    Rule("rollout.url", "empty with rollout.engine=transformers (a rollout server needs rollout.engine=vllm)",
         lambda v: v == "", when=lambda c: c.rollout.engine == "transformers"),
    Rule("rollout.timeout", *_positive()),
    Rule("model.lora", "true with rollout.engine=vllm (each step's adapter is loaded into vLLM; full fine-tuning "
         "would need a weight push, which is not built)", lambda v: v is True, when=lambda c: c.rollout.engine == "vllm"),
    Rule("model.name", "a model vLLM can load with rollout.engine=vllm (an embedded name, a folder or a hub id; "
         "model=tiny lives only in memory)", lambda v: v != "tiny", when=lambda c: c.rollout.engine == "vllm" and not c.rollout.url),
    Rule("teacher.url", "the http:// or https:// base URL of an OpenAI-compatible server, or several separated by "
         "commas, each once (a pool serving the same model; teacher=http requires one)",
         lambda v: _url_list(v), when=lambda c: c.teacher.kind == "http"),
    Rule("teacher.dtype", *_one_of(*DTYPES)),
    Rule("teacher.timeout", *_positive()),
    Rule("teacher.retries", *_at_least(0)),
    Rule("teacher.concurrency", *_at_least(1)),
    Rule("teacher.down_seconds", *_positive()),
    Rule("teacher.batch_size", *_at_least(1)),
)


def validate(cfg: "TrainConfig") -> None:
    """Raise ``ConfigError`` for the first value ``RULES`` refuses (a missing key is skipped)."""
    for rule in RULES:
        if rule.when is not None and not rule.when(cfg):
            continue
        obj, missing = cfg, object()
        for part in rule.key.split("."):
            obj = getattr(obj, part, missing)
        if obj is missing:
            continue
        try:
            good = bool(rule.ok(obj))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(f"{rule.key}: {rule.allowed}, got {_show(obj)}")


def _show(v: Any) -> str:
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v)


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _omegaconf_error(exc, prefix: str = "") -> ConfigError:
    """An OmegaConf type or key error as ``<key>: <what is allowed>, got <value>``."""
    key = prefix + str(exc.full_key or exc.key or "?")
    if isinstance(exc, ConfigKeyError):
        return ConfigError(f"{key}: not a config key (python -m distill.run --cfg prints every key), got {key!r}")
    first = (exc.msg or "").strip().splitlines()[0] if exc.msg else "a valid value"
    m = re.search(r"could not be converted to (\w+)", first)
    allowed = _TYPE_WORDS.get(m.group(1), f"a {m.group(1)}") if m else first
    return ConfigError(f"{key}: {allowed}, got {_show(exc.value)}")


def compose(overrides: list[str]):
    """Hydra composition of ``distill/conf`` with command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="distill"):
            return hydra_compose(config_name="config", overrides=_teacher_keys_forced(overrides))
    except MissingConfigException as exc:  # group=option with no such option
        group, _, name = (exc.missing_cfg_file or "?/?").rpartition("/")
        raise ConfigError(f"{group}: one of {', '.join(exc.options or [])}, got {name!r}") from None
    except HydraException as exc:
        msg = str(exc).strip()
        m = re.match(r"Could not override '([^']+)'", msg)
        if m:
            key = m.group(1)
            given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
            raise ConfigError(f"{key}: not a config key (python -m distill.run --cfg prints every key), got {given!r}") from None
        raise ConfigError(" ".join(msg.split())) from None


def _teacher_keys_forced(overrides: list[str]) -> list[str]:
    """``teacher.<key>=v`` as Hydra's add-or-override ``++teacher.<key>=v``. A teacher preset holds
    only its backend's keys (``teacher=auto`` holds just ``kind``), so Hydra's struct mode would
    refuse e.g. ``teacher.name=`` under ``teacher=auto`` with a message that cannot name the
    backend; ``_teacher`` checks every key against the chosen backend's dataclass instead.
    ``teacher.url=URL1,URL2`` (a teacher pool) is quoted, so Hydra reads one string, not a sweep."""
    out = []
    for o in overrides:
        if re.match(r"teacher\.url=[^\[\'\"].*,", o) and "'" not in o:
            o = "teacher.url='" + o.split("=", 1)[1] + "'"
        out.append(f"++{o}" if re.match(r"teacher\.\w+=", o) else o)
    return out


def resolve(overrides: list[str]) -> tuple[TrainConfig, Any]:
    """(typed TrainConfig, typed method config) from overrides; errors name the bad key."""
    return _typed(compose(overrides))


def resolve_saved(saved, overrides: list[str]) -> tuple[TrainConfig, Any]:
    """A saved run's config.yaml with ``key=value`` overrides on top (``resume=DIR``)."""
    bad = [o for o in overrides if "=" not in o or "/" in o.split("=")[0]]
    if bad:
        raise ConfigError(f"resume: a run directory takes key=value overrides only, got {' '.join(bad)}")
    teacher = saved.get("teacher") if OmegaConf.is_dict(saved) else None
    if OmegaConf.is_dict(teacher) and teacher.get("kind") in TEACHER_BACKENDS:
        # a run saved before each backend had its own keys holds all twelve: keep its backend's
        known = {f.name for f in fields(TEACHER_BACKENDS[teacher.kind].config)}
        saved = OmegaConf.merge(saved, {})  # a copy
        saved.teacher = {k: v for k, v in teacher.items() if k in known}
    try:
        raw = OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))
    except (ConfigKeyError, ValidationError) as exc:
        raise _omegaconf_error(exc) from None
    return _typed(raw)


def _typed(raw) -> tuple[TrainConfig, Any]:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
    except (ConfigKeyError, ValidationError) as exc:
        raise _omegaconf_error(exc) from None
    cfg: TrainConfig = OmegaConf.to_object(merged)
    from distill.methods import METHODS, get_method

    name = cfg.method.get("name")
    if name not in METHODS:
        raise ConfigError(f"method.name: one of {', '.join(sorted(METHODS))}, got {_show(name)}")
    method = get_method(name)
    known = {f.name for f in fields(method.config)}
    unknown = sorted(set(cfg.method) - known)
    if unknown:
        raise ConfigError(f"method.{unknown[0]}: not a key of method {name} (known: {', '.join(sorted(known))}), "
                          f"got {_show(cfg.method[unknown[0]])}")
    try:
        mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(method.config), cfg.method))
    except (ConfigKeyError, ValidationError) as exc:
        raise _omegaconf_error(exc, prefix="method.") from None
    except ValueError as exc:  # the method config's own checks (__post_init__): name the field it mentions
        words = re.findall(r"\w+", str(exc))
        key = next((w for w in words if w in known and w != "name"), None)
        raise ConfigError(f"method.{key}: {exc}" if key else f"method ({name}): {exc}") from None
    if cfg.env.reward == "auto":
        cfg.env.reward = method.default_reward  # the held-out evaluation reports EM and F1 whatever it is
    cfg.teacher = _teacher(cfg.teacher, method, cfg.model.name)
    validate(cfg)
    # dtype "fast" (bfloat16 where this machine computes it natively, else float32) is resolved
    # here, so config.yaml records what ran and a resumed run keeps it on another machine
    from agents.models import resolve_dtype

    device = None if cfg.model.device == "auto" else cfg.model.device
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, device)
    if cfg.rollout.dtype == "fast" and (cfg.rollout.engine != "transformers" or cfg.model.name == "tiny"):
        cfg.rollout.dtype = ""  # vLLM: the engine's dtype is model.dtype; the tiny test model: nothing to gain
    cfg.rollout.dtype = resolve_dtype(cfg.rollout.dtype, device)
    if hasattr(cfg.teacher, "dtype"):
        tdev = getattr(cfg.teacher, "device", "auto")
        cfg.teacher.dtype = resolve_dtype(cfg.teacher.dtype, None if tdev == "auto" else tdev)
    return cfg, mcfg


def _teacher(raw: dict, method, model_name: str):
    """The ``teacher`` node as its backend's config dataclass (a row of ``distill.teachers.BACKENDS``);
    a key that backend does not have fails with its name and the backend's keys."""
    raw = dict(raw)
    if OmegaConf.is_list(raw.get("url")) or isinstance(raw.get("url"), (list, tuple)):
        raw["url"] = ",".join(str(u) for u in raw["url"])  # a teacher pool as a list: its comma-separated form
    kind = raw.get("kind", "auto")
    if kind not in TEACHER_KINDS:
        raise ConfigError(f"teacher.kind: one of {', '.join(TEACHER_KINDS)}, got {_show(kind)}")
    picked = ""
    if kind == "auto":
        kind = raw["kind"] = method.default_teacher
        picked = f"teacher=auto picks {kind} for method {method.name}; "
        if kind == "local" and model_name == "small" and method.token_level and "name" not in raw:
            # the embedded teacher's tokenizer (Qwen) is not SmolLM2's: a model=small run of a
            # token-level method gets the only same-tokenizer teacher there is, SmolLM2 itself
            # (signal 0 until the adapter moves the student away from it; a demo of the mechanics)
            raw["name"] = "small"
    config = TEACHER_BACKENDS[kind].config
    known = [f.name for f in fields(config)]
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise ConfigError(f"teacher.{unknown[0]}: not a key of teacher {kind} ({picked}known: {', '.join(known)}), "
                          f"got {_show(raw[unknown[0]])}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config), raw))
    except (ConfigKeyError, ValidationError) as exc:
        raise _omegaconf_error(exc, prefix="teacher.") from None


def to_yaml(cfg: TrainConfig, mcfg) -> str:
    d = OmegaConf.to_container(OmegaConf.structured(replace(cfg, teacher={})))
    d["method"] = asdict(mcfg)
    d["teacher"] = asdict(cfg.teacher) if is_dataclass(cfg.teacher) else dict(cfg.teacher)
    return OmegaConf.to_yaml(d)
