"""A careless or hostile user's inputs: undecodable and malformed data, damaged model files, the wrong workdir
for predict / generate, bad config files and values. Each stops with one line naming the file (and line) or
the config key, never a traceback.

Most cases call the library entry point and check the exception the command lines print as `error: ...`
(`_one_line`); a few go through the command lines themselves (`_cli`), each a subprocess.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
from conftest import FAST_COMPILE_FLAG

from sft_jax.data.sources import read_classification

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGES = REPO / "tests" / "data" / "bad" / "images"
# What the command lines (sft_jax.main, .predict, .generate) print as one `error: ...` line.
ONE_LINE_ERRORS = (ValueError, FileNotFoundError, PermissionError)


def _one_line(fn, *args, **kwargs) -> str:
    """The message of the error `fn(*args, **kwargs)` raises, checked to be one the command lines print as one
    line (and to be one line)."""
    with pytest.raises(ONE_LINE_ERRORS) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    return message


def _write(path: pathlib.Path, data: bytes | str) -> pathlib.Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ------------------------------------------------------------------------------ text classification files

def test_bom_at_the_start_of_jsonl_and_csv_is_harmless(tmp_path):
    jsonl = _write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + _jsonl({"text": "a", "label": "x"}).encode())
    csv = _write(tmp_path / "bom.csv", b"\xef\xbb\xbftext,label\ngood,pos\n")
    assert [(e.text, e.label) for e in read_classification(str(jsonl))] == [("a", "x")]
    assert [(e.text, e.label) for e in read_classification(str(csv))] == [("good", "pos")]


@pytest.mark.parametrize("name, data, expected", [
    ("binary.jsonl", b"\x7fELF\x02\x01\x01\x00" + bytes(range(128, 256)) * 4, ":1: not valid UTF-8"),  # a program
    ("utf16.jsonl", '{"text": "a", "label": "x"}\n'.encode("utf-16"), ":1: not valid UTF-8"),
    ("latin1.csv", "text,label\nok,pos\ncaf\xe9,pos\n".encode("latin-1"), ":3: not valid UTF-8"),
    ("array.jsonl", _jsonl({"text": "a", "label": "x"}, [{"text": "a", "label": "x"}]),
     ":2: expected a JSON object, got list"),
    ("pretty.jsonl", json.dumps([{"text": "a", "label": "x"}], indent=1), ":1: malformed JSON"),
    ("float_label.jsonl", _jsonl({"text": "a", "label": 1.5}), ":1: field 'label' must be a string or an int"),
    ("dict_label.jsonl", _jsonl({"text": "a", "label": {"y": 1}}), ":1: field 'label' must be a string or an int"),
    ("nan_label.jsonl", '{"text": "a", "label": NaN}\n', ":1: field 'label' must be a string or an int, got float"),
    ("int_text.jsonl", _jsonl({"text": 7, "label": "x"}), ":1: field 'text' must be a string, got int"),
    ("header_only.csv", "text,label\n", ": no examples"),
    ("blank_lines.jsonl", "\n  \n\n", ": no examples"),
], ids=lambda v: v if isinstance(v, str) and v.endswith((".jsonl", ".csv")) else "")
def test_undecodable_and_malformed_text_data(tmp_path, name, data, expected):
    path = _write(tmp_path / name, data)
    assert _one_line(read_classification, str(path)).startswith(f"{path}{expected}")


# ------------------------------------------------------------------------------------- SFT / chat records

def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


OK_PAIR = {"input": "q", "output": "a"}


@pytest.mark.parametrize("record, expected", [
    ({"messages": "hello"}, ":2: field 'messages' must be a non-empty list of messages"),
    ({"messages": []}, ":2: field 'messages' must be a non-empty list of messages"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, ":2: message 0 must be"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                   {"role": "assistant", "content": "x"}]}, ":2: message 0 must be"),
    (_chat(("assistant", "x"), ("user", "hi")), ":2: message 0 is 'assistant' where 'user' was due"),
    (_chat(("user", "a"), ("user", "b"), ("assistant", "x")), ":2: message 1 is 'user' where 'assistant' was due"),
    (_chat(("user", "a"), ("assistant", "x"), ("system", "s")), ":2: message 2 is 'system' where 'user' was due"),
    (_chat(("system", "s"), ("user", "a"), ("assistant", " ")), ":2: message 2 (assistant) is empty"),
    ({"instruction": "i", "instances": ["not an object"]}, ":2: instance 0 must be an object"),
    ({"input": "q", "output": None}, ":2: missing field 'output'"),
    ({"instruction": ["a list"], "output": "a"}, ":2: field 'instruction' must be a string, got list"),
])
def test_malformed_sft_records(tmp_path, record, expected):
    from sft_jax.data.sft import read_sft

    path = _write(tmp_path / "sft.jsonl", _jsonl(OK_PAIR, record, OK_PAIR))
    assert _one_line(read_sft, str(path)).startswith(f"{path}{expected}")


def test_well_formed_chats_still_parse(tmp_path):
    from sft_jax.data.sft import read_sft

    chats = [_chat(("system", "s"), ("user", "a"), ("assistant", "b")),
             _chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
             _chat(("user", "a"), ("assistant", "b"), ("user", "c"))]  # a trailing user turn is only context
    assert len(read_sft(str(_write(tmp_path / "chats.jsonl", _jsonl(*chats))))) == 3


def test_decoder_data_paths(tmp_path):
    from sft_jax.data.lm import read_documents
    from sft_jax.data.sft import read_sft

    assert _one_line(read_sft, str(tmp_path)) == (f"{tmp_path}: is a directory; SFT data must be a .jsonl, .parquet "
                                                  "or .arrow file, a `datasets` folder or parallel:SRC,TGT")
    assert _one_line(read_documents, str(tmp_path)).startswith(f"{tmp_path}: is a directory;")
    src = _write(tmp_path / "src.txt", b"fine\ncaf\xe9\n")
    tgt = _write(tmp_path / "tgt.txt", "ok\nok\n")
    assert _one_line(read_sft, f"parallel:{src},{tgt}").startswith(f"{src}:2: not valid UTF-8")
    assert _one_line(read_sft, f"parallel:{tgt}") == f"parallel:{tgt}: expected parallel:SOURCE_FILE,TARGET_FILE"
    gz = _write(tmp_path / "src.txt.gz", b"\x1f\x8b\x08garbage")
    assert _one_line(read_sft, f"parallel:{gz},{tgt}").startswith(f"{gz}: cannot read")


# ---------------------------------------------------------------------------------------------------- images

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("name, data, expected", [
    ("truncated.png", (IMAGES / "red0.png").read_bytes()[:60], "cannot decode image"),
    ("zero.jpg", b"", "the image file is empty (0 bytes)"),
    ("text.jpg", b"this is not a JPEG\n", "cannot decode image (UnidentifiedImageError"),
    # 30000 x 30000 pixels claimed by a 100-byte file: PIL's decompression-bomb guard, not a traceback.
    ("bomb.png", b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
     + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""),
     "cannot decode image (DecompressionBombError"),
    ("folder.png", None, "is a directory, not an image file"),
    ("missing.png", "absent", "image file not found"),
])
def test_bad_image_files(tmp_path, name, data, expected):
    from sft_jax.data import images
    from sft_jax.data.batching import LabelVocab

    path = tmp_path / name
    if data is None:
        path.mkdir()
    elif data != "absent":
        _write(path, data)
    manifest = _write(tmp_path / "m.jsonl", _jsonl({"image": str(IMAGES / "red0.png"), "label": "red"},
                                                   {"image": name, "label": "red"}))
    records = images.read_image_records(str(manifest))
    message = _one_line(images.load_images, records, LabelVocab(["blue", "red"]), 8)
    assert message.startswith(f"{manifest}:2: {path}: {expected}"), message


# ---------------------------------------------------------------------------------------- model files

def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: pathlib.Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_safetensors(tiny_llama_dir, tiny_bert_dir, tmp_path, keep):
    from sft_jax import sharding
    from sft_jax.models.loading.hf import load_encoder
    from sft_jax.models.loading.lm import load_decoder
    from sft_jax.models.loading.stream import load_decoder_sharded

    llama = _copy(tiny_llama_dir, tmp_path / "llama")
    _truncate(llama / "model.safetensors", keep)
    expected = f"{llama}/model.safetensors: not a readable safetensors file"
    assert _one_line(load_decoder, str(llama)).startswith(expected)
    assert _one_line(load_decoder_sharded, str(llama), sharding.make_mesh({"data": 1})).startswith(expected)
    bert = _copy(tiny_bert_dir, tmp_path / "bert")
    _truncate(bert / "model.safetensors", keep)
    assert _one_line(load_encoder, str(bert)).startswith(f"{bert}/model.safetensors: not a readable safetensors file")


def test_sharded_checkpoint_index_problems(tiny_llama_dir, tmp_path):
    from sft_jax.models.loading.lm import load_decoder

    model = _copy(tiny_llama_dir, tmp_path / "llama")
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    assert _one_line(load_decoder, str(model)) == (f"{model}/model-00002-of-00002.safetensors: no such file "
                                                   "(listed by the shard index)")
    index.write_text(json.dumps({"metadata": {}}))
    assert _one_line(load_decoder, str(model)) == f"{index}: no 'weight_map' of tensor names to shard files"


def _tiny_gguf(path: pathlib.Path) -> pathlib.Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_gguf(tmp_path, damage):
    pytest.importorskip("gguf")
    from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer

    path = _tiny_gguf(tmp_path / "model.gguf")
    if damage == "truncated":
        _truncate(path, 0.6)
    else:
        path.write_bytes(os.urandom(1000) if damage == "garbage" else b"")
    expected = f"{path}: not a readable GGUF file"
    assert _one_line(load_decoder, str(path)).startswith(expected)
    assert _one_line(load_lm_tokenizer, str(path)).startswith(expected)  # not "no usable tokenizer"


@pytest.mark.parametrize("content, expected", [
    ('{"model_type": "bert", ', "not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("", "the file is empty"),
    (b"\xff\xfe{}", "not a JSON file (not valid UTF-8"),
])
def test_model_dir_with_a_bad_config_json(tiny_bert_dir, tiny_llama_dir, tmp_path, content, expected):
    from sft_jax.models.loading.hf import load_encoder, load_tokenizer
    from sft_jax.models.loading.lm import load_decoder

    for name, source, load in (("bert", tiny_bert_dir, load_encoder), ("llama", tiny_llama_dir, load_decoder)):
        model = _copy(source, tmp_path / name)
        config = _write(model / "config.json", content)
        assert _one_line(load, str(model)).startswith(f"{config}: {expected}")
        # The tokenizer is loaded first: the damaged config.json is named, not a missing tokenizer.
        assert _one_line(load_tokenizer, str(model)).startswith(f"{config}: {expected}")


def test_garbage_pytorch_bin(tiny_bert_dir, tmp_path):
    pytest.importorskip("torch")
    from sft_jax.models.loading.hf import load_encoder

    model = _copy(tiny_bert_dir, tmp_path / "bert")
    (model / "model.safetensors").unlink()
    weights = _write(model / "pytorch_model.bin", b"PK\x03\x04 not really a zip")
    assert _one_line(load_encoder, str(model)).startswith(f"{weights}: not a readable PyTorch checkpoint file")


def test_model_path_that_is_a_file(tmp_path):
    from sft_jax.models.registry import resolve_model_dir

    path = _write(tmp_path / "model.gguf", b"x")
    assert _one_line(resolve_model_dir, str(path)).startswith(f"{path}: a file, not a model directory")


# --------------------------------------------------------------------------- predict / generate workdirs

def _fake_workdir(tmp_path: pathlib.Path, task: str) -> str:
    """A workdir whose config.json names `task`: enough for the check that comes before any model is built."""
    workdir = tmp_path / task
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"task": task, "model": "unused"}))
    return str(workdir)


@pytest.mark.parametrize("task, use", [
    ("sft", "use python -m sft_jax.generate --workdir={w} --prompt=TEXT"),
    ("language_modeling", "use python -m sft_jax.generate --workdir={w} --prompt=TEXT"),
    ("image_classification", "use python -m sft_jax.predict --workdir={w} --image=FILE"),
])
def test_predicting_texts_with_a_workdir_that_is_no_text_classifier(tmp_path, task, use):
    from sft_jax.predict import Predictor

    workdir = _fake_workdir(tmp_path, task)
    message = _one_line(Predictor, workdir)
    assert message.startswith(f"{workdir}: this workdir holds ") and f"(task={task})" in message, message
    assert message.endswith(use.format(w=workdir)), message


def test_predicting_images_with_a_language_model_workdir(tmp_path):
    from sft_jax.predict import ImagePredictor

    workdir = _fake_workdir(tmp_path, "sft")
    assert _one_line(ImagePredictor, workdir) == (
        f"{workdir}: this workdir holds a language model (task=sft), which cannot classify images; "
        f"use python -m sft_jax.generate --workdir={workdir} --prompt=TEXT")


@pytest.mark.parametrize("task", ["text_classification", "image_classification"])
def test_generating_with_a_classification_workdir(tmp_path, task):
    from sft_jax.tasks.language_model import load_lm

    workdir = _fake_workdir(tmp_path, task)
    message = _one_line(load_lm, None, workdir)
    assert message.startswith(f"{workdir}: this workdir holds a") and "classifier" in message, message
    assert f"(task={task}), which cannot complete prompts" in message, message
    assert f"use python -m sft_jax.predict --workdir={workdir}" in message


# ----------------------------------------------------------------------------------------- config values

@pytest.mark.parametrize("key, value, expected", [
    ("buckets", (), "config.buckets: must be a non-empty tuple of positive lengths, got ()"),
    ("buckets", ("",), "config.buckets: must be a non-empty tuple of positive lengths, got ('',)"),
    ("buckets", (16, 0), "config.buckets: must be a non-empty tuple of positive lengths"),
    ("max_length", 0, "config.max_length: must be positive, got 0"),
    ("eval_batch_size", -8, "config.eval_batch_size: must be positive, got -8"),
])
def test_invalid_config_values(key, value, expected):
    from sft_jax.config_defaults import defaults, validate

    c = defaults()
    c.data.train = c.data.eval = "x.jsonl"
    c[key] = value
    assert _one_line(validate, c).startswith(expected)


def test_batch_size_the_mesh_cannot_split():
    import jax

    from sft_jax import sharding
    from sft_jax.config_defaults import defaults

    if jax.device_count() < 8:
        pytest.skip("needs the 8 CPU devices of conftest")
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    c = defaults()
    c.batch_size, c.eval_batch_size = 12, 16
    assert _one_line(sharding.check_batch_sizes, c, mesh) == (
        "config.batch_size: 12 examples do not split evenly over the 8 devices of the mesh's batch axes "
        "(data=4 x fsdp=2); use a multiple of 8, or set config.mesh")
    c.batch_size, c.eval_batch_size = 16, 20
    assert _one_line(sharding.check_batch_sizes, c, mesh).startswith("config.eval_batch_size: 20 examples")
    c.eval_batch_size = 24
    sharding.check_batch_sizes(c, mesh)


# ------------------------------------------------------------------------------------ the command lines

def _cli(module: str, *args: str, cwd: pathlib.Path = REPO) -> str:
    """The one `error: ...` line of `python -m MODULE ARGS`, checked to come with no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE_FLAG)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0].removeprefix("error: ")


