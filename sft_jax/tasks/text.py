"""text_classification: {"text", "label"} records, an encoder (BERT, RoBERTa, XLM-RoBERTa, ModernBERT) with a
fresh head, the STS-B probe."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sft_jax import distributed, regularizers
from sft_jax.data import batching, mixture, random_access
from sft_jax.data import lm as lm_data
from sft_jax.data.sources import DataError, make_example, read_classification
from sft_jax.data.streaming import streamed_batches
from sft_jax.evaluate.stsb import stsb_spearman
from sft_jax.flops import FlopsModel
from sft_jax.losses import classification_loss, simcse_loss
from sft_jax.models.classifier import EncoderClassifier, bert_layout
from sft_jax.models.loading.hf import load_encoder, load_encoder_config, load_tokenizer
from sft_jax.models.loading.tokenizers import check_fits
from sft_jax.models.registry import resolve_model_dir
from sft_jax.rundir import RunDir
from sft_jax.state import ModelDef
from sft_jax.tasks import classification
from sft_jax.tasks.registry import register


class TextClassifier:
    """An encoder classifier as `config` describes it, with pre-trained encoder weights and a fresh head of
    `num_labels` classes (and, for strategy=lora, adapters on the encoder's projections): `model_def`, `params`,
    `layout`, `tokenizer`, `max_length`. `config` may be a run's config.json (`sft_jax.predict`)."""

    def __init__(self, config: ml_collections.ConfigDict, num_labels: int):
        self.model_dir = resolve_model_dir(config.model)
        # .get: a run's config.json from before these keys existed has neither.
        encoder, encoder_config = load_encoder(self.model_dir, dtype=jnp.dtype(config.dtype),
                                               ignore=tuple(config.get("ignore_weights", ())))
        self.tokenizer = load_tokenizer(self.model_dir, config.get("tokenizer", ""))
        self.max_length = min(config.max_length, encoder_config.max_length)
        module = EncoderClassifier(encoder, encoder_config.hidden_size, num_labels, pooling=config.pooling,
                                   dropout=config.head_dropout, rngs=nnx.Rngs(config.seed))
        classification.add_lora(module, config)
        self.model_def, self.params = ModelDef.split(module)
        # ModernBERT keeps BERT's embeddings / layers paths; its final norm, outside both, learns unless `head`.
        self.layout = bert_layout(encoder_config.num_hidden_layers)


def embed_fn(model_def: ModelDef):
    """Jitted mean-pooled embedding: the encoder part of the classifier."""
    return jax.jit(lambda params, ids, mask: model_def.merge(params).embed(ids, mask))


@register("text_classification")
class TextClassification(classification.ClassificationTask):
    """Text classification; forgetting is the STS-B Spearman correlation of the encoder's embeddings, and
    EWC's Fisher is that of unsupervised SimCSE on sentences of `regularizer.fisher_data`."""

    higher_is_better = {"stsb_spearman": True}
    streams = True
    mixture_formats = ("",)

    def __init__(self, config: ml_collections.ConfigDict, rundir: RunDir):
        self.config = config
        # Data first: bad input must stop the run before a model is loaded.
        model_dir = resolve_model_dir(config.model)
        self.tokenizer = load_tokenizer(model_dir, config.tokenizer)
        encoder_config = load_encoder_config(model_dir)
        check_fits(self.tokenizer, encoder_config.vocab_size, config.tokenizer or str(model_dir))
        positions = encoder_config.max_length  # RoBERTa's table starts at pad_token_id + 1
        if config.max_length > positions:  # past the position table a gather would silently clamp
            raise ValueError(f"config.max_length={config.max_length} exceeds the model's {positions} positions "
                             f"({config.model})")
        if encoder_config.position_offset and self.tokenizer.pad_token_id != encoder_config.pad_token_id:
            # RoBERTa positions count the ids that are not pad_token_id: another pad id would shift them.
            raise ValueError(f"{config.model}: tokenizer pad id {self.tokenizer.pad_token_id} differs from "
                             f"pad_token_id {encoder_config.pad_token_id} of config.json")
        self.encoder_config = encoder_config
        self.vocab, self.train_ds, self.eval_ds = self._load_data(rundir)
        model = TextClassifier(config, len(self.vocab))
        if distributed.is_primary():
            rundir.write_labels(self.vocab)
        self.model_def, self.params, self.layout = model.model_def, model.params, model.layout
        self.loss_fn = classification_loss
        self.pad_id = self.tokenizer.pad_token_id
        if config.data.streaming:
            self.batches = streamed_batches(config, self.train_ds, self._encode_records, self.pad_id)
        elif config.data.mixture:
            self.batches = mixture.mixture_batches(config, self.train_ds, self.pad_id)
            self.train_ds = self.batches.ds
        else:
            self.batches = batching.TrainBatches(self.train_ds, config.batch_size, config.buckets, config.seed,
                                                 self.pad_id, group_window=config.data.group_window)
        self.summary = {"train_examples": len(self.train_ds), "eval_examples": len(self.eval_ds),
                        "num_labels": len(self.vocab), "data/eval_truncated": self.eval_ds.truncated}
        if not config.data.streaming:  # a stream meets its long texts as it reads them
            self.summary["data/train_truncated"] = self.train_ds.truncated
        if config.data.mixture:
            self.summary.update(self.batches.summary())
        self._embed = embed_fn(self.model_def)

    def _load_data(self, rundir: RunDir):
        """Reads and tokenizes train and eval data; the label vocabulary comes from train (or the workdir)."""
        d = self.config.data
        read = dict(text_field=d.text_field, label_field=d.label_field, data_dir=d.tfds_data_dir)
        eval_ex = read_classification(d.eval, **read)
        if d.mixture:
            return self._load_mixture(rundir, eval_ex, read)
        if d.streaming:  # one pass checks every record and finds the labels; the records stay on disk
            train_ex = (make_example(r, where, d.text_field, d.label_field) for where, r in random_access.scan(d.train))
            train_ds = random_access.open_records(d.train)
        else:
            train_ex = read_classification(d.train, **read)
        vocab = classification.label_vocab(d.train, rundir, train_ex, tuple(d.labels))
        # Encoding the eval set first checks its labels before any time is spent on training.
        length = self.config.max_length
        if d.validation_fraction:  # evaluations select on examples carved from train; data.eval is reported
            self.test_data = {"eval_ds": batching.encode_classification(eval_ex, self.tokenizer, vocab, length,
                                                                        d.too_long)}
            train_ex, eval_ex = batching.carve_validation(train_ex, d.validation_fraction, self.config.seed)
        eval_ds = batching.encode_classification(eval_ex, self.tokenizer, vocab, length, d.too_long)
        if not d.streaming:
            train_ex = batching.subsample(train_ex, d.max_train_examples, self.config.seed)
            train_ds = batching.encode_classification(train_ex, self.tokenizer, vocab, length, d.too_long)
        return vocab, train_ds, eval_ds

    def _load_mixture(self, rundir: RunDir, eval_ex: list, read: dict):
        """(vocab, [training examples of each source], eval) of `data.mixture`: the labels of every source make
        one vocabulary (one head); each source's own evaluation data becomes `source_evals`."""
        c = self.config
        sources = mixture.sources(c)
        parts = [read_classification(s.train, **read) for s in sources]
        vocab = classification.label_vocab(", ".join(s.train for s in sources), rundir,
                                           [e for part in parts for e in part], tuple(c.data.labels))

        def encode(examples):
            return batching.encode_classification(examples, self.tokenizer, vocab, c.max_length, c.data.too_long)

        eval_ds = encode(eval_ex)
        self.source_evals = {s.name: {"eval_ds": encode(read_classification(s.eval, **read))}
                             for s in sources if s.eval}
        return vocab, [encode(part) for part in parts], eval_ds

    def _encode_records(self, items: list[tuple[str, dict]]) -> batching.EncodedDataset:
        """A streamed batch's records, checked and tokenized as in memory (`too_long` applies per record)."""
        d = self.config.data
        examples = [make_example(r, where, d.text_field, d.label_field) for where, r in items]
        labels = np.array([self.vocab.encode(e.label, e.where) for e in examples], np.int32)
        where = [e.where for e in examples]
        ids, cut = batching.tokenize(self.tokenizer, [e.text for e in examples], self.config.max_length, where,
                                     d.too_long)
        return batching.EncodedDataset(ids, labels, where, cut)

    def evaluate(self, eval_fn, params, step: int | None = None) -> dict[str, float]:
        return classification.evaluate(eval_fn, params, self.eval_ds, batch_size=self.config.eval_batch_size,
                                       buckets=self.config.buckets, pad_id=self.pad_id, num_labels=len(self.vocab))

    def batch_tokens(self, batch: dict[str, np.ndarray]) -> int:
        return int(np.count_nonzero(batch["attention_mask"]))

    def reference_inputs(self, count: int, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        batch = batching.make_batch(self.eval_ds, np.arange(min(count, len(self.eval_ds))), rows, self.config.buckets,
                                    self.pad_id)
        return batch, batch["attention_mask"]

    def reference_forward(self, model, batch: dict[str, jax.Array]) -> None:
        model.encoder(batch["input_ids"], batch["attention_mask"])  # its blocks' outputs are what is recorded

    def flops_model(self, trainable: tuple[str, ...]) -> FlopsModel:
        c = self.encoder_config
        return FlopsModel({k: tuple(v.shape) for k, v in self.params.items()}, tuple(trainable),
                          {"layers": c.num_hidden_layers, "width": c.hidden_size, "causal": False})

    def fisher(self, params: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        return regularizers.empirical_fisher(self.model_def, params, names, simcse_loss, self._fisher_batches(),
                                             seed=self.config.seed)

    def _fisher_batches(self) -> list[dict]:
        """Batches of sentences (lines of at least 5 words) of regularizer.fisher_data, drawn with the seed."""
        r = self.config.regularizer
        lines = [line.strip() for doc in lm_data.read_documents(r.fisher_data, self.config.data.text_field)
                 for line in doc.text.splitlines()]
        lines = [t for t in lines if len(t.split()) >= 5 and not t.startswith("=")]
        n = r.fisher_batches * r.fisher_batch_size
        if len(lines) < n:
            raise DataError(f"{r.fisher_data}: {len(lines)} sentences of 5+ words, fewer than fisher_batches x "
                            f"fisher_batch_size = {n}")
        pick = np.random.default_rng(self.config.seed).permutation(len(lines))[:n]
        ids, _ = batching.tokenize(self.tokenizer, [lines[i] for i in pick], self.config.max_length)
        ds = batching.EncodedDataset(ids, np.zeros(n, np.int32), [""] * n)
        size = r.fisher_batch_size
        return [batching.make_batch(ds, np.arange(i, i + size), size, self.config.buckets, self.pad_id)
                for i in range(0, n, size)]

    def probes(self, params: dict) -> dict[str, float]:
        if not self.config.forgetting.stsb:
            return {}
        return {"stsb_spearman": stsb_spearman(lambda i, m: self._embed(params, i, m), self.tokenizer,
                                               self.config.forgetting.stsb)}
