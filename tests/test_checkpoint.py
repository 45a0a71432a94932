"""Training checkpoints: model + optimizer state resume exactly; the latest marker is atomic."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from megatron_gad.checkpoint import (
    LATEST_FILE,
    CheckpointError,
    clean_incomplete,
    load_training_checkpoint,
    resolve_resume,
    save_training_checkpoint,
)
from megatron_gad.runtime.spawn import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _setup():
    from transformers import LlamaConfig

    from megatron_gad.models import model_args_from_hf, transformer_config_from_hf
    from megatron_gad.models.actor import build_actor
    from megatron_gad.models.build import OptimConfig, build_model, build_optimizer
    from megatron_gad.runtime import parallel_info

    info = parallel_info()
    hf = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cfg = transformer_config_from_hf(hf, tp=info.tp, pp=info.pp)
    chunks = build_model(lambda pre, post: build_actor(cfg, model_args_from_hf(hf), pre, post), cfg)
    return chunks, build_optimizer(chunks, OptimConfig(lr=1e-2), cfg)


def _step(chunks, optimizer, seed: int) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gad.models.inputs import attention_mask_4d, position_ids_from_mask

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)

    def forward_step(it, model):
        out = model(input_ids=next(it), position_ids=position_ids_from_mask(mask), attention_mask=attention_mask_4d(mask))
        return out, lambda o: ((o.float() ** 2).mean(), {})

    optimizer.zero_grad()
    for c in chunks:
        c.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids]), model=chunks,
                                num_microbatches=1, seq_length=8, micro_batch_size=2, forward_only=False)
    optimizer.step()


def _params(chunks) -> dict:
    from megatron_gad.models.sharding import full_tensors

    return dict(full_tensors(chunks[0]))


def _train_and_save(root: str) -> dict:
    chunks, opt = _setup()
    _step(chunks, opt, seed=1)
    save_training_checkpoint(root, 1, {"actor": (chunks, opt)}, {"step": 1, "data": {"epoch": 0, "pos": 4}})
    _step(chunks, opt, seed=2)
    return _params(chunks)


def _resume_and_continue(root: str) -> tuple[dict, dict]:
    chunks, opt = _setup()
    state = load_training_checkpoint(resolve_resume(root, "auto"), {"actor": (chunks, opt)})
    _step(chunks, opt, seed=2)
    return state, _params(chunks)


@pytest.mark.parametrize("tp,world", [(1, 1), (2, 2)])
def test_resume_continues_identically(tmp_path, tp: int, world: int) -> None:
    root = str(tmp_path)
    expected = run_distributed(_train_and_save, world, tp=tp, args=(root,))[0]
    assert open(os.path.join(root, LATEST_FILE)).read() == "1"
    state, got = run_distributed(_resume_and_continue, world, tp=tp, args=(root,))[0]
    assert state == {"step": 1, "data": {"epoch": 0, "pos": 4}}
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_model_only_resume_would_differ(tmp_path) -> None:
    """Without the optimizer state (Adam moments), the continued step is different: the test above
    therefore really checks that optimizer state is restored."""
    root = str(tmp_path)
    expected = run_distributed(_train_and_save, 1, args=(root,))[0]

    def model_only():
        chunks, opt = _setup()
        load_training_checkpoint(resolve_resume(root, "auto"), {"actor": (chunks, None)})
        _step(chunks, opt, seed=2)
        return _params(chunks)

    got = run_distributed(model_only, 1)[0]
    assert any(not torch.equal(expected[n], got[n]) for n in expected)


def test_incomplete_save_is_ignored_and_cleaned(tmp_path) -> None:
    root = str(tmp_path)
    run_distributed(_train_and_save, 1, args=(root,))
    os.makedirs(os.path.join(root, "global_step_2.tmp", "actor"))  # a save killed half-way
    assert resolve_resume(root, "auto").endswith("global_step_1")
    assert clean_incomplete(root) == [os.path.join(root, "global_step_2.tmp")]
    assert resolve_resume(root, "disable") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(root, os.path.join(root, "global_step_7"))


def test_a_step_saved_again_survives_a_kill_at_every_point(tmp_path) -> None:
    """Saving a step that already exists moves the old directory aside; whichever rename a kill
    interrupts, clean_incomplete leaves a complete checkpoint where the marker points."""
    from megatron_gad.io import replace_dir

    root = str(tmp_path)
    run_distributed(_train_and_save, 1, args=(root,))
    final = resolve_resume(root, "auto")
    files = sorted(os.listdir(final))

    # killed after moving the old directory aside, before the new one took its place
    os.makedirs(final + ".tmp")
    os.rename(final, final + ".old")
    assert sorted(clean_incomplete(root)) == [final + ".tmp"]
    assert resolve_resume(root, "auto") == final and sorted(os.listdir(final)) == files

    # killed after the new directory took its place, before the old one was removed
    shutil.copytree(final, final + ".old")
    assert clean_incomplete(root) == [final + ".old"]
    assert sorted(os.listdir(final)) == files

    # an uninterrupted re-publish replaces the directory and leaves nothing beside it
    shutil.copytree(final, final + ".tmp")
    open(os.path.join(final + ".tmp", "marker-of-new"), "w").close()
    replace_dir(final + ".tmp", final)
    assert "marker-of-new" in os.listdir(final)
    assert sorted(d for d in os.listdir(root) if d.startswith("global_step_")) == [os.path.basename(final)]
