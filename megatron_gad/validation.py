"""What a validation pass measures on the held-out prompts, and how its sums become metrics.

:meth:`megatron_gad.trainer.Trainer.validate` drives the rollouts and the teacher-forced passes
(it owns the engines); the counting and the arithmetic live here. Every quantity is a sum over
rows or tokens, reduced over data parallelism once at the end, so a metric does not depend on how
the prompts are split over replicas or batches:

- ``val/reward``: the mean reward-function score of the greedy responses;
- ``val/teacher_exact_match``: the share of greedy responses identical to the teacher's (GAD data);
- ``val/teacher_token_agreement``: teacher response tokens the greedy response reproduces at the
  same position, over all teacher response tokens (GAD data);
- ``val/teacher_log_prob``: the actor's log-probability (temperature 1) per teacher response token,
  with ``trainer.teacher_forced_validation`` (GAD data);
- ``val/checker_<check>`` and ``val/checker_<check>_sampled``: on the demo tasks, the share of
  greedy responses, and of one sample per prompt at the rollout temperature, that pass each of
  :data:`CHECKS` (:func:`megatron_gad.data.demo.check_response`). The samples are drawn from a
  stream of their own (:func:`megatron_gad.seeds.validation_seed`), not the training rollouts'.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
from torch import Tensor

from megatron_gad.data.batch import PromptBatch
from megatron_gad.data.demo import check_response
from megatron_gad.engine import SequenceBatch

#: The demo checker's verdicts, in the order :func:`check_response` returns them.
CHECKS = ("one_style", "valid", "correct")

#: The row and token sums of a validation pass, in their reduction order.
SUMS = ("reward", "exact", "matched_tokens", "teacher_tokens", "rows", "teacher_log_prob")


def token_agreement(student: SequenceBatch, batch: PromptBatch) -> tuple[float, float]:
    """(teacher response tokens the student reproduced at the same position, teacher response
    tokens): a graded measure of agreement with the teacher on held-out prompts."""
    teacher, teacher_mask = batch.teacher_response_ids, batch.teacher_response_mask.bool()
    width = min(teacher.shape[1], student.responses.shape[1])
    same = (student.responses[:, :width] == teacher[:, :width]) & student.response_mask[:, :width].bool()
    return float((same & teacher_mask[:, :width]).sum()), float(teacher_mask.sum())


def checker_counts(batch: PromptBatch, texts: list[str]) -> Tensor:
    """Counts of :data:`CHECKS` passed, then of rows checked, by the demo tasks' checker over the
    responses ``texts`` to ``batch``; rows of other data are not checked."""
    out = torch.zeros(len(CHECKS) + 1, dtype=torch.float64)
    for source, text, info in zip(batch.data_source, texts, batch.extra_infos()):
        verdict = check_response(source, text, info["a"], info["b"]) if info and "a" in info else None
        if verdict is not None:
            out += torch.tensor([*map(float, verdict), 1.0], dtype=torch.float64)
    return out


class ValidationSums:
    """The sums of one validation pass on this rank: :data:`SUMS`, and the checker counts of the
    greedy and of the sampled responses (each :data:`CHECKS`, then the rows checked)."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64)
        self.checks = torch.zeros(2 * (len(CHECKS) + 1), dtype=torch.float64)  # greedy, then sampled

    def add(self, name: str, value: float) -> None:
        self.sums[SUMS.index(name)] += value

    def add_checks(self, batch: PromptBatch, texts: list[str], sampled: bool) -> None:
        start = len(CHECKS) + 1 if sampled else 0
        self.checks[start:start + len(CHECKS) + 1] += checker_counts(batch, texts)

    def metrics(self, dp_sum: Callable[[Tensor], Tensor], gad: bool, teacher_forced: bool,
                reward: bool) -> dict[str, float]:
        """The ``val/*`` metrics from the sums of every data-parallel replica (collective:
        ``dp_sum`` reduces over data parallelism)."""
        totals = dict(zip(SUMS, dp_sum(self.sums)))
        teacher_tokens = totals["teacher_tokens"].clamp(min=1)
        out = {}
        if gad:
            out["val/teacher_exact_match"] = float(totals["exact"] / totals["rows"])
            out["val/teacher_token_agreement"] = float(totals["matched_tokens"] / teacher_tokens)
            if teacher_forced:
                out["val/teacher_log_prob"] = float(totals["teacher_log_prob"] / teacher_tokens)
        if reward:
            out["val/reward"] = float(totals["reward"] / totals["rows"])
        checks, k = dp_sum(self.checks), len(CHECKS)
        if checks[k] > 0:
            for start, suffix in ((0, ""), (k + 1, "_sampled")):
                for i, name in enumerate(CHECKS):
                    out[f"val/checker_{name}{suffix}"] = float(checks[start + i] / checks[start + k])
        return out


def val_generation_rows(batch: PromptBatch, texts: list[str], scores: Tensor | None, limit: int) -> list[dict]:
    """Up to ``limit`` rows ``{prompt, response, score[, teacher_response]}`` of a validation batch
    (``trainer.log_val_generations``, verl's key); the prompt is its last message's text."""
    rows = []
    for i in range(min(max(limit, 0), len(texts))):
        messages = batch.raw_prompt[i]
        prompt = messages[-1].get("content", "") if messages else ""
        row = {"prompt": prompt, "response": texts[i], "score": None if scores is None else float(scores[i])}
        if batch.teacher_response is not None:
            row["teacher_response"] = batch.teacher_response[i]
        rows.append(row)
    return rows


def log_val_generations(run_dir: str, step: int, rows: list[dict]) -> None:
    """Rank 0: print the validation samples and append them to ``<run_dir>/val_generations.jsonl``
    (one JSON object per sample, with ``step``)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "val_generations.jsonl"), "a", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
            score = "n/a" if row["score"] is None else f"{row['score']:g}"
            print(f"[megatron_gad] val sample {i} (step {step}) score={score}\n  prompt: {row['prompt']!r}\n"
                  f"  response: {row['response']!r}", flush=True)
