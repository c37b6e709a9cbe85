"""FlashHead on a CUDA GPU, a first check: the same head on the CPU and on the GPU (fp32 or Q8_0 rows;
float, int8 or int4 stage 1) picks the same clusters and greedy tokens, and samples; and the batch-1
greedy call's time next to a dense fp32 / bf16 head product with argmax on the same GPU.

    FLASHHEAD_NO_KERNEL=1 PYTHONPATH=. python labs/cuda_smoke.py     # on a machine with a CUDA GPU

Synthetic head of Gemma-3-270M's shape (262,144 x 640, exactly Q8_0, clusters of 16, p = 1,634): a
check of the code path and a kernel timing, not a model claim. Results: docs/benchmarks.md, "GPU".
"""
import time

import torch

from flashhead.head import FlashHead

print(torch.__version__, torch.cuda.get_device_name(0))
V, d, K, cap = 262144, 640, 16384, 16
g = torch.Generator().manual_seed(0)
w = torch.randn(V, d // 32, 32, generator=g) * (0.5 + torch.rand(V, d // 32, 1, generator=g))
amax = w.abs().amax(-1, keepdim=True)
k = torch.round(w * (127 / amax)) + 0.0
s16 = (amax / 127).half()
W = (k * s16.float()).view(V, d)
slot = torch.randperm(V, generator=g).view(K, cap)
cents = W[slot].mean(1)
q, s = k.to(torch.int8).view(V, d), s16.view(V, d // 32)
h = torch.randn(8, d, generator=g)
same_greedy = True
for name, kw in [("fp32 rows, float", dict(rows=W[slot])), ("fp32 rows, int8", dict(rows=W[slot], stage1="int8")),
                 ("fp32 rows, int4", dict(rows=W[slot], stage1="int4")),
                 ("q8 rows, int8", dict(rows=q[slot], row_scales=s[slot], stage1="int8"))]:
    rows = kw.pop("rows")
    cpu = FlashHead(rows, slot, cents, out_features=V, n_probes=1634, always_ids=torch.tensor([1, 2]), **kw)
    gpu = FlashHead(rows, slot, cents, out_features=V, n_probes=1634, always_ids=torch.tensor([1, 2]), **kw).cuda()
    hg = h.cuda()
    a_, b_ = cpu.select_clusters(h), gpu.select_clusters(hg).cpu()
    shared = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a_, b_)) / a_.numel()
    lc, lg = cpu(h), gpu(hg).cpu()
    both = torch.isfinite(lc) & torch.isfinite(lg)
    err = float((lc[both] - lg[both]).abs().max())
    greedy = torch.equal(cpu.greedy(h), gpu.greedy(hg).cpu())
    samples = gpu.sample(hg, temperature=1.0)
    for _ in range(5):
        gpu.greedy(hg[:1])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        gpu.greedy(hg[:1])
    torch.cuda.synchronize()
    t_fh = (time.perf_counter() - t0) / 100
    print(f"{name}: probed clusters shared with the CPU {shared:.2%}, max |logit diff| on shared candidates "
          f"{err:.1e}, greedy tokens equal {greedy}, {samples.numel()} samples drawn, greedy batch 1 {t_fh * 1e6:.0f} us")
    same_greedy &= greedy
Wg, hb = W.cuda(), h[:1].cuda()
for dt in (torch.float32, torch.bfloat16):
    Wd, hd = Wg.to(dt), hb.to(dt)
    for _ in range(5):
        (hd @ Wd.T).argmax(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        (hd @ Wd.T).argmax(1)
    torch.cuda.synchronize()
    print(f"dense {dt} head + argmax, batch 1: {(time.perf_counter() - t0) / 100 * 1e6:.0f} us")
print("greedy tokens equal to the CPU's in every setting:", same_greedy)
