"""Speed of FlashHead side by side with the dense head and with peer methods, in one run.

``flashhead bench MODEL [--json] [--plot FILE] [--quick] [--engine NAME]`` measures, on this machine, with one
thread count and one dtype for everything:

* **head level** -- one decode step's head, hidden state -> token id, at batch 1/4/16/64: FlashHead
  (stage 1 int8/int4/float at the index's default probe count, the default stage 1 at other probe
  counts, and the full-width ``forward`` + argmax that ``generate()`` calls), the dense head in fp32,
  bf16, int8 weight-only and int8 dynamic-activation (last position only, argmax), and the HNSW and
  IVF peers on the same row budget (``peers.py``). Agreement = how often a method's token equals the
  dense fp32 argmax on real held-out hidden states (``persuasion``); every method scores its
  candidates exactly, so this is also the top-1 containment. Timing: ``timing.py`` (LLC flushed
  before each call, interleaved rounds, medians; only ratios within one run count).
* **model level** -- whole-model tokens/s at batch 1 and 8, FlashHead vs dense, greedy, the share of
  identical tokens, the head's in-situ time per step and the Amdahl bound (``model.py``).
* **bytes and bandwidth** -- bytes each head reads per step, the machine's measured read bandwidth,
  hence each head's bandwidth floor and how close it gets.
* **peak memory** -- VmHWM/VmRSS of a fresh subprocess per configuration (``memory.py``).

``suite.py`` runs it all; ``report.py`` checks the targets, prints the table and draws the plot.
Another engine's model level: add ``flashhead/bench/<engine>.py`` with the function ``model.py``
describes, and one line ``"<engine>": "<engine>:<function>"`` in ``model.ENGINES`` (``--engine``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .model import ENGINES
from .report import TARGETS, format_report, plot_report
from .settings import Settings
from .suite import SCHEMA, run_benchmark
from .timing import CacheFlusher, measure_bandwidth, time_interleaved

__all__ = [
    "configure_parser", "run", "run_benchmark", "measure_bandwidth", "format_report", "plot_report",
    "CacheFlusher", "time_interleaved", "TARGETS", "SCHEMA", "Settings", "ENGINES",
]


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of ``flashhead bench``; also sets ``func=run`` on the parser."""
    from ..models import BUILTIN_MODELS

    p.description = __doc__.split("\n\n")[0]
    p.add_argument("model", help=f"built-in name ({', '.join(BUILTIN_MODELS)}) or model folder / .gguf file")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    p.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--plot", metavar="FILE", help="write a speed-vs-agreement plot (PNG/PDF/SVG) to FILE")
    p.add_argument("--quick", action="store_true", help="fewer repeats, batches and configurations (a couple of "
                   "minutes; for smoke tests, not for numbers)")
    p.add_argument("--threads", type=int, default=2, help="torch/faiss/hnswlib threads (default 2)")
    p.add_argument("--repeats", type=int, help="timed rounds per head configuration (default 15, quick 5)")
    p.add_argument("--model-repeats", type=int, help="interleaved generate() rounds (default 5, quick 2)")
    p.add_argument("--new-tokens", type=int, help="new tokens per generate() (default 128, quick 32)")
    p.add_argument("--batches", type=int, nargs="+", metavar="B", help="head-level batch sizes (default 1 4 16 64)")
    p.add_argument("--no-peers", action="store_true", help="skip the HNSW / IVF peers")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="on a shared machine, first wait up to SECONDS for other processes to leave the CPUs idle")
    p.add_argument("--index", metavar="FOLDER", help="FlashHead assets folder to measure (default: the model's index "
                                                     "in the cache, built if missing), e.g. to compare two builds")
    p.add_argument("--engine", choices=list(ENGINES), default="transformers",
                   help="engine that runs the whole-model (model level) part (default transformers)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``flashhead bench``: one run, then the table (or JSON) on stdout, and the files asked for."""
    st = Settings.for_mode(args.quick, args.threads)
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    for attr, key in (("repeats", "repeats"), ("model_repeats", "model_repeats"), ("new_tokens", "new_tokens")):
        v = getattr(args, attr, None)
        if v is not None:
            if v < 1:
                raise ValueError(f"--{attr.replace('_', '-')} must be >= 1, got {v}")
            setattr(st, key, v)
    if getattr(args, "batches", None):
        if any(b < 1 for b in args.batches):
            raise ValueError("--batches must be >= 1")
        st.batches = tuple(args.batches)
    st.peers = not args.no_peers
    st.wait_quiet = max(0.0, float(getattr(args, "wait_quiet", 0.0) or 0.0))
    st.memory = not args.no_memory
    if getattr(args, "index", None):
        if not Path(args.index).is_dir():
            raise ValueError(f"--index {args.index}: no such folder; give a folder written by `flashhead build`")
        st.index = args.index
    rep = run_benchmark(args.model, st, quiet=args.json, engine=getattr(args, "engine", "transformers"))
    text = json.dumps(rep, indent=1, default=float)
    if args.out:
        from .._io import atomic_write_bytes

        atomic_write_bytes(Path(args.out), (text + "\n").encode())
    if args.plot:
        plot_report(rep, args.plot)
    print(text if args.json else format_report(rep))
    return 0
