"""What each row of a vLLM step asks of the head: greedy or sampled at which temperature, exact or not.

vLLM's ``compute_logits(hidden_states)`` gets hidden states only, one row per request of the
persistent batch, in batch order. vLLM's public plugin point for per-request state is a logits
processor: installed under the ``vllm.logits_processors`` entry point, it is built with every
model runner's input batch, and vLLM calls its ``update_state`` with the requests added, removed
and moved, *before* each forward pass (``InputBatch.refresh_metadata``), then its ``apply`` on the
logits inside the sampler, after the grammar bitmask, ``allowed_token_ids``, bad words, min-tokens
and logit bias (built-in processors run first) and before penalties, temperature, top-k and top-p.
:class:`RequestTracker` is that processor: it keeps a :class:`RowSpec` per request, hands the step's
specs to the FlashHead model's ``compute_logits`` (matched by the shared ``vllm_config``), and in
``apply`` finishes the rows whose masks might have removed every candidate (dense fallback).

A second ``compute_logits`` call in one step (prompt logprobs) or one outside a step (the
profiling run) gets no specs, and the model answers it with the exact dense head.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

#: vLLM treats a temperature below this as greedy (vllm/v1/sample/sampler.py, _SAMPLING_EPS)
GREEDY_BELOW = 1e-5
#: added to a request's seed for the tail-cluster draws, so they do not reuse the sampler's stream
_SEED_OFFSET = 0x5F3759DF

_TRACKERS: dict[int, weakref.ref] = {}


@dataclass
class RowSpec:
    """How the head computes one request's row. No spec: plain greedy, only FlashHead's argmax matters;
    an all-default spec: greedy whose logit values matter (penalties), FlashHead's candidates."""

    temperature: float | None = None  # None: greedy (no sampling tail)
    generator: torch.Generator | None = None  # the request's own stream for the tail draw (seeded requests)
    dense: bool = False  # the request asks for logprobs: vLLM reports them over the whole vocabulary
    constrained: bool = False  # a grammar, bad words or min-tokens may mask every candidate: dense fallback
    extra_ids: torch.Tensor | None = None  # allowed_token_ids and logit_bias ids: always scored exactly


def row_spec(params: SamplingParams) -> RowSpec | None:
    """The spec of a request (None for plain greedy, the common case)."""
    penalized = (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                 or params.presence_penalty != 0.0)
    spec = RowSpec()
    if params.temperature >= GREEDY_BELOW:
        spec.temperature = float(params.temperature)
        if params.seed is not None:
            spec.generator = torch.Generator().manual_seed((params.seed + _SEED_OFFSET) % (1 << 63))
    spec.dense = (params.logprobs is not None or bool(params.logprob_token_ids)
                  or params.thinking_token_budget is not None)
    spec.constrained = (params.structured_outputs is not None or bool(params.bad_words_token_ids)
                        or params.min_tokens > 0)
    extra = set(params.allowed_token_ids or ()) | set(params.logit_bias or ())
    if extra:
        spec.extra_ids = torch.tensor(sorted(extra), dtype=torch.int64)
    plain = (spec.temperature is None and not (spec.dense or spec.constrained or penalized)
             and spec.extra_ids is None)
    return None if plain else spec


class RequestTracker(LogitsProcessor):
    """Per-request head settings for the FlashHead models (a no-op for every other model)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.specs: dict[int, RowSpec] = {}
        self.batch_size = 0
        self.fresh = False  # between update_state and the step's first compute_logits
        self.finish = None  # set by compute_logits when some rows need apply(): a callable(logits)
        _TRACKERS[id(vllm_config)] = weakref.ref(self)
        self._config_ref = weakref.ref(vllm_config)

    def is_argmax_invariant(self) -> bool:
        return False  # apply() can change a row entirely (dense fallback), so greedy batches need it too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.specs, batch_update, lambda params, _, __: row_spec(params))
        if batch_update is not None:
            self.batch_size = batch_update.batch_size
        self.fresh = True
        self.finish = None

    def take(self, rows: int) -> dict[int, RowSpec] | None:
        """The step's specs for the first ``compute_logits`` call of a step; None (exact dense head)
        for any other call, or when ``rows`` is not one per request (a layout this plugin does not know)."""
        fresh, self.fresh = self.fresh, False
        return dict(self.specs) if fresh and rows == self.batch_size else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        finish, self.finish = self.finish, None
        return logits if finish is None else finish(logits)


def tracker_for(vllm_config) -> RequestTracker | None:
    """The tracker built with the input batch of the runner that holds ``vllm_config``, if any."""
    ref = _TRACKERS.get(id(vllm_config))
    tracker = ref() if ref is not None else None
    if tracker is None or tracker._config_ref() is not vllm_config:
        return None
    return tracker
