"""Bad input through the CLI: exit status 2, one line starting ``error:``, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from qwen_ondevice.cli.main import main


def run_cli(capsys, argv):
    capsys.readouterr()  # drop whatever fixtures printed while being set up
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    assert out == ""
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Nothing these tests do may write into the user's cache."""
    monkeypatch.setenv("QWEN_ONDEVICE_CACHE", str(tmp_path / "cache"))


def test_missing_folder(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(*run_cli(capsys, ["generate", str(missing), "--prompt", "hi"]), str(missing))


def test_folder_without_weights(capsys, tmp_path, tiny_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_path / "config.json", folder / "config.json")
    assert_one_line_error(*run_cli(capsys, ["generate", str(folder), "--prompt", "hi"]), "safetensors")


def test_not_qwen2(capsys, tmp_path, tiny_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(capsys, ["generate", str(folder), "--prompt", "hi"]), "llama", "Qwen2")


def test_unreadable_gguf(capsys, tmp_path):
    junk = tmp_path / "x.gguf"
    junk.write_bytes(bytes(range(256)) * 64)
    assert_one_line_error(*run_cli(capsys, ["generate", str(junk), "--prompt", "hi"]), "x.gguf")


def test_prompt_over_the_context_length(capsys, tiny_path):
    prompt = "Tell me everything about lobsters, " * 20
    args = ["generate", str(tiny_path), "--context-length", "32", "--prompt-length", "8", "--prompt", prompt]
    code, out, err = run_cli(capsys, args)
    assert_one_line_error(code, out, err, "the prompt is", "over the context length 32")
    # the same as plain text, without the chat template
    code, out, err = run_cli(capsys, args + ["--raw"])
    assert_one_line_error(code, out, err, "the prompt is", "over the context length 32")


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--max-new-tokens", "0"], "max new tokens"),
        (["--context-length", "8192"], "max_position_embeddings"),
        (["--context-length", "32", "--prompt-length", "32"], "must be below the context length 32"),
        (["--backend", "ort-cpu"], "bundle"),
        (["--host-numerics", "fast"], "--host-numerics fast applies to a bundle on the ort-cpu backend"),
    ],
)
def test_bad_options(capsys, tiny_path, extra, fragment):
    code, out, err = run_cli(capsys, ["generate", str(tiny_path), "--prompt", "hi", *extra])
    assert_one_line_error(code, out, err, fragment)


def test_small_context_without_prompt_length_uses_a_smaller_ar(capsys, tiny_path):
    code, out, err = run_cli(capsys, ["generate", str(tiny_path), "--prompt", "hi", "--context-length", "64",
                                      "--max-new-tokens", "3", "--json"])
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 3


def _sharded_copy(tiny_path, tmp_path):
    """The tiny checkpoint with its weights in two shards and a model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "sharded"
    shutil.copytree(tiny_path, out)
    (out / "model.safetensors").unlink()
    tensors = load_file(str(tiny_path / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for k, group in enumerate((names[:half], names[half:]), 1):
        fname = f"model-0000{k}-of-00002.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / fname))
        weight_map.update({n: fname for n in group})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_missing_or_truncated_shard_is_named(capsys, tmp_path, tiny_path):
    ckpt = _sharded_copy(tiny_path, tmp_path)
    shard = ckpt / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])  # a truncated copy
    assert_one_line_error(*run_cli(capsys, ["generate", str(ckpt), "--prompt", "hi"]), str(shard), "truncated")
    shard.unlink()  # a shard the index names but the folder lacks
    assert_one_line_error(*run_cli(capsys, ["generate", str(ckpt), "--prompt", "hi"]), str(shard), "missing",
                          "model.safetensors.index.json")
    shard.write_bytes(data)  # whole again: it loads
    code, out, err = run_cli(capsys, ["generate", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"])
    assert code == 0, err
