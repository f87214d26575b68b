"""Parquet files, Arrow files (IPC file and stream format) and `datasets` save_to_disk folders as data for every
task: the same records, the same batches for the same seed as the jsonl they were copied from, the same
file:row errors, and DatasetDict split selection."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sentiment_records, write_jsonl

from sft_jax.data import batching, images
from sft_jax.data import lm as lm_data
from sft_jax.data import sft as sft_data
from sft_jax.data.sources import DataError, read_classification

FORMATS = ("parquet", "arrow_file", "arrow_stream", "datasets", "datasets_dict")


def _write_arrow(path: pathlib.Path, table: pa.Table, stream: bool) -> pathlib.Path:
    with pa.OSFile(str(path), "wb") as sink:
        open_writer = pa.ipc.new_stream if stream else pa.ipc.new_file
        with open_writer(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=3):  # several record batches
                writer.write_batch(batch)
    return path


def _save_to_disk(table: pa.Table, path: pathlib.Path, as_dict: bool) -> str:
    """A real `datasets` folder (a DatasetDict with train and test splits: "DIR:train")."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset(datasets.table.InMemoryTable(table))
    if as_dict:
        datasets.DatasetDict(train=ds, test=ds.select(range(1))).save_to_disk(str(path))
        return f"{path}:train"
    ds.save_to_disk(str(path))
    return str(path)


def write_format(fmt: str, records: list[dict], tmp_path: pathlib.Path, name: str = "data") -> str:
    """`records` in format `fmt`, written as people's tools write them; returns the data spec."""
    columns = list(dict.fromkeys(k for r in records for k in r))  # from_pylist would take the first row's keys
    table = pa.Table.from_pydict({k: [r.get(k) for r in records] for k in columns})  # absent fields: nulls
    if fmt == "parquet":
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, str(path), row_group_size=4)  # several row groups
        return str(path)
    if fmt in ("arrow_file", "arrow_stream"):
        return str(_write_arrow(tmp_path / f"{name}_{fmt}.arrow", table, stream=fmt == "arrow_stream"))
    return _save_to_disk(table, tmp_path / f"{name}_{fmt}", as_dict=fmt == "datasets_dict")


def _same_batches(a: batching.TrainBatches, b: batching.TrainBatches, steps: int = 6) -> None:
    for step in range(steps):
        x, y = a.batch(step), b.batch(step)
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"step {step} {key}")


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert_dir):
    from sft_jax.models.loading.hf import load_tokenizer

    return load_tokenizer(tiny_bert_dir)


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_llama_dir):
    from sft_jax.models.loading.lm import load_lm_tokenizer

    return load_lm_tokenizer(str(tiny_llama_dir))


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_classification_batches_equal_jsonl(fmt, tmp_path, bert_tokenizer):
    records = sentiment_records(20)
    records[3]["label"] = "neutral"
    jsonl = str(write_jsonl(tmp_path / "data.jsonl", records))
    spec = write_format(fmt, records, tmp_path)

    def batches(spec: str):
        examples = read_classification(spec)
        vocab = batching.LabelVocab.from_examples(examples)
        ds = batching.encode_classification(examples, bert_tokenizer, vocab, 32)
        return examples, batching.TrainBatches(ds, 4, (16, 32), seed=3, pad_id=0)

    (ex_j, b_j), (ex_c, b_c) = batches(jsonl), batches(spec)
    assert [(e.text, e.label) for e in ex_c] == [(e.text, e.label) for e in ex_j]
    file = ex_c[0].where.rsplit(":", 1)[0]
    assert [e.where for e in ex_c[:5]] == [f"{file}:{i}" for i in range(5)]  # rows counted from 0
    _same_batches(b_j, b_c)


