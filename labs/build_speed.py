"""Build time and peak memory of `flashhead build` on the built-in models (one fresh process each).

    python labs/build_speed.py [--models smollm2-135m gemma3-270m] [--threads 2] [--json]

Each model is built in its own subprocess: load the model (weights copied into anonymous memory),
reset the peak-RSS counter (Linux ``/proc/self/clear_refs``), then time the two parts of a build:
calibration hidden states (forward passes over the default calibration texts: 4,096 positions of Python code
and Pride and Prejudice, half each, and 2,048 of Sense and Sensibility) and clustering (S^(1/2) map +
balanced k-means + centroids + calibrating the default setting), at the default cluster size. Peak memory is VmHWM minus the RSS after loading, i.e. what the
build adds on top of the loaded model. Targets: SmolLM2 <= 20 s, Gemma <= 120 s, Qwen2.5-Coder <= 90 s
wall on 2 cores, <= 4 GB above the loaded model. The build writes nothing to disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

TARGET_SECONDS = {"smollm2-135m": 20.0, "gemma3-270m": 120.0, "qwen2.5-coder-0.5b": 90.0}
TARGET_EXTRA_MB = 4096.0


def _child(model_ref: str, threads: int) -> dict:
    import torch

    from flashhead.bench.memory import materialize, reset_peak, rss_kb
    from flashhead.integrations.transformers import build_for_model, calibration_sets
    from flashhead.models import load_model

    torch.set_num_threads(threads)
    model, tok = load_model(model_ref, verbose=False)
    materialize(model)
    loaded = rss_kb()["VmRSS"]
    if not reset_peak():
        raise SystemExit("cannot reset the peak-RSS counter (needs Linux /proc/self/clear_refs)")
    t0 = time.perf_counter()
    states = calibration_sets(model, tok)
    t1 = time.perf_counter()
    index = build_for_model(model, tok, hidden_states=states, model_name=model_ref, progress=True)
    t2 = time.perf_counter()
    r = rss_kb()
    cfg = index.config
    return {"model": model_ref, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size, "clusters": cfg.num_clusters,
            "cluster_size": cfg.cluster_size, "threads": threads, "calibration_positions": sum(int(x.shape[0]) for x in states),
            "seconds_calibration": t1 - t0, "seconds_clustering": t2 - t1, "seconds_total": t2 - t0,
            "objective": cfg.build["objective"], "rss_loaded_mb": loaded / 1024,
            "peak_extra_mb": (r["VmHWM"] - loaded) / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(TARGET_SECONDS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.threads)))
        return 0
    rows = []
    for m in a.models:
        p = subprocess.run([sys.executable, __file__, "--child", m, "--threads", str(a.threads)],
                           stdout=subprocess.PIPE, text=True)  # progress bars go to our stderr
        if p.returncode != 0:
            print(f"{m}: build failed (exit {p.returncode})", file=sys.stderr)
            return 1
        row = json.loads(p.stdout.strip().splitlines()[-1])
        target = TARGET_SECONDS.get(m)
        row["target_seconds"] = target
        row["meets_time"] = None if target is None else row["seconds_total"] <= target
        row["meets_memory"] = row["peak_extra_mb"] <= TARGET_EXTRA_MB
        rows.append(row)
    if a.json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    print(f"{'model':<14} {'V x d':>13} {'K':>6} {'calib s':>8} {'cluster s':>9} {'total s':>8} {'target':>7} "
          f"{'peak+ MB':>9} {'objective':>9}")
    for r in rows:
        ok = "" if r["meets_time"] is None else (" ok" if r["meets_time"] else " MISS")
        print(f"{r['model']:<14} {r['vocab']:>6} x {r['hidden']:<4} {r['clusters']:>6} {r['seconds_calibration']:>8.1f} "
              f"{r['seconds_clustering']:>9.1f} {r['seconds_total']:>8.1f} {r['target_seconds'] or '-':>4}{ok:<3} "
              f"{r['peak_extra_mb']:>9.0f} {r['objective']:>9.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
