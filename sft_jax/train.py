"""train_and_evaluate(config, workdir): load, fine-tune, evaluate, probe forgetting, checkpoint, resume."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from sft_jax import distributed, groups, optim, regularizers, sharding, strategies
from sft_jax.checkpoint import Checkpoints
from sft_jax.config_defaults import validate
from sft_jax.data import batching, images
from sft_jax.data import lm as lm_data
from sft_jax.data import sft as sft_data
from sft_jax.data.sources import DataError, read_classification
from sft_jax.evaluate import metrics as metrics_lib
from sft_jax.evaluate.stsb import stsb_spearman
from sft_jax.losses import classification_loss, lm_loss, simcse_loss
from sft_jax.models import vision
from sft_jax.models.classifier import EncoderClassifier, bert_layout
from sft_jax.models.finetuned import build_lm, decoder_layout
from sft_jax.models.loading.hf import load_bert, load_bert_config, load_tokenizer
from sft_jax.models.loading.lm import load_lm_tokenizer
from sft_jax.models.registry import resolve_model_dir
from sft_jax.models.vit import ImageClassifier, vit_layout
from sft_jax.state import ModelDef, TrainState, count_params, params_fingerprint
from sft_jax.train_step import compiler_options, compute_cast_plan, make_eval_step, make_train_step, with_compute_params

LABELS_FILE = "labels.json"
# Changing these between runs on one workdir would resume a different experiment.
INCOMPATIBLE_KEYS = ("model", "task", "strategy", "frozen_layers", "pooling", "seed", "batch_size", "lora",
                     "vit", "regularizer", "llrd", "gradual_unfreeze", "lp_ft")


class Task:
    """A text-classification model and what it needs around it, built from a config."""

    def __init__(self, config: ml_collections.ConfigDict, num_labels: int):
        self.model_dir = resolve_model_dir(config.model)
        dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
        encoder, bert_config = load_bert(self.model_dir, dtype=dtype)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.max_length = min(config.max_length, bert_config.max_position_embeddings)
        module = EncoderClassifier(encoder, bert_config.hidden_size, num_labels, pooling=config.pooling,
                                   dropout=config.head_dropout, rngs=nnx.Rngs(config.seed))
        self.model_def, self.params = ModelDef.split(module)
        self.layout = bert_layout(bert_config.num_hidden_layers)


def embed_fn(model_def: ModelDef):
    """Jitted mean-pooled embedding: the encoder part of the classifier."""
    return jax.jit(lambda params, ids, mask: model_def.merge(params).embed(ids, mask))


def _check_resume(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    changed = [k for k in INCOMPATIBLE_KEYS if k in old and old[k] != config.to_dict()[k]]
    if changed:
        detail = ", ".join(f"{k}: {old[k]!r} -> {config[k]!r}" for k in changed)
        raise ValueError(f"{workdir}: cannot resume, the config changed incompatibly ({detail}); "
                         "use a new workdir")


def label_vocab(config, workdir: str, train_examples) -> batching.LabelVocab:
    """The labels found in the training data; on resume they must equal those saved in the workdir."""
    found = batching.LabelVocab.from_examples(train_examples)
    labels_path = os.path.join(workdir, LABELS_FILE)
    if not os.path.exists(labels_path):
        return found
    vocab = batching.LabelVocab.load(labels_path)
    if vocab.labels != found.labels:
        raise DataError(f"{config.data.train}: labels {found.labels} differ from {vocab.labels} saved in "
                        f"{labels_path}; use a new workdir")
    return vocab


def subsample(train_examples: list, config) -> list:
    """The first `data.max_train_examples` after a seeded shuffle (all when 0), in their original order."""
    if not config.data.max_train_examples:
        return train_examples
    keep = np.random.default_rng(config.seed).permutation(len(train_examples))[: config.data.max_train_examples]
    return [train_examples[i] for i in sorted(keep)]


def load_data(config, workdir: str, tokenizer, max_length: int):
    """Reads and tokenizes train and eval data; the label vocabulary comes from train (or the workdir)."""
    train_ex = read_classification(config.data.train, text_field=config.data.text_field,
                                   label_field=config.data.label_field, data_dir=config.data.tfds_data_dir)
    eval_ex = read_classification(config.data.eval, text_field=config.data.text_field,
                                  label_field=config.data.label_field, data_dir=config.data.tfds_data_dir)
    vocab = label_vocab(config, workdir, train_ex)
    train_ex = subsample(train_ex, config)
    # Encoding the eval set first checks its labels before any time is spent on training.
    too_long = config.data.too_long
    eval_ds = batching.encode_classification(eval_ex, tokenizer, vocab, max_length, too_long)
    train_ds = batching.encode_classification(train_ex, tokenizer, vocab, max_length, too_long)
    return vocab, train_ds, eval_ds


def evaluate(eval_fn, params, eval_ds, config, pad_id: int, num_labels: int, collate=None) -> dict[str, float]:
    preds = np.zeros(len(eval_ds), np.int32)
    loss_sum = 0.0
    for idx, batch in batching.eval_batches(eval_ds, config.eval_batch_size, config.buckets, pad_id, collate):
        aux = jax.device_get(eval_fn(params, batch))
        preds[idx] = aux["predictions"][: len(idx)]
        loss_sum += float(aux["loss_sum"])
    return {"eval/accuracy": metrics_lib.accuracy(preds, eval_ds.labels),
            "eval/f1": metrics_lib.macro_f1(preds, eval_ds.labels, num_labels),
            "eval/loss": loss_sum / len(eval_ds)}


class ClassificationRun:
    """Text classification: data, model, loss, evaluation and the STS-B probe, as the train loop needs them."""

    metrics = ("eval/accuracy", "eval/f1", "eval/loss")

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        # Data first: bad input must stop the run before a model is loaded.
        model_dir = resolve_model_dir(config.model)
        self.tokenizer = load_tokenizer(model_dir)
        positions = load_bert_config(model_dir).max_position_embeddings
        if config.max_length > positions:  # past the position table a gather would silently clamp
            raise ValueError(f"config.max_length={config.max_length} exceeds the model's {positions} positions "
                             f"({config.model})")
        self.vocab, self.train_ds, self.eval_ds = load_data(config, workdir, self.tokenizer, config.max_length)
        task = Task(config, len(self.vocab))
        if distributed.is_primary():
            self.vocab.save(os.path.join(workdir, LABELS_FILE))
        self.model_def, self.params, self.layout = task.model_def, task.params, task.layout
        self.loss_fn = classification_loss
        self.pad_id = self.tokenizer.pad_token_id
        self.batches = batching.TrainBatches(self.train_ds, config.batch_size, config.buckets, config.seed,
                                             self.pad_id)
        self.summary = {"train_examples": len(self.train_ds), "eval_examples": len(self.eval_ds),
                        "num_labels": len(self.vocab), "data/train_truncated": self.train_ds.truncated,
                        "data/eval_truncated": self.eval_ds.truncated}
        self._embed = embed_fn(self.model_def)

    def evaluate(self, eval_fn, params, step: int | None = None) -> dict[str, float]:
        return evaluate(eval_fn, params, self.eval_ds, self.config, self.pad_id, len(self.vocab))

    @staticmethod
    def train_metrics(m: dict) -> dict[str, float]:
        return {"train/accuracy": m["correct"] / max(m["count"], 1)}

    fisher_loss = staticmethod(simcse_loss)

    def fisher_batches(self) -> list[dict]:
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

    def probes(self, params) -> dict[str, float]:
        if not self.config.forgetting.stsb:
            return {}
        return {"stsb_spearman": stsb_spearman(lambda i, m: self._embed(params, i, m), self.tokenizer,
                                               self.config.forgetting.stsb)}


class ImageClassificationRun:
    """Image classification with a ViT (see `sft_jax.models.vision` for what `config.model` may be) and the
    forgetting probe: source-task accuracy with the model's original head on the current backbone."""

    metrics = ClassificationRun.metrics

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        d = config.data
        read = functools.partial(images.read_image_records, image_field=d.image_field, label_field=d.label_field,
                                 data_dir=d.tfds_data_dir, classes=tuple(d.classes))
        train_records, eval_records = read(d.train), read(d.eval)
        self.vocab = label_vocab(config, workdir, train_records)
        train_records = subsample(train_records, config)
        dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
        spec = vision.resolve_image_model(config.model, config.vit, config.image, dtype)
        size = spec.vit_config.image_size
        # Eval first: its labels are checked before any time is spent decoding the training images.
        self.eval_ds = images.load_images(eval_records, self.vocab, size)
        self.train_ds = images.load_images(train_records, self.vocab, size)
        self.collate = images.image_collate(spec.mean, spec.std)
        vit, source = vision.load_backbone(spec, config.seed)
        self.source, self.source_ds = source, None
        if config.forgetting.images:
            if source is None:
                raise ValueError(f"config.forgetting.images: {config.model} has no classification head of its "
                                 "own to probe; give the workdir of an image run or a ViTForImageClassification")
            records = images.read_image_records(config.forgetting.images, image_field=d.image_field,
                                                label_field=d.label_field, data_dir=d.tfds_data_dir,
                                                classes=tuple(source.labels))
            self.source_ds = images.load_images(records, batching.LabelVocab(source.labels), size)
            probe = ImageClassifier(vit, len(source.labels), pooling=source.pooling, rngs=nnx.Rngs(0))
            self._source_def = ModelDef.split(probe)[0]
            self._source_eval = make_eval_step(self._source_def, classification_loss)
        module = vision.build_classifier(vit, self.vocab.labels, source, pooling=config.pooling,
                                         dropout=config.head_dropout, seed=config.seed)
        if distributed.is_primary():
            self.vocab.save(os.path.join(workdir, LABELS_FILE))
        self.model_def, self.params = ModelDef.split(module)
        self.layout = vit_layout(spec.vit_config.num_hidden_layers)
        self.loss_fn = classification_loss
        self.pad_id = 0
        self.batches = images.ImageTrainBatches(self.train_ds, config.batch_size, config.seed, mean=spec.mean,
                                                std=spec.std, crop_padding=config.image.crop_padding,
                                                flip=config.image.flip)
        self.summary = {"train_examples": len(self.train_ds), "eval_examples": len(self.eval_ds),
                        "num_labels": len(self.vocab), "image_size": size}
        if self.source_ds is not None:
            self.summary["source_eval_examples"] = len(self.source_ds)

    def evaluate(self, eval_fn, params, step: int | None = None) -> dict[str, float]:
        return evaluate(eval_fn, params, self.eval_ds, self.config, self.pad_id, len(self.vocab), self.collate)

    train_metrics = staticmethod(ClassificationRun.train_metrics)

    def probes(self, params) -> dict[str, float]:
        if self.source_ds is None:
            return {}
        # The fine-tuned backbone under the source head (a fresh head of this run is set aside).
        probe = {k: v for k, v in params.items() if not k.startswith("head/")}
        probe.update({"head/kernel": jnp.asarray(self.source.kernel), "head/bias": jnp.asarray(self.source.bias)})
        ev = evaluate(self._source_eval, probe, self.source_ds, self.config, self.pad_id, len(self.source.labels),
                      self.collate)
        return {"source_accuracy": ev["eval/accuracy"]}


