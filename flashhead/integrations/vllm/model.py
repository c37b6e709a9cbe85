"""FlashHead variants of vLLM's causal LMs: every step's head is flashhead's :class:`FlashHead`.

``FlashHead<Base>`` subclasses vLLM's own ``<Base>`` and changes only the head: after
``load_weights`` it reads the folder's index (:mod:`.folder`: flashhead's format or the vendor's,
checked against the loaded head), and ``compute_logits`` returns full-width logits that are ``-inf``
outside FlashHead's candidates, so vLLM's sampler applies temperature, top-k/top-p, min-p,
penalties, ``allowed_token_ids``, logit bias and grammars unchanged. Per row (see :mod:`.requests`):

- plain greedy requests (no penalties, no logprobs, no masks): a one-hot row at FlashHead's argmax
  (``FlashHead.greedy``: one compiled call on Q8_0 rows, no candidate logits written);
- greedy requests with penalties: the top-p clusters' exact logits (plus the always-scored ids);
- sampled requests: the same plus one tail cluster drawn at the request's temperature, whose logits
  carry the estimated mass of all unprobed clusters (``FlashHead.forward`` with a temperature);
- ``allowed_token_ids`` and ``logit_bias`` ids are scored exactly on top;
- requests asking for logprobs, prompt-logprob calls and calls outside a step use the dense head;
- rows with a grammar, bad words or min-tokens carry a finite sentinel instead of ``-inf`` outside
  the candidates; if the masks leave no candidate, the tracker recomputes that row with the dense
  head over what the masks left, else the sentinel becomes ``-inf``.

Rows are laid out cluster by cluster in one tensor that FlashHead reads: int8 rows with fp16
scales when the head is exactly Q8_0 (every built-in model's, from its GGUF), else float rows.
At TP=1 the dense rows read the model's own head tensor (no second copy). Under tensor parallelism
each rank gathers the vocab shards once at load, keeps the whole FlashHead (replicated, no
communication per step) and drops the gathered copy; its dense rows dequantize the Q8_0 rows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from ...head import FlashHead, q8_0_dequantize, q8_0_rows
from .folder import CONFIG_KEY, load_index, read_spec
from .requests import RowSpec, tracker_for

logger = logging.getLogger("vllm.flashhead")

#: "outside the candidates" for rows that masks may empty: finite, so that what a mask leaves is visible
SENTINEL = -1e30
#: FlashHead rows per block of a dense row without the model's head tensor (TP > 1): ~25 MB of fp32 at d = 768
_DENSE_CHUNK = 8192
_NEG_INF = float("-inf")


def _full_head_weight(lm_head, vocab: int) -> torch.Tensor:
    """The head weight ``[vocab, d]`` in token order; under tensor parallelism, gathered from the shards."""
    w = lm_head.weight
    if lm_head.tp_size == 1:
        return w[:vocab]
    si = lm_head.shard_indices
    local = si.org_vocab_end_index - si.org_vocab_start_index  # float32: vLLM's CPU all-gather has no int64
    counts = tensor_model_parallel_all_gather(torch.tensor([local], dtype=torch.float32))
    shards = tensor_model_parallel_all_gather(w.detach().contiguous(), dim=0).view(lm_head.tp_size, -1, w.shape[1])
    return torch.cat([shards[r, : int(n)] for r, n in enumerate(counts)])


class ServedHead:
    """FlashHead over a vLLM model's head, with vLLM's logit scale and soft cap, answering per-row specs.

    ``dense_weight``: the head in token order ``[>= V, d]`` for the dense rows (at TP=1 the model's own
    tensor, no copy); None computes them from FlashHead's rows (dequantized block by block if Q8_0).
    """

    def __init__(self, head: FlashHead, scale: float = 1.0, soft_cap: float | None = None,
                 dense_weight: torch.Tensor | None = None) -> None:
        if not scale > 0:
            raise ValueError(f"FlashHead needs a positive logit scale, got {scale}")
        self.head, self.scale, self.soft_cap = head, float(scale), soft_cap
        self.vocab = head.out_features
        self._flat = head.rows.view(-1, head.d)  # [K*cap, d], cluster-ordered
        self._flat_scales = None if head.row_scales is None else head.row_scales.view(self._flat.shape[0], -1)
        self._dense_w = None if dense_weight is None else dense_weight[: self.vocab]
        self._no_slot = head.token_slot < 0  # tokens without a row (beyond the tokenizer)
        self._slot = head.token_slot.clamp(min=0)
        # plain greedy rows get a one-hot row at FlashHead's argmax: exact only where vLLM's scaling
        # cannot merge two logits (no soft cap, unit scale)
        self.one_hot_greedy = soft_cap is None and self.scale == 1.0
        self.dense_fallbacks = 0  # rows recomputed densely because the masks left no candidate

    @classmethod
    def for_model(cls, model, vllm_config) -> ServedHead:
        """Read the model folder's index, check it against the loaded head and lay the rows out.

        A head that is exactly Q8_0 (a GGUF's, dequantized) is laid out as int8 rows and fp16 scales:
        stage 2 reads 3.8x fewer bytes and gives the same logits as the float head."""
        mc = vllm_config.model_config
        hf = mc.hf_config
        folder = Path(mc.model)
        if not folder.is_dir():
            raise ValueError(f"FlashHead serves local folders only, got {mc.model!r}; write one with "
                             "`flashhead export-vllm MODEL --out FOLDER`")
        keys = (CONFIG_KEY, "flash_head_cache_dir", "n_probes")
        spec = read_spec({k: getattr(hf, k, None) for k in keys}, folder)
        weight = _full_head_weight(model.lm_head, model.logits_processor.org_vocab_size)
        index = load_index(spec, weight)
        c = index.config
        slots = index.slot_token
        filled = (slots >= 0).flatten()
        order = slots.flatten()[filled]
        q8 = q8_0_rows(weight)
        rows, scales = (weight, None) if q8 is None else q8

        def clustered(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(c.num_clusters * c.cluster_size, t.shape[1])
            out[filled] = t[order]
            return out.view(c.num_clusters, c.cluster_size, -1)

        head = FlashHead(clustered(rows), slots, index.centroids, out_features=c.vocab_size, n_probes=c.n_probes,
                         always_ids=torch.tensor(c.always_ids, dtype=torch.long), stage1=c.stage1,
                         row_scales=None if scales is None else clustered(scales))
        del rows, scales
        # at TP=1 the weight is the model's own tensor: the dense rows read it; a gathered copy is dropped
        dense_weight = weight if model.lm_head.tp_size == 1 else None
        del weight
        lp = model.logits_processor
        logger.info("FlashHead (%s index): K=%d clusters of %d, p=%d probes, stage 1 %s, stage 2 %s, "
                    "%d always-scored ids", spec.kind, c.num_clusters, c.cluster_size, c.n_probes, c.stage1,
                    "float" if q8 is None else "q8_0", len(c.always_ids))
        return cls(head, lp.scale, lp.soft_cap, dense_weight)

    # ------------------------------------------------------------ the pieces
    def _row_weights(self, at: torch.Tensor | slice) -> torch.Tensor:
        """FlashHead's flat rows ``at`` (slots or a slice) as floats (Q8_0 rows dequantized: the same values)."""
        rows = self._flat[at]
        return rows if self._flat_scales is None else q8_0_dequantize(rows, self._flat_scales[at])

    def dense(self, h: torch.Tensor) -> torch.Tensor:
        """Exact dense logits ``[n, V]`` (float32): from the model's head tensor where there is one (TP=1),
        else from FlashHead's rows, a block of rows at a time, in token order."""
        if self._dense_w is not None:
            out = (h.to(self._dense_w.dtype) @ self._dense_w.T).float()
        else:
            n = self._flat.shape[0]
            blocks = (self._row_weights(slice(a, a + _DENSE_CHUNK)) for a in range(0, n, _DENSE_CHUNK))
            out = torch.cat([(h.to(w.dtype) @ w.T).float() for w in blocks], dim=1).index_select(1, self._slot)
        return out.masked_fill_(self._no_slot, _NEG_INF)

    def flash(self, h: torch.Tensor, temperature: float | None, generator: torch.Generator | None) -> torch.Tensor:
        """FlashHead's full-width logits ``[n, V]``: candidates, plus the sampling tail at ``temperature``."""
        head = self.head
        head.temperature = None if temperature is None else temperature / self.scale  # vLLM samples scale * z / T
        head.generator = generator
        try:
            return head(h)
        finally:
            head.temperature, head.generator = None, None

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """``[n, V]`` rows that are 0 at FlashHead's argmax and ``-inf`` elsewhere: what vLLM's greedy
        sampler needs, without the candidates' logits (plain greedy rows only: no penalties, no logprobs)."""
        out = torch.full((h.shape[0], self.vocab), _NEG_INF, dtype=torch.float32, device=h.device)
        return out.scatter_(1, self.head.greedy(h).unsqueeze(1), 0.0)

    def exact(self, h: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, exact logits) of the token ``ids`` below V for one row ``h`` [d] (``-inf`` for ids
        without a row)."""
        ids = ids[ids < self.vocab]
        w = self._row_weights(self._slot[ids])
        out = w @ h.to(w.dtype)
        return ids, out.float().masked_fill_(self._no_slot[ids], _NEG_INF)

    def _vllm_scale(self, out: torch.Tensor) -> torch.Tensor:
        """vLLM's soft cap, then scale (LogitsProcessor.forward), on the finite entries only."""
        if self.soft_cap is not None:
            out = torch.where(torch.isfinite(out), torch.tanh(out / self.soft_cap) * self.soft_cap, out)
        return out.mul_(self.scale) if self.scale != 1.0 else out

    # ------------------------------------------------------------ one step
    def logits(self, h: torch.Tensor, specs: dict[int, RowSpec] | None
               ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
        """Full-width logits ``[N, V]`` for a step's rows, and what the sampler must run on them afterwards.

        ``specs``: row -> :class:`RowSpec`; rows without one are plain greedy (only the argmax
        matters: a one-hot row); None = every row dense.
        """
        if specs is None:
            return self._vllm_scale(self.dense(h)), None
        groups: dict[tuple, list[int]] = defaultdict(list)
        for r in range(h.shape[0]):
            groups[self._key(specs.get(r))].append(r)
        if len(groups) == 1 and not any(s.extra_ids is not None or s.constrained for s in specs.values()):
            # the common case (every row plain greedy, say): one call, no copy
            [key] = groups
            return self._vllm_scale(self._group(h, key)), None
        out = torch.empty(h.shape[0], self.vocab, dtype=torch.float32, device=h.device)
        for key, rows in groups.items():
            idx = torch.tensor(rows, device=h.device)
            out[idx] = self._group(h[idx], key)
        for r, s in specs.items():
            if s.extra_ids is not None and not s.dense:
                ids, vals = self.exact(h[r], s.extra_ids)
                out[r, ids] = vals
        out = self._vllm_scale(out)
        masked = [r for r, s in specs.items() if s.constrained and not s.dense]
        if not masked:
            return out, None
        for r in masked:
            out[r].masked_fill_(out[r] == _NEG_INF, SENTINEL)
        return out, lambda logits: self._fallback(logits, h, masked)

    def _key(self, s: RowSpec | None) -> tuple:
        """How a row is computed: ("argmax",) one-hot, ("dense",), or FlashHead at (temperature, generator)."""
        if s is None:
            return ("argmax",) if self.one_hot_greedy else (None, None)
        return ("dense",) if s.dense else (s.temperature, s.generator)

    def _group(self, h: torch.Tensor, key: tuple) -> torch.Tensor:
        if key == ("argmax",):
            return self.greedy(h)
        return self.dense(h) if key == ("dense",) else self.flash(h, *key)

    def _fallback(self, logits: torch.Tensor, h: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """After vLLM's masks: a row with no candidate left is recomputed densely over what the masks
        left (the sentinel entries); in every other row the sentinel becomes ``-inf``."""
        for r in rows:
            row = logits[r]
            outside = row <= SENTINEL / 2
            if bool(outside.all()):
                self.dense_fallbacks += 1
                left = row > _NEG_INF
                dense = self._vllm_scale(self.dense(h[r : r + 1]))[0]
                logits[r] = torch.where(left, dense, _NEG_INF)
            else:
                row.masked_fill_(outside, _NEG_INF)
        return logits


class FlashHeadMixin:
    """The head of a vLLM causal LM replaced by :class:`ServedHead` (put first among the bases)."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        spec_config = vllm_config.speculative_config
        if spec_config is not None and getattr(spec_config, "draft_model_config", None) is not vllm_config.model_config:
            raise ValueError("FlashHead models do not support speculative decoding as the target model yet; "
                             "serve without --speculative-config")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("FlashHead models do not support pipeline parallelism yet; use tensor parallelism")
        if getattr(vllm_config.parallel_config, "enable_batch_sharded_sampling", False):
            raise ValueError("FlashHead models do not support batch-sharded sampling; turn it off")
        self._flashhead_vllm_config = vllm_config
        self.flashhead: ServedHead | None = None
        self._warned_untracked = False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        self.flashhead = ServedHead.for_model(self, self._flashhead_vllm_config)
        return loaded

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tracker = tracker_for(self._flashhead_vllm_config)
        if tracker is None:  # e.g. a speculative-decoding draft: vLLM loads no custom logits processor there
            if not self._warned_untracked:
                logger.warning("FlashHead: no request tracker in this runner; every row gets greedy candidates "
                               "(sampled requests sample among the candidates only)")
                self._warned_untracked = True
            logits, _ = self.flashhead.logits(hidden_states, dict.fromkeys(range(hidden_states.shape[0]), RowSpec()))
            return logits
        logits, tracker.finish = self.flashhead.logits(hidden_states, tracker.take(hidden_states.shape[0]))
        return logits

    def compute_logits_local(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("FlashHead models do not support batch-sharded sampling; turn it off")

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Greedy token ids (a speculative-decoding draft's proposal): FlashHead's argmax."""
        return self.flashhead.head.greedy(hidden_states)


class FlashHeadLlamaForCausalLM(FlashHeadMixin, LlamaForCausalLM):
    """Llama family (SmolLM2, Llama 3.x) with FlashHead."""


class FlashHeadGemma3ForCausalLM(FlashHeadMixin, Gemma3ForCausalLM):
    """Gemma 3 (text) with FlashHead."""


class FlashHeadQwen2ForCausalLM(FlashHeadMixin, Qwen2ForCausalLM):
    """Qwen2 / Qwen2.5 with FlashHead."""


class FlashHeadQwen3ForCausalLM(FlashHeadMixin, Qwen3ForCausalLM):
    """Qwen3 with FlashHead."""
