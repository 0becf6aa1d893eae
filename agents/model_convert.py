"""An embedded model's GGUF turned, once, into an ordinary transformers folder in the gym cache.

:func:`convert_model` dequantizes the verified GGUF (:mod:`agents.model_parts`) to float32 and
saves safetensors + tokenizer + chat template in ``cache_root()/models/NAME``;
:func:`tokenizer_folder` saves the tokenizer alone when only that is wanted. Each folder is built
in a temp folder under a lock and published atomically, with a marker file (:data:`MARKER`)
written last that names the GGUF's sha256: a folder with the right marker is complete.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.model_parts import gguf_for_loading
from agents.model_table import EmbeddedModel, model_spec
from common.files import cache_root, file_lock, publish_dir

if TYPE_CHECKING:  # transformers is imported lazily: importing this module stays cheap
    from transformers import PreTrainedModel

MARKER = "embedded.json"  # written into a converted folder; its sha256 says which GGUF it came from


def converted_dir(model: EmbeddedModel | str) -> Path:
    """Where the converted folder of an embedded model lives (it may not exist yet)."""
    return cache_root() / "models" / model_spec(model).name


def _tokenizer_dir(spec: EmbeddedModel) -> Path:
    return cache_root() / "tokenizers" / spec.name


def is_complete(folder: Path, spec: EmbeddedModel) -> bool:
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
    if not force and is_complete(final, spec):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if not force and is_complete(final, spec):  # someone else built it while we waited
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


def convert_model(spec: EmbeddedModel, *, progress: bool, force: bool) -> Path:
    """The converted folder of ``spec`` (:func:`converted_dir`), converting it first unless it is
    complete (or ``force``): verify the parts, dequantize, save safetensors + tokenizer."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        started = time.perf_counter()
        with gguf_for_loading(spec, tmp, progress) as gguf:
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


def tokenizer_folder(spec: EmbeddedModel) -> Path:
    """A folder holding the tokenizer of ``spec``: the converted folder when it is complete, else
    a tokenizer-only cache (``cache_root()/tokenizers/NAME``) built on first use straight from the
    GGUF (a few seconds, plus assembly for split models)."""
    from transformers import AutoTokenizer

    folder = converted_dir(spec)
    if is_complete(folder, spec):
        return folder

    def build(tmp: Path) -> None:
        with gguf_for_loading(spec, tmp, False) as gguf:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        _write_marker(tmp, spec, tokenizer_only=True)

    return _build_locked(_tokenizer_dir(spec), spec, build, force=False)
