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
(``transformers`` only so far), ``index`` (assets folder; default the model's cached index), ``probes``,
``stage1``, ``dense`` (true: the dense head, the baseline in the same harness).
"""

from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..models import DEFAULT_MODEL, load_model
from .transformers import apply, index_for

ENGINES = ("transformers",)


@register_model("flashhead")
class FlashHeadLM(HFLM):
    """lm-eval's HFLM with FlashHead decoding (exact scoring); see the module docstring."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, engine: str = "transformers", index: str | None = None,
                 probes: int | None = None, stage1: str | None = None, dense: bool = False,
                 dtype: str = "float32", **kwargs) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not supported by the lm-eval model yet; use one of {ENGINES}")
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int)):
            raise ValueError(f"probes must be an integer, got {probes!r}")
        kwargs.pop("device", None)  # the model is loaded on the CPU by flashhead.load_model
        model, tok = load_model(str(pretrained), dtype=dtype, verbose=False)
        super().__init__(pretrained=model, tokenizer=tok, **kwargs)  # HFLM ties weights here: FlashHead after
        self.flashhead = None
        if not dense:
            self.flashhead = apply(self.model, index_for(str(pretrained), model, tok, index, progress=False),
                                   n_probes=probes, stage1=stage1)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (``argv``, default this process's), with the ``flashhead`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