def test_cli_bad_config_files(tmp_path):
    """Each bad --config: one line, in one process (the config is parsed before JAX starts; the flag
    errors are in one process each only because absl parses once per process)."""
    syntax = _write(tmp_path / "syntax.py", "def get_config(:\n")
    raising = _write(tmp_path / "raising.py", "def get_config(arg=None):\n    raise ValueError(f'no preset {arg}')\n")
    none = _write(tmp_path / "empty.py", "x = 1\n")
    cases = [
        (tmp_path / "nope.py", f"--config={tmp_path / 'nope.py'}: no such config file"),
        (syntax, f"{syntax}:1: invalid syntax (--config={syntax})"),
        (f"{raising}:big", f"{raising}:2: ValueError: no preset big (raised while loading --config={raising}:big)"),
        (none, f"--config={none}: {none} defines no get_config()"),
    ]
    for config, expected in cases:
        assert _cli("sft_jax.main", f"--config={config}", f"--workdir={tmp_path / 'run'}") == expected
    assert not (tmp_path / "run").exists()


def test_cli_truncated_model_weights(tiny_bert_dir, tmp_path):
    model = _copy(tiny_bert_dir, tmp_path / "bert")
    _truncate(model / "model.safetensors", 0.5)
    data = REPO / "tests" / "data" / "bad" / "train_ok.jsonl"
    line = _cli("sft_jax.main", "--config=configs/sst2.py:full", f"--workdir={tmp_path / 'run'}",
                f"--config.model={model}", f"--config.data.train={data}", f"--config.data.eval={data}",
                "--config.forgetting.stsb=", "--config.max_steps=1")
    assert line.startswith(f"{model}/model.safetensors: not a readable safetensors file")


def test_cli_predict_and_generate_with_the_wrong_input(tmp_path):
    sft_run = _fake_workdir(tmp_path, "sft")
    text_run = _fake_workdir(tmp_path, "text_classification")
    assert _cli("sft_jax.predict", f"--workdir={text_run}", f"--input={tmp_path}") == (
        f'{tmp_path}: is a directory; --input takes a .jsonl file of {{"text": ...}} records')
    assert _cli("sft_jax.predict", f"--workdir={sft_run}", "--text=hello") == (
        f"{sft_run}: this workdir holds a language model (task=sft), which cannot classify texts; "
        f"use python -m sft_jax.generate --workdir={sft_run} --prompt=TEXT")
    assert _cli("sft_jax.generate", f"--workdir={text_run}", "--prompt=hi") == (
        f"{text_run}: this workdir holds a text classifier (task=text_classification), which cannot complete "
        f"prompts; use python -m sft_jax.predict --workdir={text_run} --text=TEXT")
