"""The sampling seeds of a run: one stream for the training rollouts, one for validation's samples.

Both are pure functions of ``trainer.seed``, the step and the data-parallel rank (and, for
validation, the batch index), so a resumed run draws what an uninterrupted one draws. The two
ranges never meet: a training seed is below ``2^61`` (for any ``trainer.seed`` below about
2.3e12), a validation seed in ``[2^61, 2^61 + 2^60)``. An engine that seeds each prompt of a call
separately (vLLM) derives the prompts' seeds from the call's with :func:`prompt_seeds`.
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


def prompt_seeds(seed: int, prompts: int) -> list[int]:
    """Per-prompt seeds of one ``generate`` call seeded with ``seed``, for an engine that seeds
    each prompt's request itself and its ``j``-th sample with ``+ j`` (vLLM): a hash of the call's
    seed and the prompt's index, below ``2^62``. Calls whose seeds are close (the DP ranks of a
    step, consecutive steps) get unrelated streams; with ``seed + i * n`` instead, DP rank 1's
    prompt i drew rank 0's prompt i stream shifted by one sample."""
    out = []
    for i in range(prompts):
        digest = hashlib.blake2b(f"prompt/{seed}/{i}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") >> 2)
    return out
