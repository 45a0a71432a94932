"""The checkpoint_tools CLIs: user errors exit 2 with one line and leave no output behind;
sharded inputs with and without an index; one end-to-end run of all three scripts as processes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_gad import convert

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool(name: str):
    """Import ``checkpoint_tools/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "checkpoint_tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_llama(path: str, **save_kwargs) -> str:
    """A random tiny tied Llama (vocab 200, 2 layers, GQA) saved with save_pretrained."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("hf") / "model"))


def edit_weights(src: str, dst: str, edit) -> str:
    """Copy the HF dir ``src`` to ``dst`` with ``edit(state)`` applied to its tensors."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f.endswith(".json"):
            with open(os.path.join(src, f)) as a, open(os.path.join(dst, f), "w") as b:
                b.write(a.read())
    state = load_file(os.path.join(src, "model.safetensors"))
    edit(state)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def run_error(capsys, tool: str, argv: list[str], message: str, out: str) -> None:
    """The tool exits 2 before doing anything, prints one ``error:`` line naming ``message``,
    and leaves neither ``out`` nor a temporary sibling."""
    assert load_tool(tool).main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    parent = os.path.dirname(out)
    assert not [f for f in os.listdir(parent) if f.startswith(os.path.basename(out))] if os.path.isdir(parent) else True


