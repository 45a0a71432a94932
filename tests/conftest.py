"""Shared pytest configuration: GPU tests skip without CUDA; the demo assets fixture. (pytest.ini's
``pythonpath`` puts the repository on ``sys.path``, so test files import ``tests.helpers``.)"""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The demo task's assets (models, tokenizer, parquet files), generated once per test module."""
    from megatron_gad.data.demo import ensure_demo_assets

    return ensure_demo_assets(tmp_path_factory.mktemp("demo") / "assets")
