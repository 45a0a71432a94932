"""The run's two sampling streams: training rollouts and validation samples never share a seed."""

from __future__ import annotations

from megatron_gad.seeds import prompt_seeds, rollout_seed, validation_seed


def test_validation_samples_have_a_stream_of_their_own() -> None:
    # the pass after step k once sampled with step k's rollout seed, the next training step's
    seeds = {rollout_seed(run, step, dp) for run in (0, 1, 7, 10**9) for step in range(200) for dp in range(8)}
    val = [validation_seed(run, step, batch, dp) for run in (0, 1, 7, 10**9) for step in range(200)
           for batch in range(3) for dp in range(8)]
    assert len(set(val)) == len(val)  # every (run, step, batch, DP rank) its own stream
    assert not seeds & set(val)
    assert max(seeds) < 2**61 <= min(val) and max(val) < 2**63
    assert validation_seed(1, 6, 0, 0) == validation_seed(1, 6, 0, 0)  # a pure function: resumes sample alike


def test_prompt_seeds_give_every_sample_of_every_call_its_own_stream() -> None:
    """vLLM seeds prompt i's request with prompt_seeds(seed, B)[i] and its j-th sample with + j:
    over the calls of 4 DP ranks x 50 steps x 2 runs (16 prompts x 8 samples each), no two samples
    share a seed. With seed + i * n, DP rank 1's prompt i took rank 0's stream of prompt i shifted
    by one sample."""
    n, prompts = 8, 16
    samples = [s + j for run in (0, 1) for step in range(50) for dp in range(4)
               for s in prompt_seeds(rollout_seed(run, step, dp), prompts) for j in range(n)]
    assert len(set(samples)) == len(samples) and max(samples) < 2**63
    assert prompt_seeds(5, 3) == prompt_seeds(5, 3) and prompt_seeds(5, 4)[:3] == prompt_seeds(5, 3)
    old = [rollout_seed(0, 0, dp) + i * n + j for dp in (0, 1) for i in range(prompts) for j in range(n)]
    assert len(set(old)) < len(old)  # what the old scheme did
