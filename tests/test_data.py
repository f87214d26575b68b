"""Readers (jsonl / tsv / csv / tfds), label vocabulary, tokenization and deterministic batching."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from sft_jax.data import batching
from sft_jax.data.sources import DataError, Example, read_classification

CLS, SEP, PAD = 101, 102, 0

# Texts that stress each format: a comma (csv quoting), bare double quotes (GLUE-style tsv), unicode.
TEXTS = [
    "a good, warm film",
    'the so-called "thriller" is dull',
    'a 5" screen would be too big',
    "café au lait, très bien",
    "plain words only",
    "it's fine",
]


def _pairs(examples: list[Example]) -> list[tuple[str, str]]:
    return [(e.text, e.label) for e in examples]


def _write_all_formats(tmp_path: pathlib.Path, labels: list) -> dict[str, pathlib.Path]:
    """The same records as .jsonl (labels as given), .tsv (unquoted) and .csv (quoted where needed)."""
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, labels)),
                     encoding="utf-8")
    tsv = tmp_path / "data.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(TEXTS, labels)), encoding="utf-8")

    def csv_field(t: str) -> str:  # written by hand rather than by csv.writer: what people's files look like
        return '"' + t.replace('"', '""') + '"' if ("," in t or '"' in t) else t

    csv = tmp_path / "data.csv"
    # Label column first and CRLF line ends (spreadsheet exports) to check columns are found by name.
    csv.write_bytes(("label,text\r\n" + "".join(f"{y},{csv_field(t)}\r\n" for t, y in zip(TEXTS, labels)))
                    .encode("utf-8"))
    return {"jsonl": jsonl, "tsv": tsv, "csv": csv}


@pytest.mark.parametrize(
    "labels, expected_vocab",
    [
        (["positive", "negative", "positive", "neutral", "negative", "positive"], ["negative", "neutral", "positive"]),
        ([10, 2, 1, 2, 10, 1], ["1", "2", "10"]),  # numeric order, not "1" < "10" < "2"
    ],
    ids=["string_labels", "int_labels"],
)
def test_jsonl_tsv_csv_read_the_same(tmp_path, labels, expected_vocab):
    paths = _write_all_formats(tmp_path, labels)
    read = {fmt: read_classification(str(p)) for fmt, p in paths.items()}
    expected = [(t, str(y)) for t, y in zip(TEXTS, labels)]
    for fmt, examples in read.items():
        assert _pairs(examples) == expected, fmt
        assert batching.LabelVocab.from_examples(examples).labels == expected_vocab, fmt
    # `where` points at the physical line (the header is line 1 in tsv/csv).
    assert read["jsonl"][2].where == f"{paths['jsonl']}:3"
    assert read["tsv"][2].where == f"{paths['tsv']}:4"
    assert read["csv"][2].where == f"{paths['csv']}:4"


def test_csv_quoted_comma_and_tsv_bare_quotes(tmp_path):
    csv = tmp_path / "q.csv"
    csv.write_text('text,label\n"good, really good",pos\n"she said ""wow""",pos\nbad,neg\n', encoding="utf-8")
    assert _pairs(read_classification(str(csv))) == [
        ("good, really good", "pos"), ('she said "wow"', "pos"), ("bad", "neg")]
    tsv = tmp_path / "q.tsv"
    tsv.write_text('sentence\tlabel\n"quoted" at the start\t1\nan unbalanced " quote\t0\n', encoding="utf-8")
    assert _pairs(read_classification(str(tsv), text_field="sentence")) == [
        ('"quoted" at the start', "1"), ('an unbalanced " quote', "0")]


def test_custom_fields_extra_columns_and_blank_lines(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"review": "good", "stars": 5, "id": 1}\n\n{"review": "bad", "stars": 1, "id": 2}\n')
    ex = read_classification(str(jsonl), text_field="review", label_field="stars")
    assert _pairs(ex) == [("good", "5"), ("bad", "1")]
    assert ex[1].where.endswith(":3")
    tsv = tmp_path / "d.tsv"
    tsv.write_text("idx\tsentence\tlabel\n0\tgood\t1\n\n1\tbad\t0\n")
    assert _pairs(read_classification(str(tsv), text_field="sentence")) == [("good", "1"), ("bad", "0")]


