"""The sampling seeds of a run: one stream for the training rollouts, one for validation's samples.

Both are pure functions of ``trainer.seed``, the step and the data-parallel rank, so a resumed run
draws what an uninterrupted one draws. The two ranges never meet: a training seed is below
``2^61`` (for any ``trainer.seed`` below about 2.3e12), a validation seed in ``[2^61, 2^61 + 2^60)``,
leaving room below ``2^63`` for an engine's per-prompt offsets (vLLM adds ``i * n`` for prompt i).
Called on a replica's rollout rank before each ``generate``.
"""

from __future__ import annotations

import hashlib

# A step's rollout: trainer.seed * _SEED_PER_RUN + step * _SEED_PER_STEP + DP rank. Distinct (step, DP
# rank) pairs get distinct seeds while DP <= _SEED_PER_STEP, and runs of different trainer.seed share
# none while step * _SEED_PER_STEP + DP < _SEED_PER_RUN (~9900 steps).
_SEED_PER_RUN = 1_000_003
_SEED_PER_STEP = 101
_VALIDATION_STREAM = 1 << 61


def rollout_seed(run_seed: int, step: int, dp_rank: int) -> int:
    """The sampling seed of the training rollout of the 0-based ``step`` on data-parallel rank
    ``dp_rank``."""
    return run_seed * _SEED_PER_RUN + step * _SEED_PER_STEP + dp_rank


def validation_seed(run_seed: int, step: int, batch: int, dp_rank: int) -> int:
    """The sampling seed of validation batch ``batch`` (0-based) of the pass after ``step`` on
    data-parallel rank ``dp_rank``: a hash of the tag ``validation`` and these numbers, so that
    batches, ranks and steps get unrelated streams, none shared with a training rollout (the
    pass after step k used to sample with the seed of step k+1's rollout)."""
    text = f"validation/{run_seed}/{step}/{batch}/{dp_rank}".encode()
    digest = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
    return _VALIDATION_STREAM + (digest >> 4)
