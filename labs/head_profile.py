"""Where FlashHead's decode-step time goes, on the real models (the numbers behind docs/benchmarks.md).

Two reports:

* ``insitu``: decode steps of ``generate()`` split with forward hooks into the model body (embedding
  to final norm), the head (``lm_head``: dense or FlashHead), what runs after the head inside the
  model's forward, and the rest of generate()'s loop (logits copy, argmax, stopping criteria);
  dense and FlashHead alternate, and with ``--parts`` FlashHead's forward is further split into
  validation, stage 1 (centroid scores + top-p), stage 2 (exact logits of the candidates) and the
  full-width ``-inf`` tensor + scatter.
* ``stage2``: stage 2 alone on real hidden states and the real index, cold LLC (a 64 MiB buffer is
  rewritten before every call), interleaved: the whole-gather loop (one ``index_select`` of all
  of a row's clusters + one GEMV, the previous implementation), chunked gathers into a reused
  buffer of 1/2/4 MiB, the chunked loop forced onto one intra-op thread, and the compiled fused
  gather + GEMV kernel (``flashhead/_kernels.py``) that the head uses for fp32 rows.

Run:  ``.venv/bin/python labs/head_profile.py insitu gemma3-270m --batch 1 --threads 2 [--parts]``
      ``.venv/bin/python labs/head_profile.py stage2 gemma3-270m --batches 1 8 64 --threads 1``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flashhead
from flashhead import _kernels
from flashhead.decode import generate
from flashhead.integrations.transformers import apply, calibration_states, index_for, remove
from flashhead.models import load_model

PROMPTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
           "The capital of France is", "Once upon a time there was", "Mr. Darcy walked into the room and",
           "In the beginning", "She looked at the letter and", "The weather in Bath was", "Anne Elliot had been"]


def _med_ms(xs):
    return statistics.median(xs) * 1e3 if xs else float("nan")


def insitu(model, tok, index, batch: int, new_tokens: int, rounds: int, parts: bool) -> None:
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]

    def one(tag: str) -> None:
        ev: list[tuple[str, float]] = []
        head = model.get_output_embeddings()
        hooks = [model.register_forward_pre_hook(lambda *a: ev.append(("m0", time.perf_counter()))),
                 model.register_forward_hook(lambda *a: ev.append(("m1", time.perf_counter()))),
                 head.register_forward_pre_hook(lambda *a: ev.append(("h0", time.perf_counter()))),
                 head.register_forward_hook(lambda *a: ev.append(("h1", time.perf_counter())))]
        timers: dict[str, list[float]] = {}
        if parts and tag == "flashhead":
            _wrap_parts(head, timers)
        try:
            g = generate(model, tok, prompts, max_new_tokens=new_tokens)
        finally:
            for h in hooks:
                h.remove()
            if parts and tag == "flashhead":
                for k in ("_check_hidden", "_select", "_candidates", "forward"):
                    head.__dict__.pop(k, None)
        t = {k: [x for kk, x in ev if kk == k] for k in ("m0", "m1", "h0", "h1")}
        n = len(t["m0"])
        step = [t["m0"][i + 1] - t["m0"][i] for i in range(1, n - 1)]  # decode steps only (0 = prefill)
        body = [t["h0"][i] - t["m0"][i] for i in range(1, n)]
        headt = [t["h1"][i] - t["h0"][i] for i in range(1, n)]
        after = [t["m1"][i] - t["h1"][i] for i in range(1, n)]
        loop = [t["m0"][i + 1] - t["m1"][i] for i in range(1, n - 1)]
        print(f"{tag:10s} B={batch}: step {_med_ms(step):7.2f} ms = body {_med_ms(body):7.2f} + head "
              f"{_med_ms(headt):6.2f} + after head {_med_ms(after):5.2f} + generate loop {_med_ms(loop):5.2f}; "
              f"{g.tokens_per_second:.1f} tokens/s", flush=True)
        for k, v in timers.items():
            print(f"    {k:34s} {_med_ms(v[1:]):7.3f} ms", flush=True)

    for _ in range(rounds):
        one("dense")
        apply(model, index)
        try:
            one("flashhead")
        finally:
            remove(model)


def _wrap_parts(fh, timers) -> None:
    """Time FlashHead's parts by shadowing its methods on the instance (removed afterwards)."""
    from flashhead import head as H

    def timed(name, fn):
        def g(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            timers.setdefault(name, []).append(time.perf_counter() - t0)
            return r
        return g

    cls = type(fh)
    fh._check_hidden = timed("validation (_check_hidden)", cls._check_hidden.__get__(fh))
    fh._select = timed("stage 1: scores + top-p (_select)", cls._select.__get__(fh))
    fh._candidates = timed("stage 2: candidate logits", cls._candidates.__get__(fh))

    def forward(hidden):
        t0 = time.perf_counter()
        h = fh._check_hidden(hidden, two_d=False)
        clusters = fh._select(h, fh.n_probes, ordered=False)[0]  # greedy decode (no sampling tail)
        ids, logits = fh._candidates(h, clusters)
        t1 = time.perf_counter()
        out = torch.full((h.shape[0], fh.out_features), H._NEG_INF, dtype=torch.float32, device=h.device)
        t2 = time.perf_counter()
        out.scatter_reduce_(1, ids.clamp(min=0), logits, reduce="amax", include_self=True)
        t3 = time.perf_counter()
        timers.setdefault("full-width -inf tensor", []).append(t2 - t1)
        timers.setdefault("scatter of the candidates", []).append(t3 - t2)
        timers.setdefault("forward total", []).append(t3 - t0)
        return out.view(*hidden.shape[:-1], fh.out_features)

    fh.forward = forward


def stage2(model, tok, index, batches, rounds: int) -> None:
    states = calibration_states(model, tok, flashhead.load_text("persuasion"), positions=512)
    fh = apply(model, index)
    cap, d, p, rows = fh.cap, fh.d, fh.n_probes, fh.rows
    M = p * cap
    flush = torch.ones(64 << 18)

    def whole(h, cl):
        return torch.stack([torch.mv(rows.index_select(0, cl[i]).view(M, d), h[i]) for i in range(h.shape[0])])

    def chunked(nbytes, one_thread=False):
        C = max(1, min(p, nbytes // (cap * d * rows.element_size())))
        buf = torch.empty(C, cap, d, dtype=rows.dtype)

        def f(h, cl):
            if one_thread:
                old = torch.get_num_threads()
                torch.set_num_threads(1)
            out = torch.empty(h.shape[0], M, dtype=rows.dtype)
            for i in range(h.shape[0]):
                for s in range(0, p, C):
                    n = min(C, p - s)
                    b = buf[:n]
                    torch.index_select(rows, 0, cl[i, s:s + n], out=b)
                    torch.mv(b.view(n * cap, d), h[i], out=out[i, s * cap:(s + n) * cap])
            if one_thread:
                torch.set_num_threads(old)
            return out
        return f

    fns = {"whole gather": whole, "1 MiB chunks": chunked(1 << 20), "2 MiB chunks": chunked(2 << 20),
           "4 MiB chunks": chunked(4 << 20), "1 MiB chunks, 1 thread": chunked(1 << 20, True)}
    if _kernels.build():
        fns["fused kernel"] = lambda h, cl: _kernels.gather_gemv(rows, cl, h)
    names = list(fns)
    with torch.inference_mode():
        for B in batches:
            pool = [states[i:i + B] for i in range(0, len(states) - B + 1, B)]
            cls = [fh._select(h, p, ordered=False)[0] for h in pool]
            for n in names:
                fns[n](pool[0], cls[0])
            ts: dict[str, list[float]] = {n: [] for n in names}
            k = 0
            for r in range(rounds):
                for j in range(len(names)):
                    n = names[(j + r) % len(names)]
                    i = k % len(pool)
                    k += 1
                    flush.add_(1.0)
                    t0 = time.perf_counter()
                    fns[n](pool[i], cls[i])
                    ts[n].append(time.perf_counter() - t0)
            print(f"B={B} p={p}: " + "; ".join(f"{n} {_med_ms(ts[n]):.2f}/{min(ts[n]) * 1e3:.2f}" for n in names)
                  + "  (median/best ms)", flush=True)
    remove(model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["insitu", "stage2"])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="insitu: batch size")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="stage2: batch sizes")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2, help="insitu: dense/FlashHead rounds; stage2: x5 calls")
    ap.add_argument("--parts", action="store_true", help="insitu: split FlashHead's forward into its parts")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, verbose=False)
    index = index_for(a.model, model, tok, progress=False)
    print(f"{a.model}, {a.threads} threads, torch {torch.__version__}")
    if a.what == "insitu":
        with torch.inference_mode():
            insitu(model, tok, index, a.batch, a.new_tokens, a.rounds, a.parts)
    else:
        stage2(model, tok, index, a.batches, a.rounds * 5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
