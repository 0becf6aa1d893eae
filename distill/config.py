"""The typed config of ``python -m distill.run`` and how it is composed from Hydra groups.

``distill/conf/config.yaml`` lists the defaults (``env``, ``method``, ``model``, ``teacher``
groups under ``distill/conf/``); ``key=value`` overrides any knob (``steps=4``,
``method.env_weight=0.3``, ``model.lora_r=8``), ``group=option`` picks a preset
(``method=opd``, ``model=small``, ``teacher=http``). Composition uses Hydra's compose API, so
the override grammar is Hydra's; the composed config is then checked against the dataclasses
below and the chosen method's config dataclass, so a misspelt key fails with its name.
Only the entry point reads this; components take plain arguments.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

CONF_DIR = Path(__file__).parent / "conf"


@dataclass
class EnvConfig:
    name: str = "webqa"  # webqa (math is reserved for Math-v0, a later issue)
    id: str = "WebQA-HotpotQA-train-v0"  # training questions (HotpotQA train sample)
    eval_id: str = "WebQA-v0"  # held-out questions (HotpotQA dev subset, never trained on)
    retriever: str = "bundled"
    top_k: int = 3
    max_turns: Optional[int] = None  # None: the env's own default (WebQA-v0: 4)
    reward: str = "auto"  # em | f1 | cover_em; auto: AUTO_REWARD[method], else em
    protocol: str = "tags"


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
class TeacherConfig:
    kind: str = "auto"  # auto | local | self | http | vllm | none (auto: see AUTO_TEACHER)
    name: str = "teacher"  # local/vllm: model name; http: model field sent to the server
    dtype: str = "float32"
    device: str = "auto"
    url: str = ""  # http
    tokenizer: str = ""  # http: tokenizer of the served model (for token-level methods)
    timeout: float = 60.0
    retries: int = 2
    concurrency: int = 8
    logprobs: bool = False  # http: the server returns prompt log-probs with echo
    api_key: str = ""
    batch_size: int = 4  # local: sequences per teacher forward


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
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    steps: int = 3
    questions_per_step: int = 2
    group_size: int = 2
    max_tokens_per_turn: int = 96
    max_total_tokens: int = 768
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


# teacher=auto (the default) picks per method; any other teacher=... wins.
AUTO_TEACHER = {"grpo": "none", "opsd": "self"}
SAME_TOKENIZER_METHODS = ("opd", "eopd", "oprd")
# env.reward=auto (the default) picks the training reward per method: ovd's outcome reward is F1
# for web QA (OVD Eq. 2); the held-out evaluation reports EM and F1 whatever it is.
AUTO_REWARD = {"ovd": "f1"}


class ConfigError(ValueError):
    pass


def compose(overrides: list[str]):
    """Hydra composition of ``distill/conf`` with command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="distill"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except HydraException as exc:
        msg = str(exc).strip()
        m = re.match(r"Could not override '([^']+)'", msg)
        if m:
            msg = f"unknown config key {m.group(1)!r} (python -m distill.run --cfg prints every key)"
        raise ConfigError(msg) from None


def resolve(overrides: list[str]) -> tuple[TrainConfig, Any]:
    """(typed TrainConfig, typed method config) from overrides; errors name the bad key."""
    return _typed(compose(overrides))


def resolve_saved(saved, overrides: list[str]) -> tuple[TrainConfig, Any]:
    """A saved run's config.yaml with ``key=value`` overrides on top (``resume=DIR``)."""
    bad = [o for o in overrides if "=" not in o or "/" in o.split("=")[0]]
    if bad:
        raise ConfigError(f"resume=DIR takes key=value overrides only, got {bad}")
    try:
        raw = OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))
    except (ConfigKeyError, ValidationError) as exc:
        raise ConfigError(f"bad config key or value {exc.full_key!r}: {exc.msg}") from None
    return _typed(raw)


def _typed(raw) -> tuple[TrainConfig, Any]:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
    except (ConfigKeyError, ValidationError) as exc:
        raise ConfigError(f"bad config key or value {exc.full_key!r}: {exc.msg}") from None
    cfg: TrainConfig = OmegaConf.to_object(merged)
    from distill.methods import METHODS, get_method

    name = cfg.method.get("name")
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; the table has {sorted(METHODS)}")
    method = get_method(name)
    known = {f.name for f in fields(method.config)}
    unknown = sorted(set(cfg.method) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) for method {name!r}: {', '.join('method.' + k for k in unknown)}; known: {sorted(known)}")
    try:
        mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(method.config), cfg.method))
    except (ConfigKeyError, ValidationError) as exc:
        raise ConfigError(f"bad value for method.{exc.key}: {exc.msg}") from None
    except ValueError as exc:
        raise ConfigError(f"method {name!r}: {exc}") from None
    if cfg.env.reward == "auto":
        cfg.env.reward = AUTO_REWARD.get(name, "em")
    if cfg.teacher.kind == "auto":
        cfg.teacher.kind = AUTO_TEACHER.get(name, "local")
        if cfg.teacher.kind != "local":
            cfg.teacher.name = cfg.teacher.kind
        elif cfg.model.name == "small" and name in SAME_TOKENIZER_METHODS:
            # the embedded teacher's tokenizer (Qwen) is not SmolLM2's: a model=small run of a
            # token-level method gets the only same-tokenizer teacher there is, SmolLM2 itself
            # (signal 0 until the adapter moves the student away from it; a demo of the mechanics)
            cfg.teacher.name = "small"
    return cfg, mcfg


def to_yaml(cfg: TrainConfig, mcfg) -> str:
    from dataclasses import asdict

    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    d["method"] = asdict(mcfg)
    return OmegaConf.to_yaml(d)
