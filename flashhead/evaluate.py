"""Fidelity of FlashHead against the model's own dense fp32 head, on real text.

For each setting (probe count, stage-1 precision) :func:`evaluate` reports what it costs (rows and
bytes read per step, as a fraction of the dense head) and what it changes:

- top-1 containment: the dense argmax is among the candidates;
- greedy agreement per position: FlashHead's token equals the dense argmax;
- greedy continuations of prompts cut from the text: identical tokens over ``new_tokens`` and the
  mean length of the identical prefix (errors compound here, unlike per-position agreement);
- next-token accuracy against the real text, dense vs FlashHead;
- sampling: total variation and KL(FlashHead || dense) between the distribution FlashHead samples
  from and the dense softmax at T = 0.7 and 1.0, computed exactly per position (no Monte Carlo):
  FlashHead's sampling distribution is the exact softmax over its candidates plus, for every
  unprobed cluster, its estimated mass spread over its tokens by their exact softmax
  (:meth:`FlashHead.tail_log_mass`; the tail cluster drawn at each step realises exactly this).
  The report gives the mean over positions and its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .head import FlashHead
from .index import FlashHeadIndex
from .integrations.transformers import apply, dense_logits, flashhead_of, remove, text_states

TEMPERATURES = (0.7, 1.0)


@dataclass(frozen=True)
class EvalConfig:
    positions: int = 4096  # teacher-forced positions for containment, agreement, accuracy
    prompts: int = 100  # greedy continuations
    prompt_tokens: int = 32
    new_tokens: int = 64
    tv_positions: int = 256  # positions for TV / KL


def _continuation_prompts(tokenizer, ids: list[int], n: int, length: int) -> torch.Tensor:
    """``n`` prompts of exactly ``length`` tokens, cut evenly from ``ids`` (no padding needed)."""
    prefix = tokenizer("", add_special_tokens=True).input_ids
    body = length - len(prefix)
    step = max(body, (len(ids) - body) // max(n, 1))
    starts = [i * step for i in range(n) if i * step + body <= len(ids)]
    if len(starts) < n:
        raise ValueError(f"text too short for {n} prompts of {length} tokens")
    return torch.tensor([prefix + ids[s:s + body] for s in starts])


def _continue(model, prompts: torch.Tensor, new_tokens: int, batch: int = 50) -> torch.Tensor:
    outs = [torch.empty(0, new_tokens, dtype=torch.long)]  # no prompts: no continuations
    with torch.inference_mode():
        for i in range(0, prompts.shape[0], batch):
            p = prompts[i:i + batch]
            out = model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=model.generation_config.pad_token_id or 0)
            outs.append(out[:, p.shape[1]:])
    return torch.cat(outs)


@torch.no_grad()
def sampling_distribution(head: FlashHead, h: torch.Tensor, dense: torch.Tensor, temperature: float) -> torch.Tensor:
    """FlashHead's exact sampling distribution ``[N, V]`` at ``temperature`` (no top-k/top-p), built
    from the dense logits ``[N, V]`` of the same states: candidates exact, each unprobed cluster's
    estimated mass spread over its tokens (always-scored ids keep their exact logits)."""
    clusters, mass = head.tail_log_mass(h, temperature)
    z = dense.float() / temperature
    if mass is None:
        return z.softmax(-1)
    slot_token = head.slot_token  # [K, cap]
    real = slot_token >= 0
    zs = z[:, slot_token.clamp_min(0)].masked_fill(~real, -math.inf)  # [N, K, cap]
    tail = torch.ones_like(mass, dtype=torch.bool).scatter_(1, clusters, False)  # [N, K]
    always = torch.isin(slot_token, head.always_ids) & real  # [K, cap]
    member = tail.unsqueeze(-1) & ~always  # tail tokens whose mass comes from the estimate
    own = zs.masked_fill(~member, -math.inf).logsumexp(-1, keepdim=True)  # [N, K, 1]
    spread = zs - own + mass.unsqueeze(-1)  # estimated log mass per tail token
    lq = torch.where(member, spread, zs)
    q = lq.flatten(1).softmax(-1)
    out = torch.zeros_like(z)
    out[:, slot_token[real]] = q[:, real.flatten()]
    return out


@torch.no_grad()
def _sampling_divergence(head: FlashHead, h: torch.Tensor, dense: torch.Tensor, temperature: float) -> dict:
    """Mean TV and KL(FlashHead || dense) at one temperature over the positions, exact per position."""
    tvs, kls = [], []
    for a in range(0, h.shape[0], 32):
        q = sampling_distribution(head, h[a:a + 32], dense[a:a + 32], temperature)
        lp = torch.log_softmax(dense[a:a + 32].float() / temperature, -1)
        tvs.append(0.5 * (q - lp.exp()).abs().sum(1))
        kls.append(torch.where(q > 0, q * (q.clamp_min(1e-45).log() - lp), 0.0).sum(1))
    tv, kl = torch.cat(tvs), torch.cat(kls)
    n = math.sqrt(len(tv))
    return {"tv": float(tv.mean()), "tv_stderr": float(tv.std() / n), "kl": float(kl.mean()),
            "kl_stderr": float(kl.std() / n)}


def encoding_loss(tokenizer, text: str, chars: int = 20_000) -> float:
    """The share of ``text``'s first ``chars`` characters that the tokenizer does not give back after encoding
    and decoding (unknown-token pieces): a model whose tokenizer loses a script cannot be measured on it."""
    from collections import Counter

    sample = text[:chars]
    back = tokenizer.decode(tokenizer(sample, add_special_tokens=False).input_ids, skip_special_tokens=True)
    if back == sample:
        return 0.0
    have, got = Counter(sample), Counter(back)
    return 1 - sum(min(n, got[c]) for c, n in have.items()) / max(len(sample), 1)


def chat_text(tokenizer, text: str) -> str:
    """``text`` as a chat: consecutive paragraphs (blank-line separated) become user and assistant turns
    in turn, rendered with the tokenizer's own chat template (what a chat model sees in use)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template, so --chat cannot wrap the text; "
                         "measure the plain text (drop --chat)")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(paragraphs) < 2:
        raise ValueError("--chat needs at least two paragraphs separated by a blank line (one user turn, one "
                         f"assistant turn); this text has {len(paragraphs)}")
    turns = [{"role": ("user", "assistant")[i % 2], "content": p} for i, p in enumerate(paragraphs)]
    return tokenizer.apply_chat_template(turns, tokenize=False)


