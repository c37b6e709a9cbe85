"""lm-evaluation-harness with FlashHead: the model type ``flashhead``.

    flashhead lm-eval --model flashhead --model_args pretrained=gemma3-270m --tasks arc_easy
    python -m flashhead.integrations.lm_eval ...          # the same: lm-eval's own CLI, flags and all

or from Python, ``lm_eval.simple_evaluate(model=FlashHeadLM(pretrained="smollm2-135m"), tasks=[...])``.
lm-eval has no plugin discovery for models, so importing this module registers the type; both launchers
do that, then hand the command line to lm-eval unchanged.

``FlashHeadLM`` is lm-eval's own ``HFLM`` over a model loaded by :func:`flashhead.load_model` (a built-in
name, a model folder or a GGUF file) with FlashHead applied after HFLM has set it up (HFLM calls
``tie_weights()``, which must not see FlashHead's head). Log-likelihood tasks score text with forwards
outside ``generate()``, which stay exact after ``apply()``: they give ``--model hf``'s numbers on the same
model. ``generate_until`` tasks decode with FlashHead. Model args besides HFLM's: ``engine``
(``transformers`` or ``llama.cpp``), ``index`` (assets folder; default the model's cached index),
``probes``, ``stage1``, ``dense`` (true: the dense head, the baseline in the same harness).

``engine=llama.cpp`` (a built-in name or a GGUF file) gives :class:`FlashHeadLlamaCppLM`: log-likelihoods
from llama.cpp's own dense head (:meth:`LlamaCpp.score`), ``generate_until`` with FlashHead on llama.cpp's
body (``threads``, ``n_ctx`` as model args).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from ..models import DEFAULT_MODEL, load_model
from .transformers import apply, index_for

ENGINES = ("transformers", "llama.cpp")


def _check_probes(probes) -> None:
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int)):
        raise ValueError(f"probes must be an integer, got {probes!r}")


@register_model("flashhead")
class FlashHeadLM(HFLM):
    """lm-eval's HFLM with FlashHead decoding (exact scoring); see the module docstring."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, engine: str = "transformers", index: str | None = None,
                 probes: int | None = None, stage1: str | None = None, dense: bool = False,
                 dtype: str = "float32", **kwargs) -> None:
        if engine != "transformers":
            raise ValueError(f"FlashHeadLM runs engine='transformers'; got engine={engine!r}: for llama.cpp use "
                             "FlashHeadLlamaCppLM, or FlashHeadLM.create_from_arg_string('engine=llama.cpp,...') "
                             f"as lm-eval's CLI does (engines: {ENGINES})")
        _check_probes(probes)
        kwargs.pop("device", None)  # the model is loaded on the CPU by flashhead.load_model
        model, tok = load_model(str(pretrained), dtype=dtype, verbose=False)
        super().__init__(pretrained=model, tokenizer=tok, **kwargs)  # HFLM ties weights here: FlashHead after
        self.flashhead = None
        if not dense:
            self.flashhead = apply(self.model, index_for(str(pretrained), model, tok, index, progress=False),
                                   n_probes=probes, stage1=stage1)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TemplateLM:
        """lm-eval's constructor from ``--model_args``: ``engine=llama.cpp`` gives :class:`FlashHeadLlamaCppLM`."""
        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        engine = args.pop("engine", "transformers")
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
        target = FlashHeadLlamaCppLM if engine == "llama.cpp" else cls
        known = _named_params(target) | (_named_params(HFLM) if target is cls else set())
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"model args {', '.join(unknown)} are not known to the flashhead model with "
                             f"engine={engine}; known: {', '.join(sorted(known))}")
        return target(**args, **{k: v for k, v in extra.items() if k in known})


