"""Small file helpers shared by every writer: atomic writes, cache location, hashing.

Everything flashhead writes (assets, converted models, cached texts) goes through these helpers so
that an interrupted run never leaves a half-written file where a good one used to be:

* the new content goes to a hidden temporary sibling (``.NAME.PID.RANDOM.tmp``) that is renamed over
  the target only once it is complete and flushed to disk;
* on any exception, Ctrl-C (SIGINT) included, the temporary is removed and the target is untouched;
* SIGTERM, whose default action kills the process without running ``finally`` blocks, is turned into
  an exception for the duration of the write, so it cleans up the same way and then still ends the
  process by SIGTERM (same exit status as before);
* what no handler can catch (SIGKILL, power loss) leaves at most a hidden temporary; the next write
  to the same target removes the leftovers of processes that no longer run.

Files and folders get the permissions a plain ``open()``/``mkdir()`` would give them (the umask
applies; a replaced file or folder keeps its mode), not the private 0600/0700 that :mod:`tempfile`
and safetensors' writer use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class WouldOverwriteError(FileExistsError, ValueError):
    """Writing would replace files the user did not ask to replace (pass ``force``/``--force`` or choose
    another path). Also a ValueError, so the CLI reports it as the input error it is."""


def cache_dir() -> Path:
    """Root of flashhead's cache: ``$FLASHHEAD_CACHE``, else ``$XDG_CACHE_HOME/flashhead``, else
    ``~/.cache/flashhead``. Kept outside the repository so weights and texts are never committed."""
    env = os.environ.get("FLASHHEAD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flashhead"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _Terminated(BaseException):
    """SIGTERM arrived during an atomic write (raised so that the write's temporaries are removed)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """During the block, SIGTERM raises (so ``finally``/``except`` clean up), then ends the process.

    Only in the main thread (the only one that may set handlers) and only while SIGTERM has its
    default action: an application's own SIGTERM handler is left alone. Nested writes share the
    outermost one's handler.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # cleaned up: now die of SIGTERM as the sender expects
        raise  # reached only if SIGTERM is blocked in this thread
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _temp_name(target: Path, kind: str) -> Path:
    """Hidden sibling of ``target`` tagged with this process id (so leftovers can be told apart)."""
    tag = secrets.token_hex(4) + ".tmp" if kind == "tmp" else "old"
    return target.with_name(f".{target.name}.{os.getpid()}.{tag}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def _remove_leftovers(target: Path) -> None:
    """Remove temporaries next to ``target`` left by processes that died without cleaning up
    (SIGKILL, power loss); a set-aside old copy is put back if ``target`` itself is missing."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.(?:[0-9a-f]{{8}}\.tmp|old)")
    with contextlib.suppress(OSError):
        for p in target.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m is None or _pid_alive(int(m.group(1))):
                continue
            if p.name.endswith(".old") and not target.exists():
                os.replace(p, target)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _normalize_mode(path: Path, allowed: int) -> None:
    """Give ``path`` the permissions open()/mkdir() would (rw for all, less the umask ``allowed``):
    writers such as safetensors create private 0600 files."""
    st = path.lstat()
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        base = 0o777 if stat.S_ISDIR(st.st_mode) else 0o666
        os.chmod(path, (stat.S_IMODE(st.st_mode) | base) & allowed)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (best effort where the OS does not allow it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_unwinds():
        _remove_leftovers(path)
        tmp = _temp_name(path, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open()
            with os.fdopen(fd, "wb") as f:
                with contextlib.suppress(FileNotFoundError):
                    os.fchmod(f.fileno(), stat.S_IMODE(path.stat().st_mode))  # a replaced file keeps its mode
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename folder ``tmp`` to ``target``, setting an existing ``target`` aside first and deleting it
    after; if the second rename fails or is interrupted, the old folder is put back."""
    old = _temp_name(target, "old")
    try:
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target``; on success it replaces ``target``.

    On any exception (Ctrl-C and SIGTERM included) the temporary folder is removed and ``target`` is
    left as it was. The swap is two renames (old aside, new in), so a reader never sees a half-filled
    folder, and the new files are flushed to disk before it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_unwinds():
        _remove_leftovers(target)
        tmp = _temp_name(target, "tmp")
        os.mkdir(tmp, 0o777)  # umask applies, as for mkdir()
        try:
            allowed = stat.S_IMODE(tmp.stat().st_mode)  # 0o777 less the umask
            if target.is_dir():
                os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
            yield tmp
            for p in sorted(tmp.rglob("*")):
                _normalize_mode(p, allowed)
                _fsync(p)
            _fsync(tmp)
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _fsync(target.parent)