@torch.no_grad()
def evaluate(model, tokenizer, index: FlashHeadIndex, text: str, probes: list[int], *, stage1: str | None = None,
             config: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
    """Fidelity and cost of FlashHead at each probe count on ``text``, against the dense head
    (``stage1`` default: the index's)."""
    from tqdm.auto import tqdm

    if any(not 1 <= p <= index.num_clusters for p in probes):
        raise ValueError(f"probe counts must be in 1..{index.num_clusters}, got {probes}")
    was = flashhead_of(model)
    if was is not None:
        remove(model)
    states, targets = text_states(model, tokenizer, text, config.positions)
    if states.shape[0] < config.positions:
        raise ValueError(f"the text gives only {states.shape[0]} of the {config.positions} positions asked for; "
                         "use a longer text or ask for fewer positions (--positions)")
    dense = dense_logits(model, states)
    dense_top = dense.argmax(-1)
    dense_acc = float((dense_top == targets).float().mean())
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prompts = _continuation_prompts(tokenizer, ids, config.prompts, config.prompt_tokens)
    if progress and config.prompts:
        print(f"dense continuations of {config.prompts} prompts ...", flush=True)
    dense_cont = _continue(model, prompts, config.new_tokens)
    weight_bytes = dense.shape[1] * states.shape[1] * model.get_output_embeddings().weight.element_size()
    tv_idx = torch.linspace(0, states.shape[0] - 1, config.tv_positions).long()
    results = []
    cluster_of = torch.full((dense.shape[1],), -1, dtype=torch.long)  # token -> cluster
    real = index.slot_token >= 0
    cluster_of[index.slot_token[real]] = torch.arange(index.num_clusters).unsqueeze(1).expand_as(real)[real]
    # The vLLM plugin ranks clusters by h against column-normalized centroids instead of h . c.
    vllm_rank = (states @ torch.nn.functional.normalize(index.centroids, dim=1).T).argsort(1, descending=True)
    head = apply(model, index, stage1=stage1)
    try:
        for p in tqdm(probes, desc="settings", disable=not progress):
            head.n_probes = p
            clusters = head.select_clusters(states)
            cand, _ = head.candidates(states, clusters)
            contained = (cand == dense_top.unsqueeze(1)).any(1)
            fast_top = torch.cat([head.greedy(states[i:i + 512]) for i in range(0, states.shape[0], 512)])
            cont = _continue(model, prompts, config.new_tokens)
            same = cont == dense_cont
            prefix = torch.where(same.all(1), same.shape[1], (~same).float().argmax(1)).float()
            in_vllm = (vllm_rank[:, :p] == cluster_of[dense_top].unsqueeze(1)).any(1) | torch.isin(
                dense_top, torch.tensor(index.config.always_ids, dtype=torch.long))
            rows = index.num_clusters + p * index.cluster_size + len(index.config.always_ids)
            row = {
                "n_probes": p, "stage1": head.stage1, "rows_per_step": rows, "rows_fraction": rows / dense.shape[1],
                "bytes_per_step": head.nbytes_per_step(p), "bytes_fraction": head.nbytes_per_step(p) / weight_bytes,
                "containment": float(contained.float().mean()),
                "containment_vllm_rule": float(in_vllm.float().mean()),
                "agreement": float((fast_top == dense_top).float().mean()),
                "next_token_accuracy": float((fast_top == targets).float().mean()),
                "continuation_identical_fraction": float(same.float().mean()) if config.prompts else None,
                "continuation_mean_identical_prefix": float(prefix.mean()) if config.prompts else None,
            }
            for t in TEMPERATURES:
                div = _sampling_divergence(head, states[tv_idx], dense[tv_idx], t)
                row.update({f"{k}_t{t}": v for k, v in div.items()})
            results.append(row)
    finally:
        remove(model)
        if was is not None:
            apply(model, index, n_probes=was.n_probes, stage1=was.stage1)
    return {"positions": int(states.shape[0]), "prompts": config.prompts, "new_tokens": config.new_tokens,
            "tv_positions": config.tv_positions, "num_clusters": index.num_clusters,
            "cluster_size": index.cluster_size, "default_n_probes": index.config.n_probes,
            "default_stage1": index.config.stage1,
            "dense": {"next_token_accuracy": dense_acc, "bytes_per_step": weight_bytes}, "settings": results}


def plot(report: dict, path: str, title: str = "") -> None:
    """Agreement and containment (left axis) and bytes read (right axis) against the probe count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["settings"]
    p = [r["n_probes"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(p, [100 * r["agreement"] for r in rows], "o-", label="greedy agreement per position")
    ax.plot(p, [100 * r["containment"] for r in rows], "s--", label="top-1 containment")
    ax.plot(p, [100 * r["continuation_identical_fraction"] for r in rows], "^:", label="identical continuation tokens")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("probed clusters p")
    ax.set_ylabel("% of dense head")
    ax2 = ax.twinx()
    ax2.plot(p, [100 * r["bytes_fraction"] for r in rows], "k.-", alpha=0.5, label="bytes read per step")
    ax2.set_ylabel("bytes read, % of dense head")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower right", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
