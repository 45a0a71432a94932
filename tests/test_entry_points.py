"""The error boundary of the entry points: a UserError is one ``error:`` line and exit 2; any
other exception is an internal error and keeps its traceback."""

from __future__ import annotations

import importlib.util
import os

import pytest

from megatron_gad import convert
from megatron_gad.hf_io import ConversionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALID = ["data.train_files=/d/train.parquet", "actor_rollout_ref.model.path=/m/student", "actor_rollout_ref.rollout.n=4"]


def _pretrain_gad():
    spec = importlib.util.spec_from_file_location("pretrain_gad", os.path.join(REPO, "examples", "pretrain_gad.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fail(exc: Exception):
    def raiser(*_args, **_kwargs):
        raise exc
    return raiser


def test_converter_cli_boundary(capsys) -> None:
    assert convert.run_cli(_fail(ConversionError("bad --hf-dir")), lambda: 0) == 2
    assert capsys.readouterr().err.strip() == "error: bad --hf-dir"
    with pytest.raises(ValueError, match="internal shape bug"):  # not a user error: the traceback stays
        convert.run_cli(_fail(ValueError("internal shape bug")), lambda: 0)


def test_training_entry_point_boundary(tmp_path, capsys, monkeypatch) -> None:
    import megatron_gad.trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    main = _pretrain_gad().main
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {total_epochs: 0}\n")
    assert main(["--config", str(bad), *VALID]) == 2  # a ConfigError, before anything runs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "trainer.total_epochs must be >= 1" in err[0]
    ok = tmp_path / "ok.yaml"
    ok.write_text("{}\n")
    # the trainer is replaced here only to raise from inside the boundary
    monkeypatch.setattr(megatron_gad.trainer, "run", _fail(ValueError("internal shape bug")))
    with pytest.raises(ValueError, match="internal shape bug"):
        main(["--config", str(ok), *VALID])
    monkeypatch.setattr(megatron_gad.trainer, "run", _fail(megatron_gad.trainer.TrainingStopped("3 steps non-finite")))
    assert main(["--config", str(ok), *VALID]) == 2
    assert capsys.readouterr().err.strip().endswith("error: 3 steps non-finite")
