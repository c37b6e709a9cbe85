"""Compiles every Triton kernel launch of flashhead.kernels for an H200 (sm_90), to a cubin, with no GPU.

Triton's interpreter runs the kernels' Python and never compiles them, so it misses what only the compiler checks
(a global that is not a constexpr, a type the if-branches disagree on, an op with no lowering). Each launcher runs
on meta tensors with its kernels replaced by recorders; every recorded call is then compiled with Triton's own
compiler and the ptxas its wheel carries. Run by tests/test_triton.py in a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashhead.kernels import KernelHead, triton_stage1, triton_stage2
from kernel_helpers import make_index

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8", torch.uint8: "u8",
          torch.int64: "i64"}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _compile(rec: _Recorder) -> int:
    for args, kwargs in rec.calls:
        bound = dict(zip(rec.fn.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        for param in rec.fn.params:
            value = bound[param.name]
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", value
            else:
                signature[param.name] = "*" + _TYPES[value.dtype] if isinstance(value, torch.Tensor) else "i32"
        triton.compile(ASTSource(rec.fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    return len(rec.calls)


def main() -> None:
    recorders = {}
    for module, name in ((triton_stage1, "_scores_kernel"), (triton_stage2, "_logits_kernel"),
                         (triton_stage2, "_greedy_kernel")):
        recorders[name] = _Recorder(getattr(module, name))
        setattr(module, name, recorders[name])
    d = 1152  # Gemma-3-1B's width: four full blocks of 256 and a masked one
    for stage1, centroid_dtype in (("float", None), ("float", torch.bfloat16), ("float", torch.float16),
                                   ("int8", None), ("int4", None)):
        head, _ = make_index(K=8, cap=16, d=d, stage1=stage1, n_empty=0, always=())
        kh = KernelHead.from_flashhead(head, centroid_dtype).to("meta")
        triton_stage1.stage1_scores(torch.empty(2, d, device="meta"), kh.centroids)
    for rows_dtype in (torch.float32, torch.bfloat16, torch.float16, "q8"):
        _, kh = make_index(K=8, cap=16, d=d, rows_dtype=rows_dtype, device="meta")
        h = torch.empty(2, d, device="meta")
        args = (h, kh.rows, kh.row_scales, kh.slot_token, torch.zeros(2, 3, dtype=torch.int64, device="meta"),
                kh.always_slot)
        triton_stage2.cluster_logits(*args)
        triton_stage2.greedy(*args)
    n = sum(_compile(rec) for rec in recorders.values())
    print(f"compiled {n} kernel launches for sm_90")


if __name__ == "__main__":
    main()
