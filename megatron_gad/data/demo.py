"""Demo assets made locally: an addition task with a deterministic "teacher", a tiny tokenizer
and tiny HF models, so GAD can be run end to end on a laptop without downloads.

The task: prompts such as ``"What is 37 + 45?"`` (four phrasings), answered by the teacher
program in one fixed style: ``"37 + 45 = 82. The answer is 82."``. Operands are drawn from
``0..max_operand`` (default 49); train and validation pairs are disjoint. A tiny model learns the
answer format within a few SFT steps, while getting the sum right takes real training, so a
randomly initialised student starts well below the teacher.

Layout written by :func:`generate_demo_assets` (``out_dir`` is replaced atomically)::

    out_dir/
      train.parquet  val.parquet                    GAD data (with ``teacher_response``)
      train_standard.parquet  val_standard.parquet  the same prompts, no teacher (PPO / GSPO)
      tokenizer/        HF tokenizer dir (word level, one token per digit, chat template)
      student/          Llama causal LM (tied embeddings): config, seeded initial weights, tokenizer
      discriminator/    the student's initial trunk plus a zero scalar ``score`` head (GAD
                        initialises the discriminator from the generator; a zero head scores
                        every sequence alike until trained), as ``LlamaForSequenceClassification``
      manifest.json     written last; its presence marks a complete set

A second task, ``task="styles"`` (data source ``demo_styles``), asks the same questions but its
teacher answers each prompt in one of :data:`STYLES` drawn at random, each a complete sentence
pattern; the styles share words and endings, so a weak student that loses track of which style it
began can finish in another one. :func:`check_response` is its checker (and the addition task's,
with the one style): a response is *one style* when it is exactly one complete style, whatever its
numbers, *valid* when that style holds the prompt's operands and one consistent sum, *correct* when
that sum is right as well.

Shipping initial weights (instead of letting Megatron initialise the models) makes a demo run
independent of the parallel layout: megatron-core seeds each pipeline stage differently, so a
Megatron-initialised model at PP=2 is another model than at PP=1.

Everything is a pure function of the seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_gad.errors import UserError
from megatron_gad.io import replace_dir

DEMO_DATA_SOURCE = "demo_arith"
STYLES_DATA_SOURCE = "demo_styles"
TASKS = ("arith", "styles")
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 3
DEFAULT_SEED = 1



class DemoAssetsError(UserError, ValueError):
    """The demo asset directory cannot be written (a directory that is not a demo set is in the way)."""


PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

#: Jinja chat template: ``<s><|user|>question<|assistant|>``; assistant turns end with ``</s>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

PROMPT_PHRASINGS = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
)

_ANSWER_RE = re.compile(r"The answer is\s+(-?\d+)")

#: The styles task's complete answer patterns ({a}, {b}: the operands; {s}: their sum). Style 0 is
#: the addition task's only style. They share words ("The", "answer is", "is {s}.") so that a
#: style can be left half-way for another.
STYLES = (
    "{a} + {b} = {s}. The answer is {s}.",
    "The sum of {a} and {b} is {s}.",
    "The answer is {s}, since {a} plus {b} is {s}.",
)
#: Styles of each data source, for :func:`check_response`.
TASK_STYLES = {DEMO_DATA_SOURCE: STYLES[:1], STYLES_DATA_SOURCE: STYLES}


@dataclass(frozen=True)
class DemoAssets:
    """Paths of a complete demo asset set (see the module docstring for the layout)."""

    root: Path
    train_file: Path
    val_file: Path
    train_standard_file: Path
    val_standard_file: Path
    tokenizer_dir: Path
    student_dir: Path
    discriminator_dir: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> "DemoAssets":
        """The asset paths under ``root`` (whether or not they exist yet)."""
        r = Path(root)
        return cls(
            root=r,
            train_file=r / "train.parquet",
            val_file=r / "val.parquet",
            train_standard_file=r / "train_standard.parquet",
            val_standard_file=r / "val_standard.parquet",
            tokenizer_dir=r / "tokenizer",
            student_dir=r / "student",
            discriminator_dir=r / "discriminator",
        )


def teacher_answer(a: int, b: int) -> str:
    """The teacher program: the one fixed answer style for ``a + b``."""
    s = a + b
    return f"{a} + {b} = {s}. The answer is {s}."


def _style_pattern(style: str, a: int | None, b: int | None) -> re.Pattern:
    """``style`` as a regex: ``{s}`` a number (the same at every place), ``{a}``/``{b}`` the given
    operands, or any number where they are None."""
    body = re.escape(style)
    for name, value in (("a", a), ("b", b)):
        body = body.replace(re.escape("{" + name + "}"), r"\d+" if value is None else str(value))
    first = body.index(re.escape("{s}"))
    body = body[:first] + r"(?P<s>\d+)" + body[first + len(re.escape("{s}")):]
    return re.compile(body.replace(re.escape("{s}"), r"\d+"))


def check_response(data_source: str | None, text: str, a: int, b: int) -> tuple[bool, bool, bool] | None:
    """The demo tasks' checker: ``(one_style, valid, correct)`` for the response ``text`` to
    ``a + b``, or None when ``data_source`` is not a demo task. After collapsing runs of
    whitespace:

    * one_style: ``text`` is exactly one of the task's styles, whatever its numbers (complete, no
      blend of two styles, nothing after it);
    * valid: one style with the operands ``a`` and ``b`` and the same number at every ``{s}``;
    * correct: valid, and that number is ``a + b``.
    """
    styles = TASK_STYLES.get(data_source or "")
    if styles is None:
        return None
    flat = " ".join(str(text).split())
    for style in styles:
        if _style_pattern(style, None, None).fullmatch(flat) is None:
            continue
        m = _style_pattern(style, a, b).fullmatch(flat)
        if m is None:
            return True, False, False
        numbers = re.findall(r"\d+", flat)
        sums = [n for n, slot in zip(numbers, re.findall(r"\{(\w)\}", style)) if slot == "s"]
        valid = len(set(sums)) == 1
        return True, valid, valid and int(sums[0]) == a + b
    return False, False, False


def demo_reward(
    data_source: str | None,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
) -> float:
    """Exact-match reward (verl-style signature): 1.0 when the last ``"The answer is N"`` in
    ``solution_str`` has ``N == ground_truth``, else 0.0 (also 0.0 when there is no answer).

    ``data_source`` and ``extra_info`` are accepted for signature compatibility and ignored.
    """
    del data_source, extra_info
    if ground_truth is None or not isinstance(solution_str, str):
        return 0.0
    matches = _ANSWER_RE.findall(solution_str)
    if not matches:
        return 0.0
    return 1.0 if matches[-1] == str(ground_truth).strip() else 0.0


def sample_pairs(seed: int, n_train: int, n_val: int, max_operand: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct operand pairs for train ``[n_train, 2]`` and val ``[n_val, 2]``, disjoint."""
    n_pairs = (max_operand + 1) ** 2
    if n_train + n_val > n_pairs:
        raise ValueError(
            f"n_train + n_val = {n_train + n_val} exceeds the {n_pairs} distinct pairs of "
            f"operands 0..{max_operand}; raise max_operand"
        )
    rng = np.random.default_rng(seed)
    flat = rng.choice(n_pairs, size=n_train + n_val, replace=False)
    pairs = np.stack([flat // (max_operand + 1), flat % (max_operand + 1)], axis=1)
    return pairs[:n_train], pairs[n_train:]


def build_rows(pairs: np.ndarray, split: str, seed: int, with_teacher: bool,
               task: str = "arith") -> list[dict[str, Any]]:
    """Rows in the verl-style format for ``pairs [N, 2]``; the phrasing is drawn per row, and
    for ``task="styles"`` the teacher's style too (from its own random stream)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    phrasing = rng.integers(0, len(PROMPT_PHRASINGS), size=len(pairs))
    if task == "styles":
        style = np.random.default_rng([seed, 0 if split == "train" else 1, 2]).integers(0, len(STYLES), len(pairs))
    else:
        style = np.zeros(len(pairs), dtype=np.int64)
    rows = []
    for i, ((a, b), k, j) in enumerate(zip(pairs.tolist(), phrasing.tolist(), style.tolist())):
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": PROMPT_PHRASINGS[k].format(a=a, b=b)}],
            "data_source": STYLES_DATA_SOURCE if task == "styles" else DEMO_DATA_SOURCE,
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"split": split, "index": i, "a": a, "b": b},
        }
        if with_teacher:
            row["teacher_response"] = teacher_answer(a, b) if task == "arith" else STYLES[j].format(a=a, b=b, s=a + b)
        rows.append(row)
    return rows


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` to ``path`` with a fixed schema and options (byte-reproducible)."""
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [("prompt", pa.list_(message))]
    if "teacher_response" in rows[0]:
        fields.append(("teacher_response", pa.string()))
    fields += [
        ("data_source", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct([("split", pa.string()), ("index", pa.int64()), ("a", pa.int64()), ("b", pa.int64())]),
        ),
    ]
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    pq.write_table(table, path, compression="snappy", row_group_size=len(rows))


def train_tokenizer(corpus: list[str], out_dir: Path) -> int:
    """Train a word-level tokenizer on ``corpus`` and save it as an HF tokenizer dir.

    Words keep their leading space as ``▁`` (Metaspace) and every digit is its own token, so
    decoding reproduces the text exactly. Returns the vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    specials = [PAD, UNK, BOS, EOS, *ROLE_TOKENS]
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1, show_progress=False)
    tok.train_from_iterator(["0 1 2 3 4 5 6 7 8 9", *corpus], trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="left",
        model_max_length=256,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return tok.get_vocab_size()


def write_models(
    root: Path,
    tokenizer_dir: Path,
    seed: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 384,
) -> None:
    """Write the tiny Llama ``student/`` and ``discriminator/`` (plus tokenizer files).

    Both use the vocabulary of the tokenizer in ``tokenizer_dir``, tied embeddings and
    multi-head attention. The student's weights are transformers' initialisation under ``seed``
    (fp32 safetensors); the discriminator is ``LlamaForSequenceClassification`` (``num_labels=1``)
    holding the student's trunk and a zero ``score`` head (so the untrained discriminator's
    first Bradley-Terry loss is ln 2 and its accuracy 0.5, ties counting one half).
    The global torch RNG is left as it was.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    student_config = LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = LlamaForCausalLM(student_config).float()
    score = torch.zeros(1, hidden_size)
    student_dir, disc_dir = root / "student", root / "discriminator"
    student.save_pretrained(str(student_dir))
    disc_dir.mkdir()
    LlamaConfig(**common, architectures=["LlamaForSequenceClassification"], num_labels=1).save_pretrained(str(disc_dir))
    trunk = {k: v.detach().clone().contiguous() for k, v in student.state_dict().items() if k.startswith("model.")}
    save_file({**trunk, "score.weight": score}, str(disc_dir / "model.safetensors"), metadata={"format": "pt"})
    for target in (student_dir, disc_dir):
        for f in sorted(tokenizer_dir.iterdir()):
            shutil.copyfile(f, target / f.name)


def _write_all(
    root: Path, seed: int, n_train: int, n_val: int, max_operand: int, task: str = "arith"
) -> dict[str, Any]:
    """Write every asset into the (empty, existing) directory ``root``; return the manifest."""
    assets = DemoAssets.at(root)
    train_pairs, val_pairs = sample_pairs(seed, n_train, n_val, max_operand)
    corpus: list[str] = []
    for split, pairs, gad_path, std_path in (
        ("train", train_pairs, assets.train_file, assets.train_standard_file),
        ("val", val_pairs, assets.val_file, assets.val_standard_file),
    ):
        rows = build_rows(pairs, split, seed, with_teacher=True, task=task)
        write_parquet(rows, gad_path)
        write_parquet([{k: v for k, v in r.items() if k != "teacher_response"} for r in rows], std_path)
        corpus += [r["prompt"][0]["content"] for r in rows] + [r["teacher_response"] for r in rows]
    assets.tokenizer_dir.mkdir()
    vocab_size = train_tokenizer(corpus, assets.tokenizer_dir)
    write_models(root, assets.tokenizer_dir, seed)
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "max_operand": max_operand,
        "vocab_size": vocab_size,
        "data_source": DEMO_DATA_SOURCE,
    }
    if task != "arith":  # the addition task's manifest stays as it was
        manifest.update(task=task, data_source=STYLES_DATA_SOURCE)
    return manifest


