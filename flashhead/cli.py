"""The ``flashhead`` command line: one sub-command per step of the pipeline."""

from __future__ import annotations

import argparse
import json
import sys

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
    print(f"{'name':<14} {'model':<24} {'vocab':>8} {'hidden':>6} {'head share':>10}  installed  cached")
    for r in rows:
        share = f"{100 * r.head_share:.1f}%" if r.installed else "-"
        print(f"{r.name:<14} {r.title:<24} {r.vocab_size:>8} {r.hidden_size:>6} {share:>10}  "
              f"{'yes' if r.installed else 'no':<9}  {'yes' if r.cached else 'no'}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from . import data

    data.fetch_sources()
    for name in data.text_names():
        data.load_text(name)
    print(f"texts ready: {', '.join(data.AUSTEN_BOOKS)}, brown")
    for name in args.models:
        _models.local_dir(name)
        print(f"model ready: {name}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .decode import generate

    model, tok = _models.load_model(args.model, dtype=args.dtype)
    gen = generate(model, tok, [args.prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.json:
        print(json.dumps({"model": args.model, "head": "dense", "prompt": args.prompt, "text": gen.texts[0],
                          "token_ids": gen.token_ids[0], "new_tokens": gen.new_tokens, "seconds": gen.seconds,
                          "tokens_per_second": gen.tokens_per_second}, indent=2))
    else:
        print(args.prompt + gen.texts[0])
        print(f"[dense head: {gen.new_tokens} tokens in {gen.seconds:.2f} s, {gen.tokens_per_second:.1f} tokens/s]")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .decode import generate

    model, tok = _models.load_model(args.model)
    for prompt in args.prompts or DEMO_PROMPTS:
        gen = generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens)
        print(f"\n{prompt!r}\n  dense: {gen.texts[0]!r}\n  {gen.tokens_per_second:.1f} tokens/s")
    return 0


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

    s = sub.add_parser("generate", help="generate a continuation of a prompt and print tokens/s")
    s.add_argument("model", help=model_help)
    s.add_argument("--prompt", required=True, help="text to continue")
    s.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    s.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    s.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    s.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("demo", help="generate from a few prompts and print tokens/s (the README's main command)")
    s.add_argument("--model", default=_models.DEFAULT_MODEL, help=f"{model_help} (default {_models.DEFAULT_MODEL})")
    s.add_argument("--prompts", nargs="*", help="prompts to use instead of the built-in ones")
    s.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # our errors carry the fix in the message
        print(f"flashhead {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