def _named_params(cls) -> set[str]:
    """The keyword arguments ``cls.__init__`` names (not its ``**kwargs``)."""
    return {p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class FlashHeadLlamaCppLM(TemplateLM):
    """lm-eval's model over :class:`~flashhead.integrations.llamacpp.LlamaCpp`: exact log-likelihoods from
    llama.cpp's dense head, ``generate_until`` decoding with FlashHead (or llama.cpp's head with ``dense``)."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, index: str | None = None, probes: int | None = None,
                 stage1: str | None = None, dense: bool = False, threads: int = 2, n_ctx: int = 2048,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, device: str | None = None,
                 max_gen_toks: int = 256) -> None:
        from .llamacpp import LlamaCpp

        super().__init__()
        _check_probes(probes)
        if device not in (None, "cpu"):
            raise ValueError(f"engine=llama.cpp runs on the CPU; got device={device!r}")
        self.engine = LlamaCpp(str(pretrained), n_threads=threads, n_ctx=n_ctx, index=index, n_probes=probes,
                               stage1=stage1, flashhead=not dense)
        self.head = "dense" if dense else "flashhead"
        self.max_gen_toks = int(max_gen_toks)
        self._bos = self.engine.tokenize("", add_special=True)  # [BOS] for models that want it, else []
        ll, vocab = self.engine.ll, self.engine._vocab
        self._eot = next(t for t in (ll.llama_vocab_eos(vocab), ll.llama_vocab_eot(vocab), 0) if t >= 0)

    @property
    def eot_token_id(self) -> int:
        return int(self._eot)

    @property
    def prefix_token_id(self) -> int:
        return self._bos[0] if self._bos else self.eot_token_id

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.engine.tokenize(string, add_special=False)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.engine.detokenize(tokens)

    def _fit(self, ids: list[int], keep: int) -> list[int]:
        """``ids`` cut from the left to fit the context with ``keep`` positions to spare."""
        room = self.engine.n_ctx - keep
        if room < 1:
            raise ValueError(f"n_ctx={self.engine.n_ctx} leaves no room for the prompt; pass a larger n_ctx")
        return ids[-room:]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for key, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm, desc="log-likelihoods"):
            ids = self._fit(self._with_bos(context_enc) + list(continuation_enc), 0)
            start = len(ids) - len(continuation_enc)
            logp, greedy = self.engine.score(ids, start)
            out.append((float(logp.sum()), bool(greedy.all())))
            self.cache_hook.add_partial("loglikelihood", key, out[-1])
        return out

    def _with_bos(self, ids) -> list[int]:
        ids = list(ids)
        return ids if not self._bos or ids[:1] == self._bos else self._bos + ids

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="rolling log-likelihoods"):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.engine.n_ctx - 1, context_len=1))
            total = 0.0
            for context, continuation in windows:
                ids = self._with_bos(context) + list(continuation)
                total += float(self.engine.score(ids, len(ids) - len(continuation))[0].sum())
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generate_until"):
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = kw.pop("temperature", 0.0)
            sample = kw.pop("do_sample", False) and temperature and temperature > 0
            ids = self._fit(self._with_bos(self.tok_encode(context)), max_new)
            gen = self.engine.generate(ids, max_new, temperature=float(temperature) if sample else None,
                                       top_p=kw.pop("top_p", None) if sample else None,
                                       top_k=kw.pop("top_k", None) if sample else None, head=self.head, stop=until)
            text = gen.texts[0]
            for term in until:
                text = text.split(term)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


#: flashhead's own lm-eval tasks (``flashhead_humaneval``: HumanEval offline); the launcher includes them
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (``argv``, default this process's), with the ``flashhead`` model type registered and,
    unless the user gives an ``--include_path`` of their own (lm-eval takes one folder), flashhead's tasks."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    runs = args[:1] == ["run"] or (len(args) > 1 and args[0].startswith("-"))  # lm-eval inserts 'run' then
    if runs and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    except Exception as e:  # a task whose dataset lives on the hub, with no network or in offline mode
        text = f"{type(e).__name__}: {e}"
        if not any(w in text for w in ("Hub", "OfflineModeIsEnabled", "DatasetNotFoundError", "huggingface.co")):
            raise
        tasks = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--tasks"), "this task")
        raise RuntimeError(f"{tasks}: the dataset is on the Hugging Face hub, which cannot be reached here ({e}); "
                           "give lm-eval a local copy (a task YAML with dataset_path: json and data_files, passed "
                           "with --include_path) or run with the network") from None


if __name__ == "__main__":
    main()
