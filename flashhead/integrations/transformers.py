"""FlashHead inside a transformers causal LM: build an index for it, apply in one call, remove.

``apply(model, index)`` lays the head rows out cluster by cluster in ONE tensor that replaces the
head weight; for models that tie the head to the input embedding (both built-in models do), the
embedding uses that same tensor through an id -> slot map, so the head's memory is not doubled. A head
that is exactly Q8_0 (dequantized from a GGUF) is kept as its int8 rows and fp16 scales only, and a tied
embedding looks its tokens up there (docs/design.md, "Memory").
``model.lm_head`` becomes a :class:`FlashHead`. Inside ``generate()`` (and :func:`decoding`) it returns
full-width logits that are -inf outside the candidates, so ``generate()``, its logits processors and
warpers keep working unchanged; ``generate()`` already projects only each sequence's last position at
prefill. Any other forward scores text: it gets the dense head's logits, bit for bit, computed from the
same rows (perplexity and log-likelihoods stay exact; docs/design.md, "Scoring is exact"). For sampled
generation the head draws clusters in proportion to their centroid probabilities at the call's
temperature. ``remove(model)`` restores the original weights exactly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data import DEFAULT_CALIBRATION_POSITIONS, DEFAULT_CALIBRATION_TEXTS
from ..head import FlashHead, q8_0_dequantize, q8_0_rows
from ..index import DEFAULTS_REVISION, FORMAT_VERSION, FlashHeadIndex, build_index, check_save_target
from ..models import head_weight
from .samples import DEFAULT_POSITIONS as DEFAULT_SAMPLE_POSITIONS
from .samples import sample_states

ASSETS_SUBDIR = "flashhead"  # where save_pretrained puts the assets, next to the weights


def default_index_dir(model_ref: str) -> Path:
    """Where a model's index lives unless told otherwise: the cache, one folder per model, asset format
    version and revision of the build defaults (a new format builds anew instead of failing on an old
    cached index, and new defaults build anew instead of reusing an index built with the old ones)."""
    from .._io import cache_dir
    from ..models import BUILTIN_MODELS

    if model_ref in BUILTIN_MODELS:
        slug = model_ref
    else:
        path = Path(model_ref).expanduser().resolve()
        slug = f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    return cache_dir() / f"indexes-v{FORMAT_VERSION}-d{DEFAULTS_REVISION}" / slug


def index_for(model_ref: str, model, tokenizer, folder: str | Path | None = None, *, progress: bool = True,
              **build_kwargs) -> FlashHeadIndex:
    """The model's index from ``folder`` (default :func:`default_index_dir`), built and saved if missing.

    An index there that belongs to another head is an error, not silently replaced.
    """
    folder = Path(folder) if folder is not None else default_index_dir(model_ref)
    if folder.is_dir():
        return FlashHeadIndex.load(folder, weight=head_weight(model))
    check_save_target(folder)  # a file there: say so now, not after the build
    if progress:
        print(f"no FlashHead index at {folder}: building it once", flush=True)
    index = build_for_model(model, tokenizer, model_name=model_ref, progress=progress, **build_kwargs)
    index.save(folder)
    return index


def text_states(model, tokenizer, text: str, positions: int = 4096, window: int = 256,
                stride_windows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (the head's input) at ``positions`` positions of ``text``, and the true next
    token at each: ([positions, d] float32, [positions] int64).

    Each window of ``window`` tokens starts with the tokenizer's own special prefix (Gemma needs
    <bos>); every ``stride_windows``-th window is used, to spread the positions over the text.
    """
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prefix = tokenizer("", add_special_tokens=True).input_ids
    body = window - len(prefix)
    available = (len(ids) - 1) // body
    n_windows = min(math.ceil(positions / body), available // stride_windows)
    if n_windows < 1:
        raise ValueError(f"text is too short: {len(ids)} tokens, need at least {body + 1}")
    chunks = [ids[i * body:(i + 1) * body + 1] for i in range(0, n_windows * stride_windows, stride_windows)]
    states = []
    with torch.inference_mode():
        for a in range(0, len(chunks), 4):  # 4 equal-length windows per forward: faster, same bits as one by one
            batch = torch.tensor([prefix + c[:-1] for c in chunks[a:a + 4]])
            out = model.base_model(input_ids=batch)  # post-norm: what the head sees
            states.append(out.last_hidden_state[:, len(prefix):].float().flatten(0, 1))
    targets = torch.tensor([t for c in chunks for t in c[1:]])
    return torch.cat(states)[:positions], targets[:positions]


def calibration_states(model, tokenizer, text: str, positions: int = 4096, window: int = 256) -> torch.Tensor:
    """Hidden states at ``positions`` positions of ``text`` (the raw text)."""
    return text_states(model, tokenizer, text, positions, window)[0]


def _listed(x, single: type) -> list:
    """``x`` as a list: ``[x]`` when it is one ``single`` item, else its items."""
    return [x] if isinstance(x, single) else list(x)


def calibration_sets(model, tokenizer, texts: str | Sequence[str] = DEFAULT_CALIBRATION_TEXTS,
                     positions: int = DEFAULT_CALIBRATION_POSITIONS) -> list[torch.Tensor]:
    """The calibration hidden states of :func:`build_for_model`, one tensor per text (a built-in name or a
    UTF-8 file): ``positions`` of the first text, half as many of each other one. A name ``a+b`` mixes
    texts: its positions are shared equally between them (a group such as ``multilingual-tune`` counts each of
    its texts, data.calibration_groups), and their states are concatenated. A text too short for its share is
    an error (its name, its length, what to do)."""
    from ..data import calibration_parts, text_or_file

    names = _listed(texts, str)
    if not names or positions < 2:
        raise ValueError(f"need at least one calibration text and 2 positions, got {names} and {positions}")

    def one(name: str, n: int) -> torch.Tensor:
        try:
            h = calibration_states(model, tokenizer, text_or_file(name), n)
        except ValueError as e:  # e.g. too short for one window: say which text
            raise ValueError(f"calibration text {name!r}: {e}; give a longer text") from None
        if h.shape[0] < n:
            raise ValueError(f"calibration text {name!r} gives {h.shape[0]} positions, fewer than the {n} asked of it; "
                             "give a longer text or fewer positions (--positions)")
        return h

    def states(name: str, n: int) -> torch.Tensor:
        parts = calibration_parts(name)
        return torch.cat([one(t, n // len(parts)) for t in parts])

    return [states(n, positions if i == 0 else positions // 2) for i, n in enumerate(names)]


def eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end generation: always scored, so FlashHead can always stop."""
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(int(i) for i in ids)


def build_for_model(model, tokenizer, *, cluster_size: int | None = None,
                    calibration_texts: str | Sequence[str] | None = DEFAULT_CALIBRATION_TEXTS,
                    calibration_positions: int = DEFAULT_CALIBRATION_POSITIONS, seed: int = 0, iters: int = 10, n_probes: int | None = None,
                    model_name: str = "", progress: bool = True, shrinkage: float = 0.0, shrink_to: str = "identity",
                    samples: int = DEFAULT_SAMPLE_POSITIONS,
                    hidden_states: torch.Tensor | Sequence[torch.Tensor] | None = None,
                    geometry_states: torch.Tensor | None = None) -> FlashHeadIndex:
    """Build a FlashHead index for a transformers causal LM.

    Calibration hidden states come from ``calibration_texts`` (built-in text names, see
    :func:`calibration_sets`; None for the spherical geometry without calibration): the first text's
    set the clustering geometry and the always-scored frequent tokens; the build records the probes
    each text's states need for the containment target. The built-in texts work offline for any model.
    ``samples`` positions of the model's own samples, seeded across its vocabulary's scripts
    (:mod:`flashhead.integrations.samples`; 0: none), join the first set in the geometry only.
    ``hidden_states``, ``geometry_states``: those sets (or the first one) and the samples' states, when
    already computed (then no samples are drawn); ``shrinkage``, ``shrink_to``: see :func:`flashhead.index.build_index`.
    """
    weight = head_weight(model)
    sets, calibration, own = [], None, None
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be a number of positions >= 0 (0: none), got {samples!r}")
    if calibration_texts is not None:
        names = _listed(calibration_texts, str)
        sets = (calibration_sets(model, tokenizer, names, calibration_positions) if hidden_states is None
                else _listed(hidden_states, torch.Tensor))
        calibration = {"texts": names[: len(sets)], "positions": [int(x.shape[0]) for x in sets], "window": 256}
        if geometry_states is not None:
            own, calibration["samples"] = geometry_states, {"positions": int(geometry_states.shape[0])}
        elif samples and hidden_states is None:
            own, calibration["samples"] = sample_states(model, tokenizer, samples, seed=seed, progress=progress)
    return build_index(weight, cluster_size, hidden_states=sets[0] if sets else None, validation_states=sets[1:],
                       num_tokens=min(len(tokenizer), weight.shape[0]),
                       n_probes=n_probes, always_ids=eos_ids(model, tokenizer), iters=iters, seed=seed,
                       model_name=model_name, calibration=calibration, shrinkage=shrinkage,
                       shrink_to=shrink_to, geometry_states=own, progress=progress)


def _tied(model) -> bool:
    inp = model.get_input_embeddings()
    return inp is not None and inp.weight.data_ptr() == head_weight(model).data_ptr()


def _remap_ids(slot_of: torch.Tensor, module, args):
    return (slot_of[args[0]],) + tuple(args[1:])


def slot_map(index: FlashHeadIndex) -> torch.Tensor:
    """``[vocab_size]`` row of each token id in :func:`cluster_layout`'s storage: its slot ``k * cap + j``;
    rows past ``num_tokens`` (embedding padding) come after the ``K * cap`` slots, in order."""
    c = index.config
    k, cap = c.num_clusters, c.cluster_size
    slot_of = torch.empty(c.vocab_size, dtype=torch.long)
    filled = index.slot_token >= 0
    slot_of[index.slot_token[filled]] = torch.arange(k * cap).view(k, cap)[filled]
    slot_of[c.num_tokens:] = torch.arange(k * cap, k * cap + c.vocab_size - c.num_tokens)
    return slot_of


def cluster_layout(index: FlashHeadIndex, x: torch.Tensor) -> torch.Tensor:
    """A per-token tensor ``x [vocab_size, ...]`` (head rows, their int8 values or scales) in cluster order:
    ``[K * cap + padding rows, ...]``, zeros in empty slots; ``[: K * cap]`` views as ``[K, cap, ...]``."""
    c = index.config
    out = x.new_zeros(c.num_clusters * c.cluster_size + c.vocab_size - c.num_tokens, *x.shape[1:])
    return out.index_copy_(0, slot_map(index), x.detach())


class _Q8Embedding(torch.nn.Module):
    """The input embedding of a tied model whose head FlashHead reads as Q8_0 rows: it looks tokens up in
    those same int8 rows and scales (through the id -> slot map), dequantizes them (exact) and applies the
    original module's ``embed_scale`` when it has one (transformers' scaled word embeddings). :func:`apply`
    uses it only after checking that it gives the original module's output bit for bit."""

    def __init__(self, original: torch.nn.Module, rows: torch.Tensor, scales: torch.Tensor, slot_of: torch.Tensor,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = slot_of.numel(), rows.shape[1]
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("slot_of", slot_of, persistent=False)
        scale = getattr(original, "embed_scale", None)
        self.register_buffer("embed_scale", None if scale is None else scale.detach().clone(), persistent=False)
        self.out_dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slots = self.slot_of[input_ids]
        out = q8_0_dequantize(self.rows[slots], self.scales[slots], self.out_dtype)
        return out if self.embed_scale is None else out * self.embed_scale.to(self.out_dtype)


def _q8_embedding(model, rows: torch.Tensor, scales: torch.Tensor, slot_of: torch.Tensor) -> _Q8Embedding | None:
    """A :class:`_Q8Embedding` for ``model``'s input embedding, or None when it does not reproduce the original
    module's output bit for bit on ~1,000 ids spread over the vocabulary (an embedding that does more than a
    lookup times a scale)."""
    original = model.get_input_embeddings()
    if getattr(original, "max_norm", None) is not None:
        return None
    emb = _Q8Embedding(original, rows, scales, slot_of, original.weight.dtype)
    V = slot_of.numel()
    ids = torch.unique(torch.cat([torch.arange(0, V, max(1, V // 1024)), torch.tensor([V - 1])])).view(1, -1)
    with torch.no_grad():
        same = torch.equal(emb(ids), original(ids))
    return emb if same else None


def apply(model, index: FlashHeadIndex, *, n_probes: int | None = None, stage1: str | None = None,
          stage2: str | None = None, quantize_activations: bool = False) -> FlashHead:
    """Replace ``model``'s head by FlashHead, in place; returns the head. Undo with :func:`remove`.

    ``n_probes`` and ``stage1`` (centroid precision: ``"int8"``, ``"int4"`` or ``"float"``) default to
    the index's calibrated setting. ``stage2``: ``"q8_0"`` reads the head rows as int8 plus one fp16 scale
    per 32 weights (GGUF's Q8_0), which needs a head that is exactly that in fp32 (dequantized from a
    Q8_0 GGUF); ``"float"`` reads them in the model dtype; None (default): ``"q8_0"`` when the index
    records a Q8_0 head and this copy of it still is one, else ``"float"``. Either way the candidates'
    logits are the dense head's up to float rounding. ``quantize_activations`` (Q8_0 only): score as
    llama.cpp's Q8_0 head product does (:class:`FlashHead`).
    """
    if not isinstance(index, FlashHeadIndex):
        raise TypeError(f"index must be a FlashHeadIndex, got {type(index).__name__}; "
                        "load one with FlashHeadIndex.load(folder) or build one with build_for_model")
    if getattr(model, "_flashhead", None) is not None:
        raise ValueError("this model already uses FlashHead; call flashhead.remove(model) first")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("models with final_logit_softcapping are not supported: the soft cap would turn the -inf "
                         "logits outside the candidates into finite ones")
    if stage2 not in (None, "float", "q8_0"):
        raise ValueError(f"stage2 must be 'q8_0', 'float' or None (the index's, when this head allows), got {stage2!r}")
    weight = head_weight(model)
    index.check_weight(weight)
    q8 = q8_0_rows(weight) if stage2 == "q8_0" or (stage2 is None and index.config.stage2 == "q8_0") else None
    if q8 is None and stage2 == "q8_0":
        raise ValueError(f"stage2='q8_0' needs a head that is exactly Q8_0 (int8 times an fp16 scale per 32 weights, "
                         f"in fp32); this {weight.dtype} head is not: use stage2='float'")
    if quantize_activations and q8 is None:
        raise ValueError("quantize_activations needs Q8_0 rows (stage2='q8_0' and a Q8_0 head)")
    tied = _tied(model)
    c = index.config
    k, cap, d = c.num_clusters, c.cluster_size, c.hidden_size
    slot_of = slot_map(index)
    storage = scales = emb = None
    if q8 is not None:
        storage, scales = cluster_layout(index, q8[0]), cluster_layout(index, q8[1])
        del q8
        emb = _q8_embedding(model, storage, scales, slot_of) if tied else None
        if tied and emb is None:  # an embedding that is not a plain lookup: keep the float rows
            if stage2 == "q8_0":
                raise ValueError("stage2='q8_0' on a tied head needs an input embedding that is a plain lookup "
                                 "(times a scale); this one is not: use stage2='float'")
            storage = scales = None
    if storage is None:  # float rows in the model dtype: one storage, shared with a tied embedding
        storage = cluster_layout(index, weight)
    rows = storage[: k * cap].view(k, cap, d)
    head = FlashHead(rows, index.slot_token, index.centroids, out_features=c.vocab_size,
                     n_probes=c.n_probes if n_probes is None else n_probes,
                     always_ids=torch.tensor(c.always_ids, dtype=torch.long),
                     stage1=c.stage1 if stage1 is None else stage1,
                     row_scales=None if scales is None else scales[: k * cap].view(k, cap, -1),
                     quantize_activations=quantize_activations, padding_rows=storage[k * cap:],
                     padding_scales=None if scales is None else scales[k * cap:])
    head.exact = True  # scoring forwards stay exact; generate() and decoding() switch to FlashHead
    original = model.get_output_embeddings()
    state = {"head": head, "index": index, "original": original, "tied": tied, "slot_of": slot_of,
             "storage": storage, "scales": scales, "dtype": weight.dtype, "hook": None, "embedding": None}
    del original.weight  # drop the dense copy: FlashHead's storage now holds these rows
    model.set_output_embeddings(head)
    if tied and scales is not None:  # the int8 rows serve the embedding too: no float copy stays
        state["embedding"] = model.get_input_embeddings()
        del state["embedding"].weight
        model.set_input_embeddings(emb)
    elif tied:
        inp = model.get_input_embeddings()
        inp.weight = torch.nn.Parameter(storage, requires_grad=False)
        state["hook"] = inp.register_forward_pre_hook(functools.partial(_remap_ids, slot_of))
    model._flashhead = state
    model.generate = functools.partial(_generate, model)
    model.save_pretrained = functools.partial(save_pretrained, model)
    return head


def _float_rows(state: dict, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """Storage rows in the model dtype: the float storage itself, or the Q8_0 rows dequantized (exact)."""
    if state["scales"] is None:
        return state["storage"][rows]
    return q8_0_dequantize(state["storage"][rows], state["scales"][rows], state["dtype"])


def remove(model) -> None:
    """Restore the dense head (and tied embedding) exactly as they were before :func:`apply`."""
    state = getattr(model, "_flashhead", None)
    if state is None:
        raise ValueError("this model does not use FlashHead (nothing to remove)")
    weight = torch.nn.Parameter(_float_rows(state, state["slot_of"]), requires_grad=False)
    original = state["original"]
    original.weight = weight
    model.set_output_embeddings(original)
    if state["embedding"] is not None:
        state["embedding"].weight = weight
        model.set_input_embeddings(state["embedding"])
    elif state["tied"]:
        state["hook"].remove()
        model.get_input_embeddings().weight = weight
    for attr in ("generate", "save_pretrained"):
        model.__dict__.pop(attr, None)
    model._flashhead = None


def flashhead_of(model) -> FlashHead | None:
    """The FlashHead applied to ``model``, or None."""
    state = getattr(model, "_flashhead", None)
    return None if state is None else state["head"]


def dense_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Exact dense logits [..., V] (float32) of ``model``'s head, whether FlashHead is applied or not.

    The reference every fidelity figure is measured against; no second copy of the head is kept
    (:meth:`FlashHead.dense_logits`).
    """
    state = getattr(model, "_flashhead", None)
    if state is None:
        return (hidden.to(head_weight(model).dtype) @ head_weight(model).T).float()
    return state["head"].dense_logits(hidden.to(state["dtype"])).float()


@contextlib.contextmanager
def decoding(model):
    """Within it, forwards of ``model`` use FlashHead (candidates' logits, -inf elsewhere), as ``generate()`` does:
    for decode loops of one's own. Outside it a forward returns the dense head's exact logits."""
    head = flashhead_of(model)
    if head is None:
        raise ValueError("this model does not use FlashHead; call flashhead.integrations.transformers.apply first")
    before, head.exact = head.exact, False
    try:
        yield head
    finally:
        head.exact = before


def _generate(model, *args, **kwargs):
    """``generate()`` with FlashHead decoding, told whether, and at which temperature, this call samples."""
    head = flashhead_of(model)
    config = kwargs.get("generation_config") or model.generation_config
    do_sample = kwargs.get("do_sample", config.do_sample)
    temperature = kwargs.get("temperature", config.temperature)
    top_p = kwargs.get("top_p", config.top_p)
    if do_sample and top_p is not None and not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1.0 or None = no nucleus cut), got {top_p!r}")
    head.temperature = float(temperature if temperature is not None else 1.0) if do_sample else None
    try:
        with decoding(model):
            return type(model).generate(model, *args, **kwargs)
    finally:
        head.temperature = None


def save_pretrained(model, folder: str | Path, **kwargs) -> None:
    """Save the model's original weights and, in ``folder/flashhead``, its FlashHead assets."""
    state = model._flashhead
    head, index = state["head"], state["index"]
    setting = dict(n_probes=head.n_probes, stage1=head.stage1, stage2="float" if state["scales"] is None else "q8_0",
                   quantize_activations=head.quantize_activations)
    remove(model)
    try:
        model.save_pretrained(folder, **kwargs)
        index.save(Path(folder) / ASSETS_SUBDIR)
    finally:
        apply(model, index, **setting)


def from_pretrained(folder: str | Path, dtype: torch.dtype | str = torch.float32, **apply_kwargs):
    """Load a model saved by :func:`save_pretrained` (or any model folder) and apply its FlashHead assets."""
    from ..models import load_model

    model, tokenizer = load_model(folder, dtype=dtype, verbose=False)
    assets = Path(folder) / ASSETS_SUBDIR
    if assets.is_dir():
        apply(model, FlashHeadIndex.load(assets), **apply_kwargs)
    return model, tokenizer
