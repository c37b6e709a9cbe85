"""Lab (not part of the library): FlashHead's fidelity on held-out languages, code and registers, per index variant.

    python labs/multilingual_lab.py gemma3-270m [--variants default mix broad:0.1] [--positions 2048]
                                    [--probes P] [--json out.json]
    python labs/multilingual_lab.py table out.json [more.json ...]      # one markdown table

A variant is ``CALIBRATION[:SHRINKAGE]``. CALIBRATION: ``default``, as defaults revision 4 did (Python code
and Pride and Prejudice, then Sense and Sensibility); ``broad``, that plus 512 positions of each text of
corpora.MULTILINGUAL_CALIBRATION in the first set (so they shape the geometry and the always-scored frequent
tokens); ``mix``, Python code, Pride and Prejudice and every multilingual calibration text as equal parts, 512
positions each (defaults revisions 5 and 6); ``samples`` adds the model's own seeded samples to the geometry
(flashhead.integrations.samples, its defaults: 768 texts of 8 tokens; ``samplesN-L-A``: N texts of L tokens, script
weights ^A), so ``mix+samples`` is defaults revision 7. SHRINKAGE (e.g. ``0.2``, or ``0.2r``) mixes S with its scaled
identity, or with the rows' W^T W / V (build_index's ``shrinkage`` and ``shrink_to``). Each index is applied to
the model as a user applies it (int8/int4 stage 1, Q8_0 rows), at its default probes or at ``--probes`` (the
fair comparison: same bytes per step), and measured on ``--positions`` teacher-forced positions of every
held-out text: greedy agreement with the dense head, next-token accuracy (dense and FlashHead) and TV at T = 1
on 256 positions. Hidden states of the held-out texts are cached under the flashhead cache (``lab-states``),
the indexes under ``lab-index``, so a second run only builds and measures. docs/fidelity.md cites it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flashhead._io import atomic_write_bytes, cache_dir
from flashhead.corpora import MULTILINGUAL_CALIBRATION, MULTILINGUAL_HELD_OUT, describe
from flashhead.data import load_text
from flashhead.evaluate import _sampling_divergence
from flashhead.integrations.samples import DEFAULT_ALPHA, DEFAULT_LENGTH, DEFAULT_POSITIONS, sample_states
from flashhead.integrations.transformers import (apply, build_for_model, calibration_sets, calibration_states,
                                                 dense_logits, flashhead_of, remove, text_states)
from flashhead.models import load_model

#: the English and Python held-out texts the earlier figures are on (must not regress)
BASELINE_HELD_OUT = ("emma", "code-heldout")
TV_POSITIONS = 256
#: ``default``: the calibration of defaults revision 4 (Python code + Pride and Prejudice, 4,096 positions, then
#: 2,048 of Sense and Sensibility)
REVISION4 = ["code-tune+prideprejudice", "sensesensibility"]
#: ``mix``: Python code, Pride and Prejudice and every multilingual calibration text as equal parts of the first
#: set, 512 positions each (then 3,072 positions of Sense and Sensibility)
MIX = ["+".join(["code-tune", "prideprejudice", *MULTILINGUAL_CALIBRATION]), "sensesensibility"]
MIX_POSITIONS = 512 * (2 + len(MULTILINGUAL_CALIBRATION))


def held_out_states(model, tok, model_name: str, name: str, positions: int) -> dict:
    """States, dense argmax and true next tokens of ``positions`` positions of a held-out text (cached)."""
    path = cache_dir() / "lab-states" / model_name / f"{name}-{positions}.pt"
    if path.is_file():
        return torch.load(path)
    h, target = text_states(model, tok, load_text(name), positions)
    with torch.inference_mode():
        top = torch.cat([dense_logits(model, h[a:a + 256]).argmax(-1) for a in range(0, len(h), 256)])
    out = {"h": h, "target": target, "top": top}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


def measure(model, states: dict) -> dict:
    """Agreement, accuracy and TV of the applied FlashHead on one text's states."""
    head = flashhead_of(model)
    h, top, target = states["h"], states["top"], states["target"]
    with torch.inference_mode():
        got = torch.cat([head.greedy(h[a:a + 256]) for a in range(0, len(h), 256)])
        tv = _sampling_divergence(head, h[:TV_POSITIONS], dense_logits(model, h[:TV_POSITIONS]), 1.0)["tv"]
    return {"agreement": float((got == top).float().mean()), "acc_dense": float((top == target).float().mean()),
            "acc_flash": float((got == target).float().mean()), "tv1": tv, "positions": len(h)}


