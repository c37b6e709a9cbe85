"""The compiled kernels' build targets: a named target compiles its own instruction-set path, and a target
this CPU cannot execute is refused with a message (``make test`` reruns the kernel tests per target)."""

from __future__ import annotations

import os

import pytest

from flashhead import _kernels

def test_the_build_in_use_compiles_its_targets_path():
    if not _kernels.build():
        pytest.skip("no compiled kernel here (no g++)")
    arch = os.environ.get("FLASHHEAD_KERNEL_ARCH", "native")
    # the path the C++ preprocessor chose, against the one the CPU's flags call for
    assert _kernels.isa_path() == _kernels.ARCH_PATH.get(arch, _kernels.native_path())


def test_runnable_targets_are_those_whose_features_the_cpu_has(monkeypatch):
    monkeypatch.setattr(_kernels, "_cpu_flags", lambda: "flags : sse2 ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c "
                                                        "bmi1 bmi2 movbe abm")
    assert _kernels.runnable_archs() == ["x86-64-v2", "x86-64-v3"]
    assert _kernels.native_path() == "avx2" and _kernels.other_path_archs() == ["x86-64-v2"]


def test_every_other_path_this_cpu_runs_is_tested(monkeypatch):
    avx512 = "avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni"
    base = "flags : sse2 ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c bmi1 bmi2 movbe abm "
    monkeypatch.setattr(_kernels, "_cpu_flags", lambda: base + avx512)  # Zen 4, Cascade Lake
    assert _kernels.native_path() == "avx2+avx512-vnni"
    assert _kernels.other_path_archs() == ["x86-64-v2", "x86-64-v3"]
    monkeypatch.setattr(_kernels, "_cpu_flags", lambda: base + avx512 + " avx_vnni")  # Sapphire Rapids
    assert _kernels.native_path() == "avx2+avx-vnni"
    assert _kernels.other_path_archs() == ["x86-64-v2", "x86-64-v3", "cascadelake"]


def test_a_target_the_cpu_cannot_execute_is_refused(monkeypatch):
    monkeypatch.setattr(_kernels, "_cpu_flags", lambda: "flags : sse2 ssse3 sse4_1 sse4_2 popcnt")
    monkeypatch.setenv("FLASHHEAD_KERNEL_ARCH", "x86-64-v3")
    with pytest.raises(ValueError, match=r"x86-64-v3 needs CPU features this machine lacks \(avx, avx2"):
        _kernels._arch()
    monkeypatch.setenv("FLASHHEAD_KERNEL_ARCH", "-O0 -march=native")
    with pytest.raises(ValueError, match="not a gcc -march target name"):
        _kernels._arch()
    monkeypatch.setenv("FLASHHEAD_KERNEL_ARCH", "")
    assert _kernels._arch() == "native"
