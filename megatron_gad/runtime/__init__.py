"""Process groups, Megatron parallel state, seeding, and the CPU adaptations of megatron-core."""

from megatron_gad.runtime.distributed import (
    ParallelInfo,
    destroy_distributed,
    device,
    init_distributed,
    parallel_info,
    set_seed,
)

__all__ = [
    "ParallelInfo",
    "destroy_distributed",
    "device",
    "init_distributed",
    "parallel_info",
    "set_seed",
]
