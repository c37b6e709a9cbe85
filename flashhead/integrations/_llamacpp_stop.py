"""The eval callback that stops llama.cpp's graph right after the final norm (a few lines of C).

llama.cpp's scheduler asks an eval callback, node by node, whether it wants to see a node
(``ask = true``); it computes the graph up to the first wanted node, then calls the callback again
(``ask = false``), and stops the graph when that call returns false. This callback wants only the
final norm (``result_norm``; ``result_embd_pooled`` in embeddings mode with pooling NONE, where the
same tensor is renamed) and stops there when ``stop`` is set, so the head's matmul never runs, while
embeddings mode still copies the normed state out (``llama_get_embeddings_ith``). ``hits`` counts the
norms seen and ``asked`` the nodes the scheduler asked about, so a llama.cpp that renames the node or
stops asking fails loudly instead of silently running its head (``LlamaCpp`` checks it at load).

Compiled once per machine with ``gcc`` into ``<cache>/kernels/llamacpp-stop-<key>/`` (the key covers
the source and the llama.cpp library it links), like the stage-2 kernel; ``scripts/setup.sh`` builds
it. It links ``libggml-base`` for ``ggml_get_name``, so it reads no ggml struct layout itself.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
from pathlib import Path

_SOURCE = r"""
#include <stdbool.h>
#include <string.h>

struct ggml_tensor;
const char * ggml_get_name(const struct ggml_tensor * tensor);

typedef struct { int stop; long long hits, asked; } flashhead_stop_state;

static bool is_final_norm(const struct ggml_tensor * t) {
    const char * name = ggml_get_name(t);
    return strcmp(name, "result_norm") == 0 || strcmp(name, "result_embd_pooled") == 0;
}

bool flashhead_stop_after_norm(struct ggml_tensor * t, bool ask, void * user_data) {
    flashhead_stop_state * s = (flashhead_stop_state *) user_data;
    if (ask) {                                  /* compute everything up to the final norm */
        s->asked++;
        return is_final_norm(t);
    }
    if (!is_final_norm(t)) return true;
    s->hits++;
    return !s->stop;                            /* false: the rest of the graph (the head) never runs */
}
"""


class StopState(ctypes.Structure):
    """The callback's per-context state: ``stop`` (1 = stop after the norm), ``hits`` (norms seen) and
    ``asked`` (graph nodes the scheduler asked about: fewer when the stop cuts the graph)."""

    _fields_ = [("stop", ctypes.c_int), ("hits", ctypes.c_longlong), ("asked", ctypes.c_longlong)]


def _ggml_lib_dir() -> Path:
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    if not any(folder.glob("libggml-base.so*")):
        raise RuntimeError(f"llama-cpp-python has no libggml-base.so in {folder}; reinstall it with scripts/setup.sh")
    return folder


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The compiled callback library (compiled into the cache on first use)."""
    from .._io import atomic_dir, cache_dir

    libdir = _ggml_lib_dir()
    stamp = [f"{p.name}:{p.stat().st_size}" for p in sorted(libdir.glob("libggml-base.so*"))]
    key = hashlib.sha256(f"{_SOURCE}|{libdir}|{stamp}".encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels" / f"llamacpp-stop-{key}"
    so = folder / "stop.so"
    if not so.is_file():
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise RuntimeError("compiling the llama.cpp stop callback needs gcc: install it (apt-get install gcc)")
        with atomic_dir(folder) as tmp:
            (tmp / "stop.c").write_text(_SOURCE)
            cmd = [gcc, "-O2", "-shared", "-fPIC", str(tmp / "stop.c"), "-o", str(tmp / "stop.so"),
                   f"-L{libdir}", "-lggml-base", f"-Wl,-rpath,{libdir}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"could not compile the llama.cpp stop callback: {done.stderr.strip()[:500]}")
    lib = ctypes.CDLL(str(so))
    lib.flashhead_stop_after_norm.restype = ctypes.c_bool
    return lib


def callback_address() -> int:
    """Address of ``flashhead_stop_after_norm`` (for ``llama_context_params.cb_eval``)."""
    return ctypes.cast(library().flashhead_stop_after_norm, ctypes.c_void_p).value


def build() -> bool:
    """Compile the callback now (set-up calls this); True when it is available."""
    return library() is not None
