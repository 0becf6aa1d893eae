"""Teachers: one protocol, capability by capability.

A teacher offers some of these capabilities (``teacher.capabilities``):

=================  ===================================================================
``score``          reply to chat messages (a verbal 0-9 score for ovd)
``logprobs``       log q(seq[t] | seq[:t]) at given target positions (opd k1)
``topk_logprobs``  the teacher's own top-k token ids and log-probs at target positions
``distribution``   full-vocabulary logits at target positions (JSD, top-k over the
                   student's tokens, teacher entropy for eopd); local only
``hidden_states``  block outputs of chosen layers at target positions (oprd); local only
``act``            a Policy that acts in the env (ovd ``mode=replace``)
=================  ===================================================================

Backends: ``local`` (a transformers model in this process), ``self`` (the student itself with
its LoRA adapters disabled, i.e. the initial policy; for opsd), ``http`` (any OpenAI-compatible
endpoint over ``requests``: scores through chat, log-probs where the server returns prompt
log-probs with ``echo``), ``vllm`` (GPU), and ``none``. Each is one row of ``BACKENDS``: its
config dataclass (the ``teacher.<key>`` knobs it takes, nothing else) and its builder. A method
states what it needs and ``check_capabilities`` fails at start-up with a message naming what is
missing.

Token-level capabilities take ids in the *student's* tokenizer; ``same_tokenizer`` checks that
a teacher can read them (no vocabulary mapping is done).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

CAPABILITIES = ("score", "score_distribution", "logprobs", "topk_logprobs", "distribution", "hidden_states", "act")
TOKEN_LEVEL = frozenset({"logprobs", "topk_logprobs", "distribution", "hidden_states"})


class Teacher(Protocol):
    name: str
    capabilities: frozenset[str]
    tokenizer: Any  # None when unknown (a remote chat-only endpoint)

    def score(self, messages: Sequence[list[dict]], sample: bool = False) -> list[str | None]:
        """One reply per chat; None where the request failed after retries."""
        ...

    def logprobs(self, seqs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[list[float] | None]: ...


class CapabilityError(ValueError):
    pass


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (vocabulary and a probe string)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    probe = "Question: who wrote <search> Hamlet </search>? 1,234 ümlaut"
    return len(a) == len(b) and a.get_vocab() == b.get_vocab() and a.encode(probe, add_special_tokens=False) == b.encode(probe, add_special_tokens=False)


def check_capabilities(method: str, needs: frozenset[str], teacher, student_tokenizer) -> None:
    """Raise ``CapabilityError`` naming what ``teacher`` lacks for ``method``."""
    if not needs:
        return
    if teacher is None:
        raise CapabilityError(f"method {method!r} needs a teacher with {sorted(needs)}; got teacher=none")
    missing = sorted(needs - teacher.capabilities)
    if missing:
        raise CapabilityError(
            f"method {method!r} needs teacher capabilities {missing}, which teacher {teacher.name!r} "
            f"({type(teacher).__name__}) does not offer (it offers {sorted(teacher.capabilities)}). "
            + ("A remote endpoint offers token log-probs only if it returns prompt log-probs with echo "
               "(vLLM serve, agents.openai_server): set teacher.logprobs=true. " if type(teacher).__name__ == "HttpTeacher" else "")
            + "Full distributions and hidden states need a local teacher (teacher=teacher or teacher=self)."
        )
    if needs & TOKEN_LEVEL and not same_tokenizer(teacher.tokenizer, student_tokenizer):
        raise CapabilityError(
            f"method {method!r} compares teacher and student token by token, but teacher {teacher.name!r} "
            "does not share the student's tokenizer (no vocabulary mapping is done). Use a teacher of the "
            "same family (the embedded student and teacher share Qwen2.5's tokenizer), teacher=self, or ovd."
        )


# -- backends: each one's keys (a small dataclass; ``teacher.<key>=...`` on the command line) and
# its builder(cfg, student_model, student_tokenizer, student_name) -> teacher (None: no teacher).
# ``kind`` is every config's first field and names its row of ``BACKENDS``; ``name`` labels the
# teacher in logs (and, for local/vllm, is the model to load).
@dataclass
class NoneTeacherConfig:
    """No teacher (grpo)."""

    kind: str = "none"
    name: str = "none"


@dataclass
class SelfTeacherConfig:
    """The student itself with its LoRA adapters disabled (the initial policy): opsd."""

    kind: str = "self"
    name: str = "self"
    batch_size: int = 4  # sequences per teacher forward


def _self(cfg: SelfTeacherConfig, student_model, student_tokenizer, student_name):
    from distill.teachers.local import LocalTeacher

    return LocalTeacher.self_teacher(student_model, student_tokenizer, name=f"self:{student_name}", batch_size=cfg.batch_size)


@dataclass
class LocalTeacherConfig:
    """A transformers model in this process."""

    kind: str = "local"
    name: str = "teacher"  # teacher | student | small | tiny[:HxL] (random, tests) | hub id | path
    # fast: bfloat16 where this machine computes it natively (a GPU, a CPU with AVX512-BF16 or AMX),
    # else float32 (agents.models.native_bf16). The teacher only reads and acts, it never trains:
    # on such a CPU bfloat16 graded 4.0x faster with the same AUROC (results/grader_dtype)
    dtype: str = "fast"
    device: str = "auto"
    batch_size: int = 4  # sequences per teacher forward


def _local(cfg: LocalTeacherConfig, *_):
    from agents.models import load_model, tiny_random_model
    from distill.teachers.local import LocalTeacher

    if cfg.name.startswith("tiny"):  # "tiny" or "tiny:HIDDENxLAYERS": random, for tests (seed 1)
        h, n = (int(x) for x in cfg.name.split(":", 1)[1].split("x")) if ":" in cfg.name else (64, 2)
        model, tok = tiny_random_model("small", hidden_size=h, num_layers=n, seed=1)
    else:
        model, tok = load_model(cfg.name, dtype=cfg.dtype, device=cfg.device if cfg.device != "auto" else None)
    model.requires_grad_(False)
    return LocalTeacher(model, tok, name=cfg.name, batch_size=cfg.batch_size)


@dataclass
class HttpTeacherConfig:
    """Any OpenAI-compatible endpoint, or a pool of them serving the same model (load spread, failover)."""

    kind: str = "http"
    url: str = ""  # required: the server's base URL, e.g. http://127.0.0.1:8001/v1; a pool: several, comma-separated
    name: str = ""  # the model field sent to the server ("" = none sent)
    tokenizer: str = ""  # the served model's tokenizer (needed for token-level methods)
    timeout: float = 60.0
    retries: int = 2
    concurrency: int = 8
    logprobs: bool = False  # the server returns prompt log-probs with echo
    api_key: str = ""
    down_seconds: float = 30.0  # a pool skips an endpoint that failed for this long, then probes it again


def _http(cfg: HttpTeacherConfig, *_):
    from distill.teachers.http import HttpTeacher

    tok = None
    if cfg.tokenizer:
        from agents.models import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
    return HttpTeacher(cfg.url, model=cfg.name or None, tokenizer=tok, timeout=cfg.timeout, retries=cfg.retries,
                       concurrency=cfg.concurrency, logprobs=cfg.logprobs, api_key=cfg.api_key or None,
                       down_seconds=cfg.down_seconds)


@dataclass
class VLLMTeacherConfig:
    """The teacher in vLLM on this GPU."""

    kind: str = "vllm"
    name: str = "teacher"
    dtype: str = "float32"  # float32 (the CPU default) means bfloat16 on a GPU


def _vllm(cfg: VLLMTeacherConfig, *_):
    import torch

    from distill.teachers.vllm import VLLMTeacher

    # the config's float32 is the CPU default; on a GPU the vLLM teacher runs in bfloat16
    dtype = "bfloat16" if cfg.dtype == "float32" and torch.cuda.is_available() else cfg.dtype
    return VLLMTeacher(cfg.name, dtype=dtype)


@dataclass(frozen=True)
class Backend:
    config: type  # the backend's keys: a dataclass whose first field is ``kind``
    build: Callable[..., Any]  # (cfg, student_model, student_tokenizer, student_name) -> teacher | None


# kind -> (config, builder). A backend is a teacher file, a config and builder here, and a line.
BACKENDS: dict[str, Backend] = {
    "none": Backend(NoneTeacherConfig, lambda *a: None),
    "self": Backend(SelfTeacherConfig, _self),
    "local": Backend(LocalTeacherConfig, _local),
    "http": Backend(HttpTeacherConfig, _http),
    "vllm": Backend(VLLMTeacherConfig, _vllm),
}


def make_teacher(cfg, student_model=None, student_tokenizer=None, student_name: str | None = None):
    """Build the teacher a backend config describes (``cfg.kind``: a row of ``BACKENDS``)."""
    if cfg.kind not in BACKENDS:
        raise ValueError(f"unknown teacher kind {cfg.kind!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[cfg.kind].build(cfg, student_model, student_tokenizer, student_name)