def table(paths: list[str]) -> str:
    """A markdown table of runs written with --json: agreement % / accuracy change / TV at T = 1 per variant."""
    runs = [json.loads(open(p).read()) for p in paths]
    cols = [(r["model"], v, d) for r in runs for v, d in r["variants"].items()]
    calibrated = {describe(n)["language"] for n in MULTILINGUAL_CALIBRATION} | {"en", "Python"}
    lines = ["| text | language | script | register | language in calibration (rev. 5) | "
             + " | ".join(f"{m} {v} (p = {d['n_probes']})" for m, v, d in cols) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---:" for _ in cols) + " |"]
    for name, about in runs[0]["texts"].items():
        cells = [f"{100 * t['agreement']:.2f} / {100 * (t['acc_flash'] - t['acc_dense']):+.2f} / {t['tv1']:.3f}"
                 for t in (d["texts"][name] for _, _, d in cols)]
        lines.append(f"| {name} | {about['language']} | {about['script']} | {about['register']} | "
                     f"{'yes' if about['language'] in calibrated else '**no**'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="built-in model name, or 'table' to print runs' --json files as one markdown table")
    ap.add_argument("--variants", nargs="+", default=["default", "broad"])
    ap.add_argument("--positions", type=int, default=2048, help="teacher-forced positions per held-out text")
    ap.add_argument("--texts", nargs="+", default=[*MULTILINGUAL_HELD_OUT, *BASELINE_HELD_OUT])
    ap.add_argument("--probes", type=int, help="measure every variant at this probe count (default: each index's "
                                               "own default; a fair comparison holds the bytes per step fixed)")
    ap.add_argument("--json", help="write the figures here as JSON")
    ap.add_argument("files", nargs="*", help="with 'table': the --json files")
    a = ap.parse_args()
    if a.model == "table":
        print(table(a.files))
        return 0
    torch.set_num_threads(2)
    model, tok = load_model(a.model, verbose=False)
    t0 = time.perf_counter()
    texts = {name: held_out_states(model, tok, a.model, name, a.positions) for name in a.texts}
    print(f"held-out states: {len(texts)} texts in {time.perf_counter() - t0:.0f} s", flush=True)
    with torch.inference_mode():
        default_sets = calibration_sets(model, tok, REVISION4, positions=4096)
        extra = {"default": None,
                 "broad": torch.cat([calibration_states(model, tok, load_text(n), 512) for n in MULTILINGUAL_CALIBRATION])}
        if any(v.startswith("mix") for v in a.variants):  # every text an equal part of the first set
            extra["mix"] = None
            mix_sets = calibration_sets(model, tok, MIX, positions=MIX_POSITIONS)
        for v in a.variants:
            for p in v.partition(":")[0].split("+"):
                if p.startswith("samples"):  # samples[N-L-A]: N texts of L tokens, script weights ^A
                    n, length, alpha = (p.removeprefix("samples").split("-") + ["", "", ""])[:3]
                    length = int(length or DEFAULT_LENGTH)
                    positions = int(n) * length if n else DEFAULT_POSITIONS
                    extra[p], record = sample_states(model, tok, positions, length=length,
                                                     alpha=float(alpha or DEFAULT_ALPHA), progress=False)
                    print(f"{p}: {record['texts']} texts of {length} tokens, seeds per script "
                          f"{record['seed_scripts']}", flush=True)
    report = {"model": a.model, "positions": a.positions, "texts": {n: describe(n) for n in a.texts}, "variants": {}}
    for variant in a.variants:
        calib, _, shrink = variant.partition(":")
        shrink, to_rows = shrink.removesuffix("r"), shrink.endswith("r")
        parts = calib.split("+")
        if any(p not in extra for p in parts):
            raise SystemExit(f"unknown variant {variant!r}: give default, broad, samples, mix or a sum such as mix+samples, "
                             "optionally with :SHRINKAGE")
        added = [extra[p] for p in parts if extra[p] is not None and not p.startswith("samples")]
        own = [extra[p] for p in parts if p.startswith("samples")]  # the geometry only, as the default build
        sets = [torch.cat([(mix_sets if "mix" in parts else default_sets)[0], *added]),
                *(mix_sets if "mix" in parts else default_sets)[1:]]
        t1 = time.perf_counter()
        index = build_for_model(model, tok, calibration_texts=MIX if "mix" in parts else REVISION4,
                                hidden_states=sets,
                                shrinkage=float(shrink or 0), shrink_to="rows" if to_rows else "identity",
                                geometry_states=torch.cat(own) if own else None, progress=False)
        index.save(cache_dir() / "lab-index" / a.model / variant.replace(":", "-"))  # kept for analysis
        apply(model, index, n_probes=a.probes)
        head = flashhead_of(model)
        share = head.nbytes_per_step(head.n_probes) / (head.out_features * head.rows.shape[-1] * 4)  # of dense fp32
        rows = {n: measure(model, s) for n, s in texts.items()}
        remove(model)
        report["variants"][variant] = {"n_probes": head.n_probes, "default_n_probes": index.config.n_probes,
                                       "bytes_share": share, "texts": rows,
                                       "build_s": round(time.perf_counter() - t1, 1)}
        worst = min(rows, key=lambda n: rows[n]["agreement"])
        print(f"\n{a.model} {variant}: p = {head.n_probes} (its default {index.config.n_probes}), "
              f"{100 * share:.2f}% of the dense bytes, worst {worst} "
              f"{100 * rows[worst]['agreement']:.2f}%", flush=True)
        for n, r in rows.items():
            print(f"  {n:24s} agree {100 * r['agreement']:6.2f}%  acc {100 * r['acc_dense']:5.2f} -> "
                  f"{100 * r['acc_flash']:5.2f}  TV1 {r['tv1']:.4f}", flush=True)
    if a.json:
        atomic_write_bytes(a.json, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