def sft_fields(config) -> sft_data.Fields:
    d = config.data
    return sft_data.Fields(input=d.input_field, output=d.output_field, instruction=d.instruction_field,
                           messages=d.messages_field)


def prompt_format(config) -> sft_data.PromptFormat:
    return sft_data.PromptFormat(**config.prompt.to_dict())


class LanguageModelRun:
    """A decoder LM fine-tuned on next-token prediction: plain text (task=language_modeling, every token a
    target) or prompt -> output records (task=sft, only output tokens are targets); WikiText-2 probe."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        gen = config.eval_generation
        names = {"rouge": ("rouge1", "rouge2", "rougeL"), "bleu": ("bleu",), "exact_match": ("exact_match",)}
        self.metrics = ("eval/loss", "eval/perplexity", "eval/accuracy") + tuple(
            f"eval/{k}" for m in gen.metrics for k in names[m])
        self.tokenizer = load_lm_tokenizer(config.model)
        if config.task == "sft":
            fields, fmt = sft_fields(config), prompt_format(config)
            self.eval_records = sft_data.read_sft(config.data.eval, fields, config.data.max_eval_examples)
            train_records = sft_data.read_sft(config.data.train, fields)
            train_records = subsample(train_records, config)
            too_long = config.data.too_long
            self.eval_ds = sft_data.encode_sft(self.eval_records, self.tokenizer, fmt, config.max_length, too_long)
            self.train_ds = sft_data.encode_sft(train_records, self.tokenizer, fmt, config.max_length, too_long)
        else:
            read = lm_data.read_documents
            self.eval_ds = lm_data.encode_documents(read(config.data.eval, config.data.text_field), self.tokenizer,
                                                    config.max_length)
            self.train_ds = lm_data.encode_documents(read(config.data.train, config.data.text_field),
                                                     self.tokenizer, config.max_length)
        model, model_config = build_lm(config.model, config.strategy, config.dtype, lora=config.lora, seed=config.seed)
        if max(config.max_length, max(config.buckets)) > model_config.max_position_embeddings:
            raise ValueError(f"config.max_length={max(config.max_length, max(config.buckets))} exceeds the model's "
                             f"{model_config.max_position_embeddings} positions ({config.model})")
        self.eos_ids = set(model_config.eos_ids) | {self.tokenizer.eos_token_id} - {None}
        self.model_def, self.params = ModelDef.split(model)
        self.layout = decoder_layout(model_config.num_layers)
        self.loss_fn = lm_loss
        self.pad_id = self.tokenizer.pad_token_id
        if config.packing:
            packed = lm_data.pack(self.train_ds, max(config.buckets))
            self.batches = batching.TrainBatches(packed, config.batch_size, config.buckets, config.seed,
                                                 self.pad_id, collate=lm_data.make_packed_batch)
        else:
            self.batches = batching.TrainBatches(self.train_ds, config.batch_size, config.buckets, config.seed,
                                                 self.pad_id, collate=lm_data.make_lm_batch)
        self.summary = {"train_examples": len(self.train_ds), "eval_examples": len(self.eval_ds),
                        "train_rows": len(self.batches.ds),
                        "train_target_tokens": self.train_ds.num_targets,
                        "eval_target_tokens": self.eval_ds.num_targets,
                        "data/train_truncated": self.train_ds.truncated,
                        "data/eval_truncated": self.eval_ds.truncated}
        self._perplexity = None

    def evaluate(self, eval_fn, params, step: int | None = None) -> dict[str, float]:
        loss_sum = correct = count = 0.0
        for _, batch in batching.eval_batches(self.eval_ds, self.config.eval_batch_size, self.config.buckets,
                                              self.pad_id, collate=lm_data.make_lm_batch):
            aux = jax.device_get(eval_fn(params, batch))
            loss_sum += float(aux["loss_sum"])
            correct += float(aux["correct"])
            count += float(aux["count"])
        loss = loss_sum / count
        out = {"eval/loss": loss, "eval/perplexity": float(np.exp(loss)), "eval/accuracy": correct / count}
        if self.config.eval_generation.metrics:
            out.update(self.generation_metrics(params, step))
        return out

    def generate_eval(self, params, records) -> list[str]:
        """Greedy completions of the eval prompts, encoded exactly as in training."""
        from sft_jax.generate import generate_ids

        gen = self.config.eval_generation
        fmt = prompt_format(self.config)
        prompts = [sft_data.encode_prompt(r, self.tokenizer, fmt, self.config.max_length) for r in records]
        eos = sorted(set(self.eos_ids))
        outputs = []
        for start in range(0, len(prompts), gen.batch_size):
            chunk = prompts[start: start + gen.batch_size]
            # A fixed batch size keeps one compiled decode loop; the filler rows are dropped.
            padded = chunk + [chunk[-1]] * (gen.batch_size - len(chunk))
            stop_fn = None
            if gen.stop:
                def stop_fn(i, new):
                    return any(s in self.tokenizer.decode(new, skip_special_tokens=True) for s in gen.stop)
            tokens, lengths = generate_ids(self.model_def, params, padded, max_new_tokens=gen.max_new_tokens,
                                           eos_ids=eos, pad_id=self.pad_id, stop_fn=stop_fn)
            for i in range(len(chunk)):
                text = self.tokenizer.decode(tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
                cut = min((text.find(s) for s in gen.stop if s in text), default=len(text))
                outputs.append(text[:cut].strip())
        return outputs

    def generation_metrics(self, params, step: int | None) -> dict[str, float]:
        from sft_jax.evaluate import text_metrics

        gen = self.config.eval_generation
        records = self.eval_records[: gen.num_examples]
        predictions = self.generate_eval(params, records)
        references = [sft_data.reference_output(r) for r in records]
        scores = text_metrics.compute(gen.metrics, predictions, references)
        if distributed.is_primary():
            with open(os.path.join(self.workdir, "generations.jsonl"), "a") as f:
                for r, pred, ref in list(zip(records, predictions, references))[: gen.log_examples]:
                    f.write(json.dumps({"step": step, "where": r.where, "prediction": pred, "reference": ref}) + "\n")
                    tqdm.tqdm.write(f"  [{r.where}] prediction: {pred[:200]!r}\n  reference: {ref[:200]!r}")
        return {f"eval/{k}": v for k, v in scores.items()}

    @staticmethod
    def train_metrics(m: dict) -> dict[str, float]:
        return {"train/accuracy": m["correct"] / max(m["count"], 1), "train/target_tokens": m["count"]}

    fisher_loss = staticmethod(lm_loss)

    def fisher_batches(self) -> list[dict]:
        """Next-token batches of regularizer.fisher_data (max_length-token blocks), drawn with the seed."""
        r = self.config.regularizer
        ds = lm_data.encode_documents(lm_data.read_documents(r.fisher_data, self.config.data.text_field),
                                      self.tokenizer, self.config.max_length)
        order = np.random.default_rng(self.config.seed).permutation(len(ds))
        size = r.fisher_batch_size
        count = min(r.fisher_batches, len(ds) // size)
        if not count:
            raise DataError(f"{r.fisher_data}: {len(ds)} blocks of text, fewer than fisher_batch_size={size}")
        return [lm_data.make_lm_batch(ds, order[i * size:(i + 1) * size], size, self.config.buckets, self.pad_id)
                for i in range(count)]

    def probes(self, params) -> dict[str, float]:
        f = self.config.forgetting
        if not f.wikitext2:
            return {}
        from sft_jax.evaluate.perplexity import wikitext2_perplexity

        r = wikitext2_perplexity(self.model_def, params, self.tokenizer, f.wikitext2, max_length=f.wikitext2_max_length,
                                 stride=f.wikitext2_stride, max_tokens=f.wikitext2_max_tokens or None)
        return {"wikitext2_ppl": r["token_perplexity"], "wikitext2_word_ppl": r["word_perplexity"]}


RUNS = {"text_classification": ClassificationRun, "language_modeling": LanguageModelRun, "sft": LanguageModelRun,
        "image_classification": ImageClassificationRun}
# How forgetting is summarised: (name of the summary, sign of (after - before) that means "forgot").
_FORGETTING = {"stsb_spearman": ("drop", -1.0), "wikitext2_ppl": ("rise", 1.0), "wikitext2_word_ppl": ("rise", 1.0),
               "source_accuracy": ("drop", -1.0)}


class _Preemption:
    """SIGTERM (a scheduler's preemption notice) asks the loop to checkpoint and return; the command resumes."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
            pass

    def _handle(self, signum, frame) -> None:
        self.requested = True
        tqdm.tqdm.write("SIGTERM: saving a checkpoint and stopping")

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class TrainingDiverged(ValueError):
    """A non-finite loss or gradient with nan_policy=stop."""


def _check_finite(pending: list, policy: str, meta: dict, ckpt) -> None:
    """Acts on the non-finite flags of the steps since the last check (one host transfer for all of them)."""
    if not pending:
        return
    flags = jax.device_get([flag for _, flag in pending])
    bad = [step for (step, _), flag in zip(pending, flags) if int(flag)]
    if not bad:
        return
    if policy == "skip":
        meta["skipped_steps"] = meta.get("skipped_steps", 0) + len(bad)
        tqdm.tqdm.write(f"skipped {len(bad)} step(s) with a non-finite loss or gradient: {bad[:10]}")
        return
    ckpt.wait()
    last = ckpt.latest.latest_step()
    raise TrainingDiverged(f"non-finite loss or gradient at step {bad[0]} (steps {bad[:10]}); those updates were "
                           f"not applied and no such state was saved (latest checkpoint: step {last}). Lower the "
                           "learning rate, check the data, or set --config.nan_policy=skip to skip such steps")


class MetricWriter:
    """metrics.jsonl (one line per logged step) and TensorBoard events in the workdir (process 0 only)."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self.active = distributed.is_primary()
        if self.active:
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(workdir)

    def write(self, step: int, values: dict[str, float]) -> None:  # noqa: D102
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tb.close()


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def init_state(params: dict, tx, p_shard: dict, mesh: jax.sharding.Mesh, seed: int
               ) -> tuple[TrainState, TrainState]:
    """The initial train state laid out over `mesh` (parameters per `p_shard`, optimizer moments following
    their parameters) and the matching tree of shardings, for `make_train_step`."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = {k: sharding.put_global(v, p_shard[k]) for k, v in params.items()}
    opt_shard = sharding.tree_shardings(jax.eval_shape(tx.init, params), p_shard, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shard)(params)
    state = TrainState(step=sharding.put_global(np.zeros((), np.int32), replicated), params=params,
                       opt_state=opt_state,
                       rng=sharding.put_global(jax.random.key_data(jax.random.key(seed)), replicated))
    return state, TrainState(step=replicated, params=p_shard, opt_state=opt_shard, rng=replicated)


def make_optimizer(config: ml_collections.ConfigDict, labels: dict[str, str], layout: strategies.ParamLayout,
                   schedule) -> tuple:
    """(optimizer, phases or None, names of the anchored parameters) for the strategy's `labels`.

    Without LLRD / gradual unfreezing / LP-FT this is the strategy's partition with one AdamW; with them, one
    delayed AdamW per layer group (`sft_jax.groups`). An L2-SP / EWC penalty comes first in the chain.
    """
    lp, unfreeze = config.lp_ft, config.gradual_unfreeze
    phase_list = None
    if config.llrd != 1.0 or unfreeze.every or lp.head_steps:
        plan = groups.plan_groups(layout, llrd=config.llrd, unfreeze_every=unfreeze.every,
                                  unfreeze_blocks=unfreeze.blocks, lp_steps=lp.head_steps)
        glabels = groups.group_labels(labels, layout)
        head_ratio = lp.head_learning_rate / config.learning_rate if lp.head_learning_rate and \
            config.learning_rate else 1.0
        tx = groups.grouped_optimizer(glabels, plan, schedule, warmup_steps=config.warmup_steps,
                                      weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                                      head_ratio=head_ratio, lp_steps=lp.head_steps)
        phase_list = groups.phases(glabels, plan)
    else:
        tx = strategies.partition(labels, optim.adamw(schedule, weight_decay=config.weight_decay,
                                                      clip_norm=config.clip_norm))
    fresh = re.compile("^" + layout.fresh) if layout.fresh else None
    anchored = tuple(n for n in strategies.trainable_names(labels) if not (fresh and fresh.search(n)))
    weight = config.regularizer.l2sp or config.regularizer.ewc
    if weight:
        tx = optax.chain(regularizers.anchor_penalty(weight, anchored, fisher=bool(config.regularizer.ewc)), tx)
    return tx, phase_list, anchored


def wise_ft_sweep(run, eval_fn, pretrained: dict, finetuned: dict, p_shard, results: dict) -> dict[str, float]:
    """Task metrics and forgetting probes of the WiSE-FT interpolation at each config.wise_ft.alphas."""
    fresh = re.compile("^" + run.layout.fresh) if run.layout.fresh else None
    keep = [k for k in finetuned if fresh and fresh.search(k)]
    out = {}
    for alpha in run.config.wise_ft.alphas:
        mixed = regularizers.wise_ft(pretrained, finetuned, float(alpha), keep)
        mixed = {k: jax.device_put(v, p_shard[k]) for k, v in mixed.items()}
        prefix = f"wise_ft/{float(alpha):g}/"
        out.update({prefix + k: v for k, v in run.evaluate(eval_fn, mixed).items()})
        for name, after in run.probes(mixed).items():
            summary, sign = _FORGETTING.get(name, ("change", 1.0))
            out[f"{prefix}forgetting/{name}/after"] = after
            # + 0.0: no "-0.0" where nothing changed
            out[f"{prefix}forgetting/{name}/{summary}"] = sign * (after - results[f"forgetting/{name}/before"]) + 0.0
        tqdm.tqdm.write(f"WiSE-FT alpha={float(alpha):g}: " + ", ".join(
            f"{k[len(prefix):]}={v:.4f}" for k, v in out.items() if k.startswith(prefix)))
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes per `config`, writing everything to `workdir`; resumes from its latest checkpoint."""
    validate(config)
    distributed.initialize(config)  # before anything touches the devices
    try:  # fail now, not at the first checkpoint an hour later
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{workdir}: cannot write the workdir ({e.strerror or e})") from None
    _check_resume(workdir, config)

    run = RUNS[config.task](config, workdir)
    if config.early_stopping.metric not in run.metrics:
        raise ValueError(f"config.early_stopping.metric: {config.early_stopping.metric!r} is not one of "
                         f"{run.metrics} for task {config.task!r}")
    if distributed.is_primary():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=str)

    rules = strategies.strategy_rules(config.strategy, run.layout, config.frozen_layers)
    labels = strategies.label_params(run.model_def.names, rules)
    trainable = strategies.trainable_names(labels)
    schedule = optim.make_schedule(config.learning_rate, config.max_steps, config.warmup_steps, config.schedule)
    tx, phase_list, anchored = make_optimizer(config, labels, run.layout, schedule)
    # WiSE-FT interpolates from the pre-trained weights: a host copy (the device ones are donated).
    pretrained = {k: np.asarray(v) for k, v in run.params.items()} if config.wise_ft.alphas else None

    mesh = sharding.make_mesh(config.mesh.to_dict())
    # Regex rules win; then (preset auto) the parameters' logical axes under the logical rules; else replicated.
    logical_rules = tuple(config.logical_axis_rules) if config.sharding_preset == "auto" else None
    p_shard = sharding.param_shardings(run.model_def.names, mesh, tuple(config.sharding_rules),
                                       shapes={k: v.shape for k, v in run.params.items()},
                                       axes=run.model_def.axes if logical_rules is not None else None,
                                       logical_rules=logical_rules or ())
    b_shard = sharding.batch_sharding(mesh)
    state, state_shard = init_state(run.params, tx, p_shard, mesh, config.seed)

    ckpt = Checkpoints(workdir)
    meta = {"best_metric": None, "best_step": None, "bad_evals": 0, "stopped_early": False}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        tqdm.tqdm.write(f"resumed from step {int(state.step)} of {workdir}")
    elif config.regularizer.ewc:  # a resumed state holds its Fisher
        t_fisher = time.time()
        fisher = regularizers.empirical_fisher(run.model_def, state.params, anchored, run.fisher_loss,
                                               run.fisher_batches(), seed=config.seed)
        state = state.replace(opt_state=regularizers.set_fisher(state.opt_state, fisher))
        tqdm.tqdm.write(f"EWC: Fisher of {len(anchored)} tensors estimated in {time.time() - t_fisher:.0f}s")

    # One compiled step per phase (gradual unfreezing, LP-FT), each differentiating only what learns in it.
    phased = phase_list or [(0, trainable)]
    # Frozen bfloat16 matmul weights are cast once here, not in every step. Phases only ever unfreeze, so the
    # parameters frozen in the phase the run starts in stay as they are for as long as they are frozen.
    if config.dtype != "float32":  # in float32 nothing is cast (and the plan would be empty)
        start_phase = groups.phase_at([s for s, _ in phased], int(state.step))
        cast_plan = compute_cast_plan(run.model_def, run.loss_fn, state.params,
                                      run.batches.batch(int(state.step)), phased[start_phase][1])
        state, state_shard = with_compute_params(state, cast_plan, state_shard)
    xla_options = compiler_options(config.cpu_matmuls, b_shard.mesh.devices.flat,
                                   decoder=config.task in ("language_modeling", "sft"))
    train_fns = groups.PhasedStep(phased, lambda names: make_train_step(
        run.model_def, tx, run.loss_fn, names, state_sharding=state_shard, batch_sharding=b_shard,
        accum_steps=config.grad_accum_steps, logical_rules=logical_rules, compiler_options=xla_options))
    eval_step = make_eval_step(run.model_def, run.loss_fn, params_sharding=p_shard, batch_sharding=b_shard,
                               logical_rules=logical_rules, compiler_options=xla_options)

    def eval_fn(params, batch):  # host batches become global arrays (each process puts its own rows)
        return eval_step(params, sharding.put_batch(batch, b_shard))

    batches = run.batches

    results = {"trainable_params": count_params(run.params, trainable),
               "total_params": count_params(run.params), **run.summary}
    # The "before" probe runs once, on the pre-trained weights, and is kept in the checkpoint meta for resumes.
    if "probes_before" not in meta:
        meta["probes_before"] = run.probes(run.params)
    for name, value in meta["probes_before"].items():
        results[f"forgetting/{name}/before"] = value

    writer = MetricWriter(workdir)
    mode, patience = config.early_stopping.mode, config.early_stopping.patience
    step = int(state.step)
    t0, examples, tokens, eval_time = time.time(), 0, 0, 0.0
    bar = tqdm.tqdm(total=config.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not distributed.is_primary())
    last_eval = None
    prior_seconds = meta.get("train_seconds", 0.0)  # training time of earlier processes (resumes)
    nonfinite: list[tuple[int, jax.Array]] = []  # (step, flag) of steps not yet checked on the host
    preempt = _Preemption()
    last = False
    try:
        while (step < config.max_steps and not meta["stopped_early"] and not meta.get("out_of_time")
               and not preempt.requested):
            host_batch = batches.batch(step)
            tokens += int(np.count_nonzero(host_batch.get("segment_ids", host_batch.get("attention_mask"))))
            state, m = train_fns(step)(state, sharding.put_batch(host_batch, b_shard))
            step += 1
            examples += config.batch_size
            meta["train_seconds"] = prior_seconds + time.time() - t0 - eval_time
            if config.max_train_seconds and meta["train_seconds"] >= config.max_train_seconds:
                meta["out_of_time"] = True  # an equal-compute budget: stop here, as if max_steps were reached
            last = step == config.max_steps or bool(meta.get("out_of_time"))
            nonfinite.append((step, m["nonfinite"]))
            if step % config.log_every == 0 or last or step % config.eval_every == 0 or preempt.requested:
                _check_finite(nonfinite, config.nan_policy, meta, ckpt)
                nonfinite.clear()
            if step % config.log_every == 0 or last:
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                rate = examples / max(time.time() - t0 - eval_time, 1e-9)
                logged = {"train/loss": m["loss"], **run.train_metrics(m),
                          "train/grad_norm": m["grad_norm"], "train/learning_rate": float(schedule(step - 1)),
                          "train/examples_per_s": rate, "train/skipped_steps": meta.get("skipped_steps", 0)}
                writer.write(step, logged)
                bar.set_postfix(loss=f"{m['loss']:.4f}", ex_per_s=f"{rate:.1f}")
            bar.update(1)
            if step % config.eval_every == 0 or last:
                t_eval = time.time()
                ev = last_eval = run.evaluate(eval_fn, state.params, step)
                probed = {f"forgetting/{k}": v for k, v in run.probes(state.params).items()} \
                    if config.forgetting.every_eval else {}
                writer.write(step, {**ev, **probed})
                value = ev[config.early_stopping.metric]
                if _improved(value, meta["best_metric"], mode):
                    meta.update(best_metric=value, best_step=step, bad_evals=0)
                    ckpt.save_best(state, meta)
                else:
                    meta["bad_evals"] += 1
                    if patience and meta["bad_evals"] >= patience:
                        meta["stopped_early"] = True
                        bar.write(f"early stopping at step {step}: best {config.early_stopping.metric}="
                                  f"{meta['best_metric']:.4f} at step {meta['best_step']}")
                bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
                eval_time += time.time() - t_eval
            if step % config.checkpoint_every == 0 or last or meta["stopped_early"] or preempt.requested:
                ckpt.save_latest(state, meta)
    finally:
        preempt.restore()
    bar.close()
    ckpt.wait()
    if preempt.requested and step < config.max_steps and not last:
        writer.close()
        ckpt.close()
        return {"preempted": True, "step": step}
    elapsed = time.time() - t0
    train_seconds = elapsed - eval_time  # includes compilation and checkpoint saves

    # Final metrics are those of the best checkpoint (early stopping keeps it).
    best_params, _ = ckpt.restore_params(state.params, "best")
    if last_eval is not None and meta["best_step"] == step:
        results.update(last_eval)  # the last evaluation was of these very parameters
    else:
        results.update(run.evaluate(eval_fn, best_params, meta["best_step"]))
    for name, after in run.probes(best_params).items():
        results[f"forgetting/{name}/after"] = after
        summary, sign = _FORGETTING.get(name, ("change", 1.0))
        results[f"forgetting/{name}/{summary}"] = sign * (after - results[f"forgetting/{name}/before"])
    if pretrained is not None:
        results.update(wise_ft_sweep(run, eval_fn, pretrained, best_params, p_shard, results))
    results.update({"step": step, "best_step": meta["best_step"], "stopped_early": meta["stopped_early"],
                    "skipped_steps": meta.get("skipped_steps", 0),
                    "stopped_out_of_time": bool(meta.get("out_of_time")),
                    "params_fingerprint": params_fingerprint(state.params),
                    "best_params_fingerprint": params_fingerprint(best_params)})
    if examples:
        results.update({"train/examples_per_s": examples / train_seconds, "train/wall_time_s": elapsed})
        if tokens:  # texts only
            results["train/tokens_per_s"] = tokens / train_seconds
    if distributed.is_primary():
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    writer.close()
    ckpt.close()
    return results
