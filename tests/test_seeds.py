"""The run's two sampling streams: training rollouts and validation samples never share a seed."""

from __future__ import annotations

from megatron_gad.seeds import rollout_seed, validation_seed


def test_validation_samples_have_a_stream_of_their_own() -> None:
    # the pass after step k once sampled with step k's rollout seed, the next training step's
    seeds = {rollout_seed(run, step, dp) for run in (0, 1, 7, 10**9) for step in range(200) for dp in range(8)}
    val = [validation_seed(run, step, batch, dp) for run in (0, 1, 7, 10**9) for step in range(200)
           for batch in range(3) for dp in range(8)]
    assert len(set(val)) == len(val)  # every (run, step, batch, DP rank) its own stream
    assert not seeds & set(val)
    # vLLM seeds prompt i of a batch with seed + i * n: the ranges stay apart and below 2^63
    assert max(seeds) < 2**61 <= min(val) and max(val) + 10**9 < 2**63
    assert validation_seed(1, 6, 0, 0) == validation_seed(1, 6, 0, 0)  # a pure function: resumes sample alike