def generate_demo_assets(
    out_dir: str | os.PathLike[str],
    seed: int = DEFAULT_SEED,
    n_train: int = 2000,
    n_val: int = 200,
    max_operand: int = 49,
    task: str = "arith",
) -> DemoAssets:
    """(Re)generate the demo assets of ``task`` (one of :data:`TASKS`) in ``out_dir``, replacing
    what is there.

    Everything is written into a temporary sibling directory that is renamed into place at the
    end, so an interrupted run leaves either the old set or the new one, never half of one.
    """
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; choose one of {', '.join(TASKS)}")
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final directory should not be
    try:
        manifest = _write_all(tmp, seed, n_train, n_val, max_operand, task)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoAssets.at(out)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``. An existing demo set in ``out`` is moved aside, then deleted.

    A non-empty ``out`` that is not a demo set is never deleted (DemoAssetsError). When another
    process renamed its complete set into ``out`` first, that set is kept and ``tmp`` dropped.
    """
    if out.exists() and read_manifest(out) is None and any(out.iterdir()):
        raise DemoAssetsError(f"{out} exists and is not a demo asset directory; refusing to replace it")
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        replace_dir(tmp, out, aside)
    except OSError:
        if read_manifest(out) is None:
            raise
        shutil.rmtree(aside, ignore_errors=True)


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a complete asset set in ``out_dir``, or None when there is none."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def assets_fresh(out_dir: str | os.PathLike[str], task: str = "arith", seed: int | None = None) -> bool:
    """True when ``out_dir`` holds a complete set of this format and ``task`` (and of ``seed``
    when given): what :func:`ensure_demo_assets` accepts without generating."""
    manifest = read_manifest(out_dir)
    return (
        manifest is not None
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("task", "arith") == task
        and (seed is None or manifest.get("seed") == seed)
    )


def ensure_demo_assets(
    out_dir: str | os.PathLike[str], seed: int | None = None, force: bool = False, task: str = "arith"
) -> DemoAssets:
    """Return the demo assets of ``task`` in ``out_dir``, generating them only when needed.

    They are generated when ``out_dir`` has no complete set (no manifest), when ``force`` is set,
    when the existing set is of another task, or when ``seed`` is given and differs from the seed
    of the existing set. With ``seed=None``
    any complete existing set is accepted and a missing one is made with :data:`DEFAULT_SEED`.
    Safe to call from several processes at once: each writes its own temporary directory and
    the last rename wins, so readers always see a complete set.
    """
    if assets_fresh(out_dir, task, seed) and not force:
        return DemoAssets.at(Path(out_dir).absolute())
    return generate_demo_assets(out_dir, seed=DEFAULT_SEED if seed is None else seed, task=task)