def test_byte_order_mark_is_ignored(tmp_path):
    # Spreadsheets' "CSV UTF-8" export and some editors start files with a BOM.
    bom = b"\xef\xbb\xbf"
    (tmp_path / "b.csv").write_bytes(bom + b"text,label\ngood,1\nbad,0\n")
    (tmp_path / "b.tsv").write_bytes(bom + b"text\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    for ext in ("csv", "tsv", "jsonl"):
        assert _pairs(read_classification(str(tmp_path / f"b.{ext}"))) == [("good", "1"), ("bad", "0")], ext


def test_label_vocab_round_trip(tmp_path):
    vocab = batching.LabelVocab(["negative", "positive", "neutral"])
    vocab.save(tmp_path / "labels.json")
    loaded = batching.LabelVocab.load(tmp_path / "labels.json")
    assert loaded.labels == vocab.labels and len(loaded) == 3
    assert [loaded.encode(y, "x:1") for y in ("negative", "positive", "neutral")] == [0, 1, 2]


def test_label_vocab_unknown_label_names_where():
    vocab = batching.LabelVocab(["negative", "positive"])
    with pytest.raises(DataError, match=r"^dev\.jsonl:7: label 'neutral' is not one of the training labels"):
        vocab.encode("neutral", "dev.jsonl:7")
    ex = [Example("a", "positive", "dev.jsonl:1"), Example("b", "neutral", "dev.jsonl:2")]
    with pytest.raises(DataError, match=r"dev\.jsonl:2: label 'neutral'"):
        batching.encode_classification(ex, tokenizer=None, vocab=vocab, max_length=8)


def test_label_vocab_needs_two_labels():
    ex = [Example("a", "positive", "train.jsonl:1"), Example("b", "positive", "train.jsonl:2")]
    with pytest.raises(DataError, match=r"train\.jsonl: found 1 label"):
        batching.LabelVocab.from_examples(ex)
    with pytest.raises(ValueError, match="duplicate"):
        batching.LabelVocab(["a", "a"])


# ----------------------------------------------------------------------------------------------- batching


def _synthetic(n: int, max_len: int = 30, seed: int = 0) -> batching.EncodedDataset:
    """Example i is [CLS, 1000 + i, 7, ..., SEP] with a random length, so a row tells which example it is."""
    lengths = np.random.default_rng(seed).integers(3, max_len + 1, size=n)
    ids = [np.array([CLS, 1000 + i] + [7] * (int(n_tok) - 3) + [SEP], np.int32) for i, n_tok in enumerate(lengths)]
    return batching.EncodedDataset(input_ids=ids, labels=np.arange(n, dtype=np.int32) % 3,
                                   where=[f"synthetic.jsonl:{i + 1}" for i in range(n)])


def _row_ids(batch: dict[str, np.ndarray]) -> list[int]:
    return [int(x) - 1000 for x, w in zip(batch["input_ids"][:, 1], batch["weights"]) if w > 0]


def _assert_well_formed(batch, ds, batch_size, buckets):
    seq_len = batch["input_ids"].shape[1]
    assert seq_len in buckets
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (batch_size, seq_len)
    assert batch["labels"].shape == batch["weights"].shape == (batch_size,)
    rows = _row_ids(batch)
    # The smallest bucket that holds the longest example.
    longest = max(len(ds.input_ids[i]) for i in rows)
    assert seq_len == min(b for b in buckets if b >= longest)
    for r, i in enumerate(rows):
        n_tok = len(ds.input_ids[i])
        assert batch["attention_mask"][r].tolist() == [1] * n_tok + [0] * (seq_len - n_tok)
        np.testing.assert_array_equal(batch["input_ids"][r, :n_tok], ds.input_ids[i])
        assert (batch["input_ids"][r, n_tok:] == PAD).all()
        assert batch["labels"][r] == ds.labels[i]


BUCKETS = (8, 16, 32)


def test_train_batches_deterministic_per_seed():
    ds = _synthetic(50)
    a = batching.TrainBatches(ds, 8, BUCKETS, seed=3, pad_id=PAD)
    b = batching.TrainBatches(ds, 8, BUCKETS, seed=3, pad_id=PAD)
    steps = range(3 * a.steps_per_epoch)
    for step in steps:
        ba, bb = a.batch(step), b.batch(step)
        assert ba.keys() == bb.keys()
        for k in ba:
            np.testing.assert_array_equal(ba[k], bb[k], err_msg=f"step {step} {k}")
    other = batching.TrainBatches(ds, 8, BUCKETS, seed=4, pad_id=PAD)
    assert [_row_ids(a.batch(s)) for s in steps] != [_row_ids(other.batch(s)) for s in steps]


@pytest.mark.parametrize("group_window", [50, 1])
def test_train_batches_each_example_once_per_epoch(group_window):
    ds = _synthetic(50)  # 6 batches of 8 per epoch; 2 examples dropped (a different 2 each epoch)
    tb = batching.TrainBatches(ds, 8, BUCKETS, seed=0, pad_id=PAD, group_window=group_window)
    assert tb.steps_per_epoch == 6
    epochs = []
    for epoch in range(3):
        batches = [tb.batch(epoch * 6 + i) for i in range(6)]
        seen = [i for b in batches for i in _row_ids(b)]
        assert len(seen) == 48 and len(set(seen)) == 48 and set(seen) <= set(range(50))
        for b in batches:
            assert (b["weights"] == 1).all()  # training batches have no padding rows
            _assert_well_formed(b, ds, 8, BUCKETS)
        epochs.append([tuple(_row_ids(b)) for b in batches])
    assert epochs[0] != epochs[1] != epochs[2]
    if group_window == 1:  # pure shuffling: even the batches' contents change between epochs
        assert set(epochs[0]) != set(epochs[1])


def test_train_batches_resume_by_step():
    ds = _synthetic(37)
    sequential = batching.TrainBatches(ds, 4, BUCKETS, seed=11, pad_id=PAD)
    reached = [sequential.batch(s) for s in range(25)]  # crosses two epoch boundaries (9 steps per epoch)
    for step in reversed(range(25)):  # a fresh object (a resumed run), visited out of order
        fresh = batching.TrainBatches(ds, 4, BUCKETS, seed=11, pad_id=PAD).batch(step)
        for k in fresh:
            np.testing.assert_array_equal(fresh[k], reached[step][k], err_msg=f"step {step} {k}")


def test_length_grouping_uses_short_buckets():
    ds = _synthetic(200, max_len=32)
    tb = batching.TrainBatches(ds, 8, BUCKETS, seed=0, pad_id=PAD)
    padded = sum(tb.batch(s)["input_ids"].size for s in range(tb.steps_per_epoch))
    no_grouping = batching.TrainBatches(ds, 8, BUCKETS, seed=0, pad_id=PAD, group_window=1)
    padded_random = sum(no_grouping.batch(s)["input_ids"].size for s in range(tb.steps_per_epoch))
    assert padded < padded_random


def test_train_batches_fewer_examples_than_batch():
    with pytest.raises(DataError, match=r"synthetic\.jsonl: 5 training examples, fewer than batch_size=8"):
        batching.TrainBatches(_synthetic(5), 8, BUCKETS, seed=0, pad_id=PAD)


def test_eval_batches_cover_all_with_zero_weight_padding():
    ds = _synthetic(21)
    out = list(batching.eval_batches(ds, 8, BUCKETS, pad_id=PAD))
    assert [len(idx) for idx, _ in out] == [8, 8, 5]
    assert sorted(np.concatenate([idx for idx, _ in out]).tolist()) == list(range(21))
    for idx, b in out:
        assert _row_ids(b) == idx.tolist()  # rows follow idx
        _assert_well_formed(b, ds, 8, BUCKETS)
    _, last = out[-1]
    assert last["weights"].tolist() == [1.0] * 5 + [0.0] * 3
    assert (last["attention_mask"][5:] == 0).all() and (last["input_ids"][5:] == PAD).all()
    # Sorted by length, so the early batches use short buckets.
    lens = [b["input_ids"].shape[1] for _, b in out]
    assert lens == sorted(lens)


def test_bucket_length():
    assert [batching.bucket_length(n, (32, 8, 16)) for n in (1, 8, 9, 16, 32)] == [8, 8, 16, 16, 32]
    with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
        batching.bucket_length(33, (8, 16, 32))


# -------------------------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer():
    from sft_jax.models.loading.hf import load_tokenizer
    from sft_jax.models.registry import resolve_model_dir

    try:
        return load_tokenizer(resolve_model_dir("minilm-l6"))
    except ValueError as e:
        pytest.skip(str(e))


def test_tokenize_truncates_keeping_final_sep(tokenizer):
    long_text = " ".join(["word"] * 50)
    ids, cut = batching.tokenize(tokenizer, [long_text, "short one"], max_length=10)
    assert cut == 1
    assert len(ids[0]) == 10 and ids[0].dtype == np.int32
    assert ids[0][0] == tokenizer.cls_token_id and ids[0][-1] == tokenizer.sep_token_id
    full = tokenizer(long_text)["input_ids"]
    assert ids[0][:9].tolist() == full[:9]
    assert ids[1].tolist() == tokenizer("short one")["input_ids"]  # short texts untouched
    assert ids[1][-1] == tokenizer.sep_token_id


def test_encode_classification(tokenizer):
    ex = [Example("good " * 40, "positive", "t.jsonl:1"), Example("bad", "negative", "t.jsonl:2")]
    vocab = batching.LabelVocab.from_examples(ex)
    ds = batching.encode_classification(ex, tokenizer, vocab, max_length=16)
    assert len(ds) == 2 and ds.labels.tolist() == [1, 0] and ds.where == ["t.jsonl:1", "t.jsonl:2"]
    assert ds.lengths.tolist() == [16, 3]
    assert ds.input_ids[0][-1] == tokenizer.sep_token_id


# ---------------------------------------------------------------------------------------------------- tfds

TFDS_TRAIN, TFDS_TEST = 32, 12


def _tfds_builder_class():
    tfds = pytest.importorskip("tensorflow_datasets")

    class SftJaxTinySentiment(tfds.core.GeneratorBasedBuilder):
        """GLUE/SST-2-shaped: a `sentence` text and a ClassLabel `label`."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # DatasetInfo directly: dataset_info_from_configs needs the builder to live in a package.
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "sentence": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["negative", "positive"]),
            }))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(0, TFDS_TRAIN),
                    "test": self._generate_examples(TFDS_TRAIN, TFDS_TEST)}

        def _generate_examples(self, start, n):
            for i in range(start, start + n):
                if i % 2:
                    yield i, {"sentence": f"bad movie number {i}, dull", "label": "negative"}
                else:
                    yield i, {"sentence": f"good movie number {i}, great", "label": "positive"}

    return SftJaxTinySentiment


@pytest.fixture(scope="module")
def tfds_dataset(tmp_path_factory):
    """(name, data_dir) of a tiny TFDS dataset built offline (no tensorflow needed: array_record)."""
    builder_cls = _tfds_builder_class()
    data_dir = tmp_path_factory.mktemp("tfds")
    builder_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return builder_cls.name, str(data_dir)


def test_tfds_source(tfds_dataset):
    name, data_dir = tfds_dataset
    train = read_classification(f"tfds:{name}:train", data_dir=data_dir)
    test = read_classification(f"tfds:{name}:test", data_dir=data_dir)
    assert len(train) == TFDS_TRAIN and len(test) == TFDS_TEST
    for e in train + test:
        number = int(e.text.split()[3].rstrip(","))
        assert e.label == ("negative" if number % 2 else "positive")  # ClassLabel ids mapped to names
        assert e.where.startswith(f"tfds:{name}:")
    assert sorted(int(e.text.split()[3].rstrip(",")) for e in train) == list(range(TFDS_TRAIN))
    assert batching.LabelVocab.from_examples(train).labels == ["negative", "positive"]
    # No split: train. TFDS slicing syntax (with its own colon) works too.
    assert _pairs(read_classification(f"tfds:{name}", data_dir=data_dir)) == _pairs(train)
    assert _pairs(read_classification(f"tfds:{name}:train[:25%]", data_dir=data_dir)) == _pairs(train[:8])


def test_tfds_unavailable(tfds_dataset):
    name, data_dir = tfds_dataset
    with pytest.raises(DataError, match=rf"^tfds:{name}:nosuchsplit: cannot open TFDS dataset") as info:
        read_classification(f"tfds:{name}:nosuchsplit", data_dir=data_dir)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"^tfds:sft_jax_no_such_dataset:train: cannot open TFDS dataset") as info:
        read_classification("tfds:sft_jax_no_such_dataset:train", data_dir=data_dir)
    assert "\n" not in str(info.value)  # not TFDS's list of every dataset it knows
    with pytest.raises(DataError, match=r"expected tfds:NAME\[:SPLIT\]"):
        read_classification("tfds:", data_dir=data_dir)


def test_train_from_tfds(tfds_dataset, tiny_config, tmp_path):
    from sft_jax.train import train_and_evaluate

    name, data_dir = tfds_dataset
    c = tiny_config
    c.data.train, c.data.eval, c.data.tfds_data_dir = f"tfds:{name}:train", f"tfds:{name}:test", data_dir
    c.max_steps, c.eval_every, c.checkpoint_every = 2, 2, 2
    workdir = tmp_path / "run"
    results = train_and_evaluate(c, str(workdir))
    assert results["step"] == 2
    assert results["train_examples"] == TFDS_TRAIN and results["eval_examples"] == TFDS_TEST
    assert results["num_labels"] == 2
    assert 0.0 <= results["eval/accuracy"] <= 1.0 and np.isfinite(results["eval/loss"])
    assert json.loads((workdir / "labels.json").read_text())["labels"] == ["negative", "positive"]
    assert json.loads((workdir / "results.json").read_text())["step"] == 2
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "train/loss" in m] == [1, 2]
