"""The benchmark's report: the speed targets checked, the text table, and the speed-vs-agreement plot."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TARGETS", "evaluate_targets", "format_report", "plot_report"]


# targets of the speed issue, per built-in model: (key, description, threshold)
TARGETS = {
    "gemma3-270m": [
        ("head_b1", "head level, batch 1, FlashHead (default setting) vs dense fp32", 10.0),
        ("model_b1", "whole model, batch 1, tokens/s FlashHead / dense", 1.8),
        ("model_b8", "whole model, batch 8, tokens/s FlashHead / dense", 2.0),
    ],
    "smollm2-135m": [
        ("head_b1", "head level, batch 1, FlashHead (default setting) vs dense fp32", 5.0),
        ("amdahl_b1", "whole model, batch 1, speed-up / Amdahl bound", 0.9),
    ],
    "qwen2.5-coder-0.5b": [
        ("amdahl_b1", "whole model, batch 1, speed-up / Amdahl bound", 0.9),
    ],
}


def evaluate_targets(report: dict) -> list[dict]:
    """Each target of ``TARGETS`` for the report's model, measured and met or not, then the engine's targets."""
    out = []
    main = f"flashhead-{report['index']['stage1']}"  # the default setting
    for key, desc, thr in TARGETS.get(report["model"], []):
        val = None
        if key == "head_b1":
            val = next((r["speedup_vs_dense_fp32"] for r in report["head"]
                        if r["name"] == main and r["batch"] == 1), None)
        elif key.startswith("model_b"):
            b = int(key[7:])
            val = next((r["speedup_vs_dense"] for r in report["model_level"]["rows"]
                        if r["name"] == main and r["batch"] == b), None)
        elif key == "amdahl_b1":
            r = next((r for r in report["model_level"]["rows"] if r["name"] == main and r["batch"] == 1), None)
            val = None if r is None else r["speedup_vs_dense"] / r["amdahl_bound"]
        if val is not None:
            out.append({"target": key, "description": desc, "threshold": thr, "measured": val, "met": val >= thr})
    return out + report["model_level"].get("targets", [])  # an engine's own (llama.cpp, vLLM), checked there


def format_report(rep: dict) -> str:
    m, idx, bw = rep["machine"], rep["index"], rep["bandwidth"]
    L = []
    L.append(f"FlashHead benchmark: {rep['model']}  ({'quick' if rep['quick'] else 'full'} run, {rep['seconds']:.0f} s)")
    L.append(f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, LLC {m['llc_bytes'] >> 20} MiB, torch "
             f"{m['torch']}, {m['threads']} threads, {m['date']}; load average start {m['loadavg_start']} "
             f"end {m.get('loadavg_end')}; CPUs busy before start {100 * m.get('cpu_busy_before_start', float('nan')):.0f}%")
    L.append(f"index: V={idx['V']} d={idx['d']} K={idx['K']} cap={idx['cap']} default p={idx['n_probes']} "
             f"-> {idx['rows_per_query']} rows scored per query ({100 * idx['rows_share']:.1f}% of V)")
    L.append(f"memory bandwidth (torch, {m['threads']} threads): read {bw['read_gbps']:.1f} GB/s, copy "
             f"{bw['copy_gbps']:.1f} GB/s")
    batches = sorted({r["batch"] for r in rep["head"]})
    names = list(dict.fromkeys(r["name"] for r in rep["head"]))
    by = {(r["name"], r["batch"]): r for r in rep["head"]}
    L.append("")
    L.append("Head level: one decode step's head (hidden -> token), LLC flushed before each call, median us "
             "(x = speed-up vs dense fp32 at that batch)")
    hdr = f"{'config':<24} {'agree':>6} {'rows/q':>8} {'MB/step':>8}"
    for b in batches:
        hdr += f" {'b' + str(b) + ' us':>10} {'x':>6}"
    hdr += f" {'floor b1':>9} {'%floor':>6}"
    L.append(hdr)
    for n in names:
        r1 = by[(n, batches[0])]
        line = f"{n:<24} {100 * r1['agreement']:>5.1f}% {r1['rows_per_query']:>8.0f} {r1['bytes_per_step'] / 1e6:>8.2f}"
        for b in batches:
            r = by[(n, b)]
            line += f" {r['median_us']:>10.0f} {r['speedup_vs_dense_fp32']:>6.2f}"
        line += f" {r1['floor_us']:>9.0f} {100 * r1['floor_fraction']:>5.0f}%"
        L.append(line)
    L.append("  agree = token equals the dense fp32 argmax on held-out real hidden states (= top-1 containment, "
             "candidates are scored exactly); MB/step and floor at the first batch; %floor = bandwidth floor / "
             "measured time")
    peers = [by[(n, batches[0])] for n in names if by[(n, batches[0])]["kind"] == "peer"]
    for r in peers:
        extra = (f"space={r['space']}{' (MIPS-augmented rows)' if r['space'] == 'l2' else ''}, ef={r['ef']} "
                 f"({r['dist_per_query']:.0f} distances/query{', SATURATED: the graph reaches no more' if r['saturated'] else ''}"
                 f"; M={r['M']}, build {r['build_seconds']:.0f} s)"
                 if r["name"].startswith("hnsw") else
                 f"nprobe={r['nprobe']} ({r['rows_scanned_per_query']:.0f} rows scanned/query; lists {r['list_size_min']}"
                 f"..{r['list_size_max']} rows, {r['empty_lists']} empty; build {r['build_seconds']:.0f} s)")
        L.append(f"  {r['name']}: {extra}")
    mr = rep["model_level"]["rows"]
    L.append("")
    L.append("Model level: generate(), fp32, greedy, 32-token prompts -> "
             f"{rep['settings']['new_tokens']} new tokens, median of {rep['settings']['model_repeats']} interleaved rounds")
    L.append(f"{'config':<20} {'batch':>5} {'tok/s':>8} {'x':>6} {'decode tok/s':>12} {'x':>6} {'head ms':>8} "
             f"{'step ms':>8} {'ident.':>7} {'prefix':>7} {'Amdahl':>7} {'%Amdahl':>8}")
    for r in mr:
        L.append(f"{r['name']:<20} {r['batch']:>5} {r['tokens_per_second']:>8.1f} {r['speedup_vs_dense']:>6.2f} "
                 f"{r['decode_tokens_per_second']:>12.1f} {r['decode_speedup_vs_dense']:>6.2f} "
                 f"{r['head_ms_per_step']:>8.2f} {r['step_ms']:>8.2f} {100 * r['identical_token_fraction']:>6.1f}% "
                 f"{r['identical_prefix_mean']:>7.1f} {r['amdahl_bound']:>7.2f} "
                 + (f"{'-':>8}" if r["name"] == "dense-fp32" else f"{100 * r['fraction_of_amdahl']:>7.0f}%"))
    L.append("  head ms = in-situ head time per decode step (forward hooks); Amdahl = 1 / (1 - dense head share "
             "of a step); ident. = identical tokens vs dense, prefix = mean identical prefix length")
    if rep.get("memory"):
        L.append("")
        L.append("Memory: one fresh process per configuration: load, copy the weights into anonymous memory, reset "
                 "the peak, set the head up, decode 16 tokens; RSS in MB (peak = VmHWM from after load)")
        L.append(f"{'config':<18} {'after load':>10} {'steady':>8} {'anon':>8} {'peak':>8}")
        for r in rep["memory"]:
            if "error" in r:
                L.append(f"{r['config']:<18} error: {r['error']}")
            else:
                L.append(f"{r['config']:<18} {r['rss_after_load_mb']:>10.0f} {r['rss_steady_mb']:>8.0f} "
                         f"{r['rss_anon_mb']:>8.0f} {r['rss_peak_mb']:>8.0f}")
    if rep.get("targets"):
        L.append("")
        L.append("Targets:")
        for t in rep["targets"]:
            L.append(f"  {'MET ' if t['met'] else 'MISS'} {t['description']}: {t['measured']:.4g} "
                     f"(target >= {t['threshold']})")
    return "\n".join(L)


def plot_report(rep: dict, path: str | Path) -> None:
    """Speed-up vs dense fp32 (log) against agreement with the dense argmax, one panel per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rep["head"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4.2), squeeze=False)
    colors = {"dense": "tab:gray", "flashhead": "tab:blue", "peer": "tab:orange"}
    for ax, b in zip(axes[0], batches):
        for r in (r for r in rep["head"] if r["batch"] == b):
            ax.scatter(100 * r["agreement"], r["speedup_vs_dense_fp32"], color=colors[r["kind"]], s=22)
            ax.annotate(r["name"].replace("flashhead-", "fh-"), (100 * r["agreement"], r["speedup_vs_dense_fp32"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_title(f"{rep['model']}, head level, batch {b}", fontsize=9)
        ax.set_xlabel("agreement with dense fp32 argmax (%)")
        ax.set_ylabel("speed-up vs dense fp32 (x)")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    axes[0][0].legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
