"""The knobs of one benchmark run. Their own module: the parts of a run (model, peers, memory, vLLM) take the
settings and the suite imports those parts, so neither imports the other back."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Settings"]


@dataclass
class Settings:
    """The knobs of one run (all recorded in the report's ``settings``)."""

    threads: int = 2
    batches: tuple[int, ...] = (1, 4, 16, 64)
    repeats: int = 15  # timed rounds per head configuration and batch
    warmup: int = 2
    states: int = 2048  # real hidden states in the pool
    probe_factors: tuple[float, ...] = (0.25, 0.5, 2.0, 4.0)  # extra probe counts (default stage 1), x default
    stage1_modes: tuple[str, ...] = ("int8", "int4", "float")
    model_batches: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 32
    new_tokens: int = 128
    model_repeats: int = 5
    model_flash_modes: tuple[str, ...] = ()  # stage-1 modes at model level; () = the index's default
    hnsw_m: int = 16
    hnsw_spaces: tuple[str, ...] = ("ip", "l2")  # "l2" = on MIPS-augmented rows (the standard reduction)
    hnsw_ef_construction: int = 100
    ivf_niter: int = 10
    tune_queries: int = 48
    memory: bool = True
    peers: bool = True
    quick: bool = False
    wait_quiet: float = 0.0  # seconds to wait at most for other processes to leave the CPUs idle
    index: str | None = None  # assets folder to measure; None = the model's default index (cache)

    @classmethod
    def for_mode(cls, quick: bool, threads: int = 2) -> Settings:
        """The full run's settings, or the quick run's (smoke tests, not numbers)."""
        if not quick:
            return cls(threads=threads)
        return cls(threads=threads, batches=(1, 16), repeats=5, warmup=1, states=256, probe_factors=(0.5, 2.0),
                   model_batches=(1, 8), new_tokens=32, model_repeats=2, hnsw_ef_construction=48, ivf_niter=4,
                   hnsw_spaces=("ip",),
                   tune_queries=16, memory=True, quick=True)