def test_int_labels_and_classlabel_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = ["good", "bad", "fine"]
    spec = write_format("parquet", [{"text": t, "label": i % 2} for i, t in enumerate(texts)], tmp_path)
    assert [e.label for e in read_classification(spec)] == ["0", "1", "0"]  # plain ints, as in jsonl
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    ds = datasets.Dataset.from_dict({"text": texts, "label": [1, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "named"))
    ds.to_parquet(str(tmp_path / "named.parquet"))  # names travel in the schema's "huggingface" metadata
    for spec in (str(tmp_path / "named"), str(tmp_path / "named.parquet")):
        assert [e.label for e in read_classification(spec)] == ["positive", "negative", "positive"]
    unlabelled = datasets.Dataset.from_dict({"text": texts, "label": [1, -1, 0]}, features=features)
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(DataError, match=r"data-00000-of-00001\.arrow:1: label -1 outside the dataset's classes"):
        read_classification(str(tmp_path / "unlabelled"))


def _png(colour, size=6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """pics/<i>.png beside a manifest train.jsonl of 12 labelled images; (folder, records, png bytes)."""
    root = tmp_path_factory.mktemp("image_formats")
    (root / "pics").mkdir()
    records, blobs = [], []
    for i in range(12):
        label = list(COLOURS)[i % 3]
        colour = tuple(min(255, c + 2 * i) for c in COLOURS[label])
        blobs.append(_png(colour))
        (root / "pics" / f"{i}.png").write_bytes(blobs[-1])
        records.append({"image": f"pics/{i}.png", "label": label})
    write_jsonl(root / "train.jsonl", records)
    return root, records, blobs


def _image_batches(spec: str):
    records = images.read_image_records(spec)
    vocab = batching.LabelVocab.from_examples(records)
    ds = images.load_images(records, vocab, 8)
    return ds, images.ImageTrainBatches(ds, 4, seed=1, mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=1,
                                        flip=True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cell", ["path", "bytes", "hf_image"])
def test_image_classification_batches_equal_jsonl(fmt, cell, image_files, tmp_path):
    root, records, blobs = image_files
    if cell == "path":  # relative to the data file's folder, as in a manifest
        out = root / f"{fmt}_{tmp_path.name}"
        out.mkdir()
        rows = [dict(r, image=f"../pics/{pathlib.Path(r['image']).name}") for r in records]
        if fmt.startswith("datasets"):  # save_to_disk folders: absolute paths (relative ones are to the shard)
            rows = [dict(r, image=str(root / r["image"])) for r in records]
    else:
        out = tmp_path
        value = (lambda b: b) if cell == "bytes" else (lambda b: {"bytes": b, "path": None})
        rows = [dict(r, image=value(b)) for r, b in zip(records, blobs)]
    if cell == "hf_image" and fmt.startswith("datasets"):  # the `datasets` Image feature itself
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_dict({"image": [b for b in blobs], "label": [r["label"] for r in records]})
        ds = ds.cast_column("image", datasets.Image())
        if fmt == "datasets_dict":
            datasets.DatasetDict(train=ds).save_to_disk(str(out / "dd"))
            spec = str(out / "dd")  # a single split needs no :SPLIT
        else:
            ds.save_to_disk(str(out / "d"))
            spec = str(out / "d")
    else:
        spec = write_format(fmt, rows, out)
    ds_j, b_j = _image_batches(str(root / "train.jsonl"))
    ds_c, b_c = _image_batches(spec)
    np.testing.assert_array_equal(ds_c.images, ds_j.images)
    np.testing.assert_array_equal(ds_c.labels, ds_j.labels)
    _same_batches(b_j, b_c)


def test_bad_image_cells_are_named(tmp_path):
    spec = write_format("parquet", [{"image": _png((1, 2, 3)), "label": "a"}, {"image": b"not a png", "label": "b"}],
                        tmp_path)
    records = images.read_image_records(spec)
    with pytest.raises(DataError, match=rf"^{spec}:1: cannot decode the image bytes"):
        images.load_images(records, batching.LabelVocab(["a", "b"]), 8)
    spec = write_format("parquet", [{"image": 3, "label": "a"}], tmp_path, "int_image")
    with pytest.raises(DataError, match=rf"^{spec}:0: field 'image' must be image bytes, a non-empty path"):
        images.read_image_records(spec)
    spec = write_format("parquet", [{"image": "x.png", "label": "a"}, {"image": None, "label": "a"}], tmp_path,
                        "null_image")
    with pytest.raises(DataError, match=rf"^{spec}:1: missing field 'image'"):
        images.read_image_records(spec)


SFT_RECORDS = ([{"input": f"{i} plus 1?", "output": f"It is {i + 1}."} for i in range(4)]
               + [{"instruction": "Repeat the word.", "input": f"w{i}", "output": f"w{i}"} for i in range(4)]
               + [{"instruction": "Say hi.", "output": "hi"}]
               + [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
                  for i in range(4)])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chat", [False, True], ids=["template", "chat_template"])
def test_sft_batches_equal_jsonl(fmt, chat, tmp_path, llama_tokenizer):
    """Pairs, instructions (with and without input) and chats in one file: each row has nulls where its kind
    has no field, which must read as the field being absent."""
    jsonl = str(write_jsonl(tmp_path / "sft.jsonl", SFT_RECORDS))
    spec = write_format(fmt, SFT_RECORDS, tmp_path, "sft")
    fmt_ = sft_data.PromptFormat(template="Q: {input}\nA: ", chat=chat)

    def batches(spec):
        records = sft_data.read_sft(spec)
        ds = sft_data.encode_sft(records, llama_tokenizer, fmt_, 48)
        return records, batching.TrainBatches(ds, 4, (48,), 5, llama_tokenizer.pad_token_id,
                                              collate=lm_data.make_lm_batch)

    (r_j, b_j), (r_c, b_c) = batches(jsonl), batches(spec)
    strip = lambda r: (r.kind, r.input, r.output, r.instruction, r.messages)  # noqa: E731
    assert [strip(r) for r in r_c] == [strip(r) for r in r_j]
    assert [r.kind for r in r_c] == ["pair"] * 4 + ["instruction"] * 5 + ["chat"] * 4
    _same_batches(b_j, b_c)
    # Percent slices and field mapping work as for jsonl.
    assert [strip(r) for r in sft_data.read_sft(f"{spec}[50%:]")] == [strip(r) for r in r_j[6:]]
    mapped = write_format(fmt, [{"question": "q", "answer": "a"}], tmp_path, "mapped")
    (record,) = sft_data.read_sft(mapped, sft_data.Fields(input="question", output="answer"))
    assert (record.input, record.output) == ("q", "a")


@pytest.mark.parametrize("fmt", FORMATS)
def test_language_model_batches_equal_jsonl(fmt, tmp_path, llama_tokenizer):
    docs = [{"text": f"Document {i}: " + "words and more words. " * (i % 4 + 1)} for i in range(10)]
    jsonl = str(write_jsonl(tmp_path / "docs.jsonl", docs))
    spec = write_format(fmt, docs, tmp_path, "docs")

    def batches(spec):
        ds = lm_data.encode_documents(lm_data.read_documents(spec), llama_tokenizer, 16)
        return batching.TrainBatches(ds, 4, (16,), 7, llama_tokenizer.pad_token_id, collate=lm_data.make_lm_batch)

    _same_batches(batches(jsonl), batches(spec))
    assert [d.text for d in lm_data.read_documents(f"{spec}[80%:]")] == [d["text"] for d in docs[8:]]


def _one_line(fn, *args) -> str:
    with pytest.raises(DataError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("fmt", ["parquet", "arrow_stream", "datasets"])
def test_bad_rows_are_named_by_file_and_row(fmt, tmp_path):
    ok = {"text": "fine", "label": "a"}
    no_label = write_format(fmt, [ok, ok, {"text": "x", "label": None}], tmp_path, "no_label")
    file = f"{no_label}/data-00000-of-00001.arrow" if fmt == "datasets" else no_label  # the shard holding the row
    assert _one_line(read_classification, no_label) == f"{file}:2: missing field 'label' (record has ['text'])"
    wrong = write_format(fmt, [{"text": "x", "label": 1.5}], tmp_path, "float_label")  # a column has one type
    assert ":0: field 'label' must be a string or an int, got float" in _one_line(read_classification, wrong)
    missing = write_format(fmt, [{"body": "x", "label": "a"}], tmp_path, "no_text_column")
    assert ":0: missing field 'text' (record has ['body', 'label'])" in _one_line(read_classification, missing)
    int_text = write_format(fmt, [{"text": 5, "label": "a"}], tmp_path, "int_text")
    assert ":0: field 'text' must be a string, got int" in _one_line(lm_data.read_documents, int_text)
    no_output = write_format(fmt, [{"input": "q", "output": "a"}, {"input": "q", "output": None}], tmp_path, "sft")
    assert ":1: missing field 'output'" in _one_line(sft_data.read_sft, no_output)
    bad_chat = write_format(fmt, [{"messages": [{"role": "user", "content": "hi"}]}], tmp_path, "chat")
    assert ":0: the chat has no assistant message" in _one_line(sft_data.read_sft, bad_chat)
    empty = write_format(fmt, [{"text": " "}], tmp_path, "empty")
    assert ":0: field 'text' is empty" in _one_line(lm_data.read_documents, empty)


def test_unreadable_files_and_folders(tmp_path):
    garbage = tmp_path / "x.parquet"
    garbage.write_bytes(b"PAR1 not really")
    assert _one_line(read_classification, str(garbage)).startswith(f"{garbage}: cannot read (")
    garbage = tmp_path / "x.arrow"
    garbage.write_bytes(b"nope")
    assert _one_line(lm_data.read_documents, str(garbage)).startswith(f"{garbage}: cannot read (")
    none = tmp_path / "none.parquet"
    assert _one_line(sft_data.read_sft, str(none)) == f"{none}: file not found"
    spec = write_format("parquet", [{"text": "a", "label": "b"}] * 3, tmp_path)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(pathlib.Path(spec).read_bytes()[:-20])
    assert _one_line(read_classification, str(truncated)).startswith(f"{truncated}: cannot read (")
    folder = tmp_path / "saved"
    write_format("datasets", [{"text": "a", "label": "b"}], tmp_path, "saved")
    (folder.with_name("saved_datasets") / "data-00000-of-00001.arrow").unlink()
    assert "data-00000-of-00001.arrow (listed in" in _one_line(read_classification, str(tmp_path / "saved_datasets"))


def test_datasetdict_split_selection(tmp_path):
    datasets = pytest.importorskip("datasets")
    split = {name: datasets.Dataset.from_list([{"text": f"{name} {i}", "label": "a"} for i in range(n)])
             for name, n in (("train", 3), ("validation", 2))}
    folder = tmp_path / "dd"
    datasets.DatasetDict(split).save_to_disk(str(folder))
    assert [e.text for e in read_classification(f"{folder}:validation")] == ["validation 0", "validation 1"]
    assert len(read_classification(f"{folder}:train")) == 3
    assert _one_line(read_classification, str(folder)) == (
        f"{folder}: a DatasetDict folder with splits ['train', 'validation']; choose one with {folder}:SPLIT "
        f"(e.g. {folder}:train)")
    assert _one_line(lm_data.read_documents, f"{folder}:test") == (
        f"{folder}:test: no split 'test' in {folder / 'dataset_dict.json'} (splits: ['train', 'validation'])")
    # A split folder is itself a Dataset folder.
    assert len(sft_data.read_sft(str(folder / "validation"), sft_data.Fields(input="text", output="label"))) == 2


def test_sharded_save_to_disk_reads_shards_in_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = sentiment_records(10)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "sharded"), num_shards=3)
    examples = read_classification(str(tmp_path / "sharded"))
    assert [e.text for e in examples] == [r["text"] for r in records]
    assert len({e.where.rsplit(":", 1)[0] for e in examples}) == 3


def test_training_from_a_datasets_folder_equals_jsonl(tiny_config, tmp_path):
    """A whole run: a DatasetDict folder copied from the jsonl trains to the same parameters."""
    from sft_jax.train import train_and_evaluate

    tiny_config.max_steps = 2
    results = {"jsonl": train_and_evaluate(tiny_config, str(tmp_path / "jsonl"))}
    for name in ("train", "eval"):
        rows = [json.loads(line) for line in pathlib.Path(tiny_config.data[name]).read_text().splitlines()]
        setattr(tiny_config.data, name, write_format("datasets_dict", rows, tmp_path, name))
    results["datasets"] = train_and_evaluate(tiny_config, str(tmp_path / "datasets"))
    assert results["datasets"]["params_fingerprint"] == results["jsonl"]["params_fingerprint"]
    assert results["datasets"]["eval/accuracy"] == results["jsonl"]["eval/accuracy"]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A real `datasets` cache of a local dataset with train and test splits, its folder renamed to what a hub
    download of "myorg/tiny" is called (ORG___NAME); HF_DATASETS_CACHE points at it."""
    datasets = pytest.importorskip("datasets")
    source = tmp_path / "src" / "tiny" / "data"
    source.mkdir(parents=True)
    write_jsonl(source / "train.jsonl", sentiment_records(6))
    write_jsonl(source / "test.jsonl", sentiment_records(2, offset=6))
    cache = tmp_path / "cache"
    datasets.load_dataset(str(source.parent), cache_dir=str(cache))
    (cache / "tiny").rename(cache / "myorg___tiny")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def test_hf_spec_reads_the_local_datasets_cache(hf_cache):
    texts = [r["text"] for r in sentiment_records(8)]
    assert [e.text for e in read_classification("hf:myorg/tiny:train")] == texts[:6]
    assert [e.text for e in read_classification("hf:myorg/tiny:default:test")] == texts[6:]
    assert [d.text for d in lm_data.read_documents("hf:myorg/tiny:test")] == texts[6:]
    where = read_classification("hf:myorg/tiny:train")[1].where
    assert where.startswith(str(hf_cache / "myorg___tiny" / "default")) and where.endswith("tiny-train.arrow:1")
    assert _one_line(read_classification, "hf:myorg/tiny") == (
        "hf:myorg/tiny: cached splits ['train', 'test']; choose one with hf:myorg/tiny:default:SPLIT")
    assert "no split 'validation' in the local cache" in _one_line(read_classification, "hf:myorg/tiny:validation")
    assert _one_line(read_classification, "hf:other/absent:train") == (
        f"hf:other/absent:train: not in the local Hugging Face datasets cache (looked for "
        f"{hf_cache / 'other___absent'}) and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid downloading it")


def test_hf_spec_downloads_what_the_cache_lacks_where_the_hub_may_be_used(hf_cache, tmp_path, monkeypatch):
    """The hub is stood in for by a local dataset: load_dataset("myorg/other") fills the cache as a download
    would (ORG___NAME/CONFIG/VERSION/HASH), once; a failed download is one line."""
    datasets = pytest.importorskip("datasets")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    source = tmp_path / "hub" / "other" / "data"
    source.mkdir(parents=True)
    write_jsonl(source / "train.jsonl", sentiment_records(3, offset=20))
    real_load, calls = datasets.load_dataset, []

    def load_dataset(name, config=None, cache_dir=None):
        calls.append((name, config, cache_dir))
        if name != "myorg/other":
            raise ConnectionError(f"cannot reach the hub for {name}\n(details)")
        real_load(str(source.parent), config, cache_dir=cache_dir)
        pathlib.Path(cache_dir, "other").rename(pathlib.Path(cache_dir, "myorg___other"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    expected = [r["text"] for r in sentiment_records(3, offset=20)]
    assert [e.text for e in read_classification("hf:myorg/other:train")] == expected
    assert [e.text for e in read_classification("hf:myorg/other")] == expected  # cached now: no second download
    assert calls == [("myorg/other", None, str(hf_cache))]
    assert [e.text for e in read_classification("hf:myorg/tiny:train")][:1] == [sentiment_records(1)[0]["text"]]
    assert len(calls) == 1  # a cached dataset is never downloaded
    assert _one_line(read_classification, "hf:myorg/gone:train") == (
        f"hf:myorg/gone:train: not in the local Hugging Face datasets cache (looked for {hf_cache / 'myorg___gone'}) "
        "and the download failed (ConnectionError: cannot reach the hub for myorg/gone)")


def test_hf_spec_reads_shards_in_order(hf_cache):
    (data_dir,) = (hf_cache / "myorg___tiny" / "default").glob("*/*/")
    train = data_dir / "tiny-train.arrow"
    test = data_dir / "tiny-test.arrow"
    for i, source in ((10, train), (2, test), (1, train)):  # read by shard index
        (data_dir / f"tiny-train-{i:05d}-of-00011.arrow").write_bytes(source.read_bytes())
    train.unlink()
    texts = [e.text for e in read_classification("hf:myorg/tiny:train")]
    assert texts == [r["text"] for r in sentiment_records(6) + sentiment_records(2, offset=6) + sentiment_records(6)]


@pytest.mark.parametrize("fmt", ["parquet", "arrow_file", "datasets_dict"])
def test_predict_input_reads_the_formats(fmt, tmp_path):
    from sft_jax.predict.__main__ import _read_texts

    spec = write_format(fmt, [{"text": "one", "id": 1}, {"text": "two", "id": 2}], tmp_path)
    assert _read_texts(spec) == ["one", "two"]
    bad = write_format(fmt, [{"text": "one"}, {"text": None}], tmp_path, "bad")
    assert ":1: expected an object with a string field 'text'" in _one_line(_read_texts, bad)
