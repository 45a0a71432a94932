"""Quiet by default: the known third-party notices an entry point hides, and when progress bars
are drawn. The one place that decides both (entry points call :func:`quiet_third_party`).

Hidden: megatron-core's "Transformer Engine / Apex not installed" fallback notices on machines
without CUDA (neither can exist there; they stay visible on GPU machines), megatron-core's
"full scope is deprecated" notice for the default ``cuda_graph_scope``, ``FutureWarning`` and
``DeprecationWarning`` raised from inside megatron-core, transformers and torch (about their own
APIs, not ours), and transformers' info/warning log lines. ``MEGATRON_GAD_VERBOSE=1`` keeps all.
"""

from __future__ import annotations

import os
import sys
import warnings

_THIRD_PARTY = r"(megatron|transformers|torch|apex|transformer_engine)(\.|$)"


def quiet_third_party() -> None:
    """Install the warning filters above in this process (idempotent)."""
    if os.environ.get("MEGATRON_GAD_VERBOSE") == "1":
        return
    import torch

    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)
    # megatron-core 0.16.1 warns at every TransformerConfig whose cuda_graph_scope keeps its default
    warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning, module=_THIRD_PARTY)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_THIRD_PARTY)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def progress_enabled(rank: int = 0) -> bool:
    """Draw a progress bar only on rank 0 and only when stderr is a terminal (never into logs)."""
    return rank == 0 and sys.stderr.isatty()