def test_hf_to_megatron_user_errors(hf_dir: str, tmp_path, capsys) -> None:
    from transformers import GPT2Config

    out = str(tmp_path / "out")
    run_error(capsys, "hf_to_megatron", ["--hf-dir", str(tmp_path / "nope"), "--out", out], "does not exist", out)
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(str(tmp_path / "gpt2"))
    run_error(capsys, "hf_to_megatron", ["--hf-dir", str(tmp_path / "gpt2"), "--out", out],
              "model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3", out)
    bad = edit_weights(hf_dir, str(tmp_path / "bad_shape"), lambda s: s.update(
        {"model.layers.1.mlp.up_proj.weight": s["model.layers.1.mlp.up_proj.weight"][:90]}))
    run_error(capsys, "hf_to_megatron", ["--hf-dir", bad, "--out", out],
              "tensor 'model.layers.1.mlp.up_proj.weight' has shape (90, 64), expected (96, 64)", out)
    missing = edit_weights(hf_dir, str(tmp_path / "missing"), lambda s: s.pop("model.layers.0.self_attn.v_proj.weight"))
    run_error(capsys, "hf_to_megatron", ["--hf-dir", missing, "--out", out],
              "missing 1 tensor(s): model.layers.0.self_attn.v_proj.weight", out)
    extra = edit_weights(hf_dir, str(tmp_path / "extra"), lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(1)}))
    run_error(capsys, "hf_to_megatron", ["--hf-dir", extra, "--out", out],
              "unexpected 1 tensor(s): model.layers.2.mlp.up_proj.weight", out)
    run_error(capsys, "hf_to_megatron", ["--hf-dir", hf_dir, "--out", out, "--tp", "3"],
              "TP=3 x PP=1 cannot divide the model: num_attention_heads=4 is not divisible by TP=3", out)
    run_error(capsys, "hf_to_megatron", ["--hf-dir", hf_dir, "--out", out, "--pp", "4"],
              "num_hidden_layers=2 is not divisible by PP=4", out)
    run_error(capsys, "hf_to_megatron", ["--hf-dir", hf_dir, "--out", out, "--init-score-head", "0.02"],
              "--init-score-head applies to --role critic only", out)
    broken = shutil.copytree(hf_dir, str(tmp_path / "broken_config"))
    with open(os.path.join(broken, "config.json"), "w") as f:
        f.write('{"model_type": "llama", ')
    run_error(capsys, "hf_to_megatron", ["--hf-dir", broken, "--out", out],
              f"{os.path.join(broken, 'config.json')} cannot be read", out)
    corrupt = shutil.copytree(hf_dir, str(tmp_path / "corrupt_weights"))
    with open(os.path.join(corrupt, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    run_error(capsys, "hf_to_megatron", ["--hf-dir", corrupt, "--out", out],
              f"{os.path.join(corrupt, 'model.safetensors')} is not a readable safetensors file", out)
    bad_index = shutil.copytree(hf_dir, str(tmp_path / "bad_index"))
    with open(os.path.join(bad_index, "model.safetensors.index.json"), "w") as f:
        f.write("[]")
    run_error(capsys, "hf_to_megatron", ["--hf-dir", bad_index, "--out", out],
              "model.safetensors.index.json is not a safetensors index", out)
    os.makedirs(out)
    assert load_tool("hf_to_megatron").main(["--hf-dir", hf_dir, "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err and os.listdir(out) == []


def test_megatron_side_user_errors(hf_dir: str, tmp_path, capsys) -> None:
    out = str(tmp_path / "out")
    run_error(capsys, "megatron_to_hf", ["--megatron-dir", hf_dir, "--out", out], "has no megatron_gad_meta.json", out)
    run_error(capsys, "megatron_to_hf", ["--megatron-dir", str(tmp_path / "nope"), "--out", out], "does not exist", out)
    run_error(capsys, "verify", ["--hf-dir", hf_dir, "--megatron-dir", hf_dir], "has no megatron_gad_meta.json", out)


def test_failure_inside_output_block_leaves_nothing(tmp_path) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"):
        with convert.atomic_output_dir(out) as tmp:
            open(os.path.join(tmp, "partial.safetensors"), "w").close()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_sharded_inputs_with_and_without_index(tmp_path) -> None:
    sharded = save_tiny_llama(str(tmp_path / "sharded"), max_shard_size="40KB")
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 2
    with_index = convert.locate_safetensors(sharded)
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert with_index == {k: os.path.join(sharded, v) for k, v in json.load(f)["weight_map"].items()}
    os.remove(os.path.join(sharded, "model.safetensors.index.json"))
    assert convert.locate_safetensors(sharded) == with_index
    convert.preflight_hf(sharded, "actor")


def test_cli_end_to_end_as_processes(tmp_path) -> None:
    """hf_to_megatron -> verify -> megatron_to_hf (sharded) as real processes; a bit-exact result."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = save_tiny_llama(str(tmp_path / "hf"), max_shard_size="40KB")
    os.remove(os.path.join(hf, "model.safetensors.index.json"))  # shards without an index
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(199)} | {"<unk>": 199}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(hf)
    meg, back = str(tmp_path / "meg"), str(tmp_path / "back")

    def run(tool: str, *argv: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, os.path.join(ROOT, "checkpoint_tools", f"{tool}.py"), *argv]
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)

    r = run("hf_to_megatron", "--hf-dir", hf, "--out", meg)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"config.json", "megatron_gad_meta.json", "metadata.json"} <= set(os.listdir(meg))
    r = run("verify", "--hf-dir", hf, "--megatron-dir", meg)
    assert r.returncode == 0 and "max abs logit diff" in r.stdout, r.stdout + r.stderr[-2000:]
    r = run("megatron_to_hf", "--megatron-dir", meg, "--out", back, "--max-shard-size", "50KB")
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))
    assert AutoTokenizer.from_pretrained(back)("w3 w150 zzz")["input_ids"] == [3, 150, 199]
    a, b = {}, {}
    for d, state in ((hf, a), (back, b)):
        for f in os.listdir(d):
            if f.endswith(".safetensors"):
                state.update(load_file(os.path.join(d, f)))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bin_weights_are_loaded_once_per_file(tmp_path, monkeypatch) -> None:
    """A ``pytorch_model.bin`` directory (one file, then shards without an index): listing the
    tensor names and reading every tensor does one ``torch.load`` per file, and the tensors read
    equal the saved ones."""
    from megatron_gad.hf_io import SafetensorsReader

    src = load_file(os.path.join(save_tiny_llama(str(tmp_path / "st")), "model.safetensors"))
    names = sorted(src)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    for d in (single, sharded):
        shutil.copytree(tmp_path / "st", d, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(src, single / "pytorch_model.bin")
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        torch.save({n: src[n] for n in part}, sharded / f"pytorch_model-{i + 1:05d}-of-00002.bin")
    real_load, loads = torch.load, []

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    for directory, files in ((single, 1), (sharded, 2)):
        loads.clear()
        reader = SafetensorsReader(str(directory))
        got = {n: reader.get(n) for n in reader.keys()}
        assert len(loads) == files == len(set(loads)), loads
        assert set(got) == set(src) and all(torch.equal(got[n], src[n]) for n in src)


def _convert_to_megatron(hf_dir: str, out: str) -> None:
    convert.hf_to_megatron(hf_dir, out)


@pytest.fixture(scope="module")
def megatron_dir(hf_dir: str, tmp_path_factory) -> str:
    """``hf_dir`` converted by a forked rank (a process group in the pytest process itself would
    be inherited by the ranks that later tests fork)."""
    from megatron_gad.runtime.spawn import run_distributed

    out = str(tmp_path_factory.mktemp("meg") / "model")
    run_distributed(_convert_to_megatron, 1, args=(hf_dir, out))
    return out


def test_megatron_checkpoint_that_does_not_fit_its_config(megatron_dir: str, tmp_path, capsys) -> None:
    """The stored tensors are checked against config.json before any work: a layer count that
    differs, or a role whose tensors the checkpoint does not hold, is one error line."""
    out = str(tmp_path / "out")
    fewer = shutil.copytree(megatron_dir, str(tmp_path / "fewer_layers"))
    with open(os.path.join(fewer, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(fewer, "config.json"), "w") as f:
        json.dump({**config, "num_hidden_layers": 1}, f)
    run_error(capsys, "megatron_to_hf", ["--megatron-dir", fewer, "--out", out], "expected 1 layers first", out)
    critic = shutil.copytree(megatron_dir, str(tmp_path / "not_a_critic"))
    with open(os.path.join(critic, "megatron_gad_meta.json"), "w") as f:
        json.dump({"format": 1, "role": "critic", "architecture": "llama", "dtype": "float32"}, f)
    run_error(capsys, "megatron_to_hf", ["--megatron-dir", critic, "--out", out],
              "does not hold the critic of its config.json: missing ['trunk.embedding", out)


def test_an_os_error_is_one_line_and_exit_2(capsys) -> None:
    """A full disk (any OSError) ends a converter CLI like a user error: one line, exit 2."""
    import errno

    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")

    assert convert.run_cli(full_disk, lambda: 0) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: [Errno 28] No space left on device: '/out/model.safetensors'"], err


def _export_with_a_full_disk(meg_dir: str, out: str) -> int:
    """megatron_to_hf with small shards whose second file write fails half-way, as on a full
    disk; returns how many writes were tried."""
    import errno

    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 64)  # a torn file
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, metadata=metadata)

    safetensors.torch.save_file = save_file
    try:
        convert.megatron_to_hf(meg_dir, out, max_shard_size="40KB")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC and len(calls) == 2
        return len(calls)
    raise AssertionError("the injected write failure did not surface")


def test_megatron_to_hf_failing_write_leaves_no_output_and_no_temporary(megatron_dir: str, tmp_path) -> None:
    from megatron_gad.runtime.spawn import run_distributed

    out = str(tmp_path / "out")
    assert run_distributed(_export_with_a_full_disk, 1, args=(megatron_dir, out)) == [2]
    assert os.listdir(tmp_path) == []


def _export_recording_fsyncs(meg_dir: str, out: str) -> tuple[list[str], str]:
    """megatron_to_hf with every os.fsync recorded by the path of its descriptor."""
    real, synced = os.fsync, []

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    os.fsync = fsync
    try:
        convert.megatron_to_hf(meg_dir, out, max_shard_size="40KB")
    finally:
        os.fsync = real
    return synced, f"{os.path.abspath(out)}.tmp-{os.getpid()}"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name descriptors")
def test_megatron_to_hf_output_is_on_disk_before_it_is_renamed_into_place(megatron_dir: str, tmp_path) -> None:
    """Every file of the HF directory and the directory itself are fsynced under the temporary
    name (before the rename), and the parent directory after it."""
    from megatron_gad.runtime.spawn import run_distributed

    out = str(tmp_path / "out")
    synced, tmp = run_distributed(_export_recording_fsyncs, 1, args=(megatron_dir, out))[0]
    files = os.listdir(out)
    assert len([f for f in files if f.endswith(".safetensors")]) > 1 and "config.json" in files
    assert {os.path.join(tmp, f) for f in files} | {tmp} <= set(synced), (files, synced)
    assert synced[-1] == str(tmp_path) and synced.index(tmp) < len(synced) - 1
