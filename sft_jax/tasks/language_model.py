"""Decoder LMs fine-tuned on next-token prediction: plain text (`language_modeling`, every token a target) or
prompt -> output records (`sft`: instructions, chat, input/output pairs; only output tokens are targets).
The forgetting probes are WikiText-2 perplexity and lm-evaluation-harness tasks; EWC's Fisher is that of
next-token prediction on `regularizer.fisher_data`. `load_finetuned_lm` rebuilds a run's model from its workdir."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from sft_jax import distributed, generate, regularizers, sharding
from sft_jax.data import batching, mixture, random_access
from sft_jax.data import lm as lm_data
from sft_jax.data import sft as sft_data
from sft_jax.data.sources import DataError
from sft_jax.data.streaming import streamed_batches
from sft_jax.evaluate import text_metrics
from sft_jax.evaluate.perplexity import wikitext2_perplexity
from sft_jax.flops import FlopsModel, decoder_flops_model
from sft_jax.losses import lm_loss
from sft_jax.models.decoder import DecoderConfig, DecoderLM
from sft_jax.models.finetuned import build_lm, decoder_layout, with_dtype
from sft_jax.models.layout import in_storage_dtype
from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer
from sft_jax.models.loading.tokenizers import check_fits
from sft_jax.models.lora import merge_lora
from sft_jax.models.scan import segment_sizes, unscan_decoder
from sft_jax.run_kinds import require_task
from sft_jax.rundir import RunDir
from sft_jax.state import ModelDef
from sft_jax.tasks.base import Task
from sft_jax.tasks.registry import register

# The eval/ names of each `eval_generation.metrics` entry.
_GENERATION_METRICS = {"rouge": ("rouge1", "rouge2", "rougeL"), "bleu": ("bleu",), "exact_match": ("exact_match",)}


def sft_fields(config: ml_collections.ConfigDict) -> sft_data.Fields:
    d = config.data
    return sft_data.Fields(input=d.input_field, output=d.output_field, instruction=d.instruction_field,
                           messages=d.messages_field)


def loss_fn(config: ml_collections.ConfigDict):
    """The loss the language-model tasks train and evaluate with: next-token cross-entropy, its vocabulary
    logits computed `config.lm_loss_chunk` positions at a time when set."""
    return functools.partial(lm_loss, chunk=config.lm_loss_chunk)


def prompt_format(config: ml_collections.ConfigDict) -> sft_data.PromptFormat:
    return sft_data.PromptFormat(**config.prompt.to_dict())


def read_train_rows(config: ml_collections.ConfigDict, tokenizer, spec: str, source_format: str = ""
                    ) -> lm_data.LmDataset:
    """Training rows of `spec`: sft records for task sft, else (or with format "text") documents."""
    if config.task == "sft" and source_format != "text":
        records = sft_data.read_sft(spec, sft_fields(config))
        return sft_data.encode_sft(records, tokenizer, prompt_format(config), config.max_length,
                                   config.data.too_long)
    return lm_data.encode_documents(lm_data.read_documents(spec, config.data.text_field), tokenizer,
                                    config.max_length)


def read_eval_rows(config: ml_collections.ConfigDict, tokenizer, spec: str, source_format: str = ""
                   ) -> tuple[lm_data.LmDataset, list[sft_data.Record]]:
    """(evaluation rows, the sft records generation metrics prompt with: [] for documents) of `spec`."""
    if config.task == "sft" and source_format != "text":
        records = sft_data.read_sft(spec, sft_fields(config), config.data.max_eval_examples)
        return sft_data.encode_sft(records, tokenizer, prompt_format(config), config.max_length,
                                   config.data.too_long), records
    return read_train_rows(config, tokenizer, spec, source_format), []


def next_token_scores(eval_fn, params, ds: lm_data.LmDataset, config: ml_collections.ConfigDict, pad_id: int
                      ) -> dict[str, float]:
    """eval/loss, eval/perplexity and eval/accuracy (next-token, over the target tokens) of `ds`."""
    loss_sum = correct = count = 0.0
    for _, batch in batching.eval_batches(ds, config.eval_batch_size, config.buckets, pad_id,
                                          collate=lm_data.make_lm_batch):
        aux = jax.device_get(eval_fn(params, batch))
        loss_sum += float(aux["loss_sum"])
        correct += float(aux["correct"])
        count += float(aux["count"])
    loss = loss_sum / count
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(loss)), "eval/accuracy": correct / count}


@register("language_modeling", "sft")
class LanguageModel(Task):
    strategies = ("head", "partial", "full", "lora")
    decoder = True
    higher_is_better = {"wikitext2_ppl": False, "wikitext2_word_ppl": False}
    exclusive_options = {"lm_loss_chunk": "the chunked language-model loss",
                         "quantize_base": "a quantised base (QLoRA)", "scan_layers": "scanned layers"}
    rebuilds_base = True  # build_lm from config.json, as `load_finetuned_lm` does: checkpoints hold what trains
    streams = True  # sft records; documents are split into blocks, which needs them all (refused below)
    mixture_formats = ("", "text")  # the task's records; plain text (documents) for sft too

    @classmethod
    def metric_names(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return ("eval/loss", "eval/perplexity", "eval/accuracy") + tuple(
            f"eval/{k}" for m in config.eval_generation.metrics for k in _GENERATION_METRICS[m])

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        if config.data.streaming and (config.task != "sft" or config.packing):
            raise ValueError("config.data.streaming: streams sft records unpacked; documents (language_modeling) "
                             "and packing need the whole data set in memory")
        if config.eval_generation.metrics and config.task != "sft":
            raise ValueError("config.eval_generation.metrics: generation metrics need task='sft'")
        if config.scan_layers:
            for key, value, off in (("llrd", config.llrd, 1.0),
                                    ("gradual_unfreeze.every", config.gradual_unfreeze.every, 0),
                                    ("lp_ft.head_steps", config.lp_ft.head_steps, 0)):
                if value != off:
                    raise ValueError(f"config.{key}={value}: per-layer optimizer groups need unscanned layers; "
                                     "set scan_layers=False")
        _check_lm_eval_probe(config.forgetting)
        if config.quantize_base != "none" and config.strategy != "lora":
            raise ValueError(f"config.quantize_base={config.quantize_base!r}: a quantised base is frozen; it needs "
                             f"strategy='lora', not {config.strategy!r}")
        super().check_config(config)

    def __init__(self, config: ml_collections.ConfigDict, rundir: RunDir):
        self.config, self.rundir = config, rundir
        self.tokenizer = load_lm_tokenizer(config.model, config.tokenizer)
        self.train_ds, self.eval_ds = self._load_data()
        # Safetensors weights go straight to where the trainer will keep them: the run's mesh and layout.
        mesh = sharding.make_mesh(config.mesh.to_dict())
        model, model_config = build_lm(
            config.model, config.strategy, config.dtype, lora=config.lora, seed=config.seed,
            param_dtype=config.param_dtype, quantize_base=config.quantize_base, scan_layers=config.scan_layers,
            frozen_layers=config.frozen_layers, ignore_weights=tuple(config.ignore_weights),
            placement=lambda names, shapes, axes: sharding.run_param_shardings(config, mesh, names, shapes, axes))
        check_fits(self.tokenizer, model_config.vocab_size, config.tokenizer or config.model)
        self.model_config = model_config
        longest = max(config.max_length, max(config.buckets))
        if longest > model_config.max_position_embeddings:
            raise ValueError(f"config.max_length={longest} exceeds the model's "
                             f"{model_config.max_position_embeddings} positions ({config.model})")
        self.model_def, self.params = ModelDef.split(model)
        self.layout = decoder_layout(model_config.num_layers, segment_sizes(model))
        self.loss_fn = loss_fn(config)
        self.pad_id = self.tokenizer.pad_token_id
        if config.data.streaming:
            self.batches = streamed_batches(config, self.train_ds, self._encode_records, self.pad_id,
                                            collate=functools.partial(lm_data.make_lm_batch, target_width="batch"))
        elif config.data.mixture:
            self.batches = mixture.mixture_batches(config, self.train_ds, self.pad_id, collate=lm_data.make_lm_batch)
            self.train_ds = self.batches.ds
        elif config.packing:
            packed = lm_data.pack(self.train_ds, max(config.buckets))
            self.batches = batching.TrainBatches(packed, config.batch_size, config.buckets, config.seed,
                                                 self.pad_id, group_window=config.data.group_window,
                                                 collate=lm_data.make_packed_batch)
        else:
            self.batches = batching.TrainBatches(self.train_ds, config.batch_size, config.buckets, config.seed,
                                                 self.pad_id, group_window=config.data.group_window,
                                                 collate=lm_data.make_lm_batch)
        self.summary = {"train_examples": len(self.train_ds), "eval_examples": len(self.eval_ds),
                        "eval_target_tokens": self.eval_ds.num_targets,
                        "data/eval_truncated": self.eval_ds.truncated}
        if not config.data.streaming:  # a stream tokenizes its records as it reads them
            self.summary.update({"train_rows": len(self.batches.ds), "train_target_tokens": self.train_ds.num_targets,
                                 "data/train_truncated": self.train_ds.truncated})
        if config.data.mixture:
            self.summary.update(self.batches.summary())

    def _load_data(self) -> tuple[lm_data.LmDataset, lm_data.LmDataset]:
        c, d = self.config, self.config.data
        if d.mixture:
            return self._load_mixture()
        if c.task == "sft":
            fields, fmt = sft_fields(c), prompt_format(c)
            self.eval_records = sft_data.read_sft(d.eval, fields, d.max_eval_examples)
            eval_ds = sft_data.encode_sft(self.eval_records, self.tokenizer, fmt, c.max_length, d.too_long)
            if d.streaming:  # one pass checks every record; the records stay on disk
                for where, raw in random_access.scan(d.train):
                    _one_record(raw, where, fields)
                return random_access.open_records(d.train), eval_ds
            train_records = sft_data.read_sft(d.train, fields)
            if d.validation_fraction:  # evaluations select on records carved from train; data.eval is reported
                self.test_data = {"eval_ds": eval_ds, "eval_records": self.eval_records}
                train_records, self.eval_records = batching.carve_validation(train_records, d.validation_fraction,
                                                                             c.seed)
                eval_ds = sft_data.encode_sft(self.eval_records, self.tokenizer, fmt, c.max_length, d.too_long)
            train_records = batching.subsample(train_records, d.max_train_examples, c.seed)
            train_ds = sft_data.encode_sft(train_records, self.tokenizer, fmt, c.max_length, d.too_long)
            return train_ds, eval_ds
        read = lm_data.read_documents
        eval_ds = lm_data.encode_documents(read(d.eval, d.text_field), self.tokenizer, c.max_length)
        documents = read(d.train, d.text_field)
        if d.validation_fraction:  # evaluations select on documents carved from train; data.eval is reported
            self.test_data = {"eval_ds": eval_ds}
            documents, held = batching.carve_validation(documents, d.validation_fraction, c.seed)
            eval_ds = lm_data.encode_documents(held, self.tokenizer, c.max_length)
        train_ds = lm_data.encode_documents(documents, self.tokenizer, c.max_length)
        return train_ds, eval_ds

    def _load_mixture(self) -> tuple[list[lm_data.LmDataset], lm_data.LmDataset]:
        """([training rows of each source], eval) of `data.mixture`, each source read in its own format; the
        sources' own evaluation data become `source_evals`."""
        sources = mixture.sources(self.config)
        eval_ds, self.eval_records = self._read_eval(self.config.data.eval, "")
        self.source_evals = {}
        for s in sources:
            if s.eval:
                ds, records = self._read_eval(s.eval, s.format)
                self.source_evals[s.name] = {"eval_ds": ds, "eval_records": records}
        return [self._read_train(s.train, s.format) for s in sources], eval_ds

    def _read_train(self, spec: str, source_format: str) -> lm_data.LmDataset:
        return read_train_rows(self.config, self.tokenizer, spec, source_format)

    def _read_eval(self, spec: str, source_format: str) -> tuple[lm_data.LmDataset, list[sft_data.Record]]:
        return read_eval_rows(self.config, self.tokenizer, spec, source_format)

    def _encode_records(self, items: list[tuple[str, dict]]) -> lm_data.LmDataset:
        """A streamed batch's sft records, tokenized with their target masks as in memory."""
        c = self.config
        fields, fmt = sft_fields(c), prompt_format(c)
        tokens, masks, where, cut = [], [], [], 0
        for at, raw in items:
            record = _one_record(raw, at, fields)
            ids, mask, truncated = sft_data.encode_checked(record, self.tokenizer, fmt, c.max_length,
                                                           c.data.too_long)
            tokens.append(np.asarray(ids, np.int32))
            masks.append(np.asarray(mask, np.int32))
            where.append(record.where)
            cut += truncated
        return lm_data.LmDataset(tokens, masks, where, cut)

    def evaluate(self, eval_fn, params, step: int | None = None) -> dict[str, float]:
        out = next_token_scores(eval_fn, params, self.eval_ds, self.config, self.pad_id)
        if self.config.eval_generation.metrics and self.eval_records:  # none for a mixture's plain-text source
            out.update(self._generation_metrics(params, step))
        return out

    def _generation_metrics(self, params, step: int | None) -> dict[str, float]:
        """Scores of greedy completions of the first eval prompts, encoded exactly as in training."""
        gen = self.config.eval_generation
        records = self.eval_records[: gen.num_examples]
        fmt = prompt_format(self.config)
        prompts = [sft_data.encode_prompt(r, self.tokenizer, fmt, self.config.max_length) for r in records]
        completions = generate.generate(self.model_def.merge(params), self.tokenizer, prompts,
                                        max_new_tokens=gen.max_new_tokens, stop=tuple(gen.stop),
                                        batch_size=gen.batch_size)
        predictions = [c.strip() for c in completions]
        references = [sft_data.reference_output(r) for r in records]
        scores = text_metrics.compute(gen.metrics, predictions, references)
        if distributed.is_primary():
            logged = list(zip(records, predictions, references))[: gen.log_examples]
            self.rundir.append_generations([{"step": step, "where": r.where, "prediction": pred, "reference": ref}
                                            for r, pred, ref in logged])
            for r, pred, ref in logged:
                tqdm.tqdm.write(f"  [{r.where}] prediction: {pred[:200]!r}\n  reference: {ref[:200]!r}")
        return {f"eval/{k}": v for k, v in scores.items()}

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"train/accuracy": sums["correct"] / max(sums["count"], 1), "train/target_tokens": sums["count"]}

    def batch_tokens(self, batch: dict[str, np.ndarray]) -> int:
        return int(np.count_nonzero(batch["segment_ids"]))

    def reference_inputs(self, count: int, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        batch = lm_data.make_lm_batch(self.eval_ds, np.arange(min(count, len(self.eval_ds))), rows,
                                      self.config.buckets, self.pad_id)
        return batch, (batch["segment_ids"] != 0).astype(np.float32)  # every real position, targets or prompt

    def reference_forward(self, model, batch: dict[str, jax.Array]) -> jax.Array:
        return model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"])

    def flops_model(self, trainable: tuple[str, ...]) -> FlopsModel:
        return decoder_flops_model(self.config, self.model_config)  # the plain model's, however it is stored

    def fisher(self, params: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Next-token batches of regularizer.fisher_data (max_length-token blocks), drawn with the seed."""
        r = self.config.regularizer
        ds = lm_data.encode_documents(lm_data.read_documents(r.fisher_data, self.config.data.text_field),
                                      self.tokenizer, self.config.max_length)
        order = np.random.default_rng(self.config.seed).permutation(len(ds))
        size = r.fisher_batch_size
        count = min(r.fisher_batches, len(ds) // size)
        if not count:
            raise DataError(f"{r.fisher_data}: {len(ds)} blocks of text, fewer than fisher_batch_size={size}")
        batches = [lm_data.make_lm_batch(ds, order[i * size:(i + 1) * size], size, self.config.buckets,
                                         self.pad_id) for i in range(count)]
        return regularizers.empirical_fisher(self.model_def, params, names, self.loss_fn, batches,
                                             seed=self.config.seed)

    def probes(self, params: dict) -> dict[str, float]:
        f = self.config.forgetting
        out = {}
        if f.wikitext2:
            r = wikitext2_perplexity(self.model_def, params, self.tokenizer, f.wikitext2,
                                     max_length=f.wikitext2_max_length, stride=f.wikitext2_stride,
                                     max_tokens=f.wikitext2_max_tokens or None)
            out.update({"wikitext2_ppl": r["token_perplexity"], "wikitext2_word_ppl": r["word_perplexity"]})
        if f.lm_eval_tasks:
            out.update(self._lm_eval_probe(params))
        return out

    def _lm_eval_probe(self, params: dict) -> dict[str, float]:
        """The harness tasks of `forgetting.lm_eval_tasks` on `params` where they lie (the run's mesh); which
        way each metric is better comes from the harness."""
        from sft_jax.evaluate import lm_harness

        f = self.config.forgetting
        lm = lm_harness.HarnessLM(self.model_def, params, self.tokenizer, batch_size=self.config.eval_batch_size)
        values, higher = lm_harness.run_tasks(lm, tuple(f.lm_eval_tasks), include_path=f.lm_eval_include_path,
                                              limit=f.lm_eval_limit or None)
        self.higher_is_better = {**type(self).higher_is_better, **higher}
        return values


def _check_lm_eval_probe(f: ml_collections.ConfigDict) -> None:
    """The harness probe's keys, before anything loads: the harness installed, the task folder there."""
    if not f.lm_eval_tasks:
        return
    if isinstance(f.lm_eval_tasks, str):
        raise ValueError(f"config.forgetting.lm_eval_tasks: a tuple of task names, got the string {f.lm_eval_tasks!r}")
    if f.lm_eval_limit < 0:
        raise ValueError(f"config.forgetting.lm_eval_limit: must be >= 0, got {f.lm_eval_limit}")
    if f.lm_eval_include_path and not os.path.isdir(f.lm_eval_include_path):
        raise ValueError(f"config.forgetting.lm_eval_include_path: {f.lm_eval_include_path}: no such folder")
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("config.forgetting.lm_eval_tasks: lm-evaluation-harness is not installed: "
                         "pip install 'lm_eval==0.4.13'")


def load_finetuned_lm(workdir: str, which: str = "best", *, merge: bool = False,
                      mesh: jax.sharding.Mesh | None = None) -> tuple[DecoderLM, DecoderConfig, Any]:
    """(model with the run's `which` checkpoint weights, its config, tokenizer) of a workdir.

    A `strategy=lora` run comes back with its adapters (`.../lora_a`, `.../lora_b`) as trained; with
    `merge=True` they are folded into the kernels, giving a plain `DecoderLM` (faster to generate with).
    The weights are on one device, or with `mesh` laid out over it by the run's own sharding rules (each
    process reading only its devices' shards of the checkpoint).
    """
    rundir = RunDir(workdir)
    run = rundir.read_config()
    # The frozen base is rebuilt as the run built it (checkpoints leave it out: `Task.rebuilds_base`): stored
    # as `param_dtype` before quantising.
    param_dtype = run.get("param_dtype", "float32")
    one_device = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",)),
                                            jax.sharding.PartitionSpec())

    def placement(names, shapes, axes):
        if mesh is None:
            return {n: one_device for n in names}
        return sharding.run_param_layout(ml_collections.ConfigDict(run), mesh, names, shapes, axes)

    lm, config = build_lm(run["model"], run["strategy"], run.get("dtype", "float32"), lora=run.get("lora"),
                          seed=run.get("seed", 0), param_dtype=param_dtype, placement=placement,
                          quantize_base=run.get("quantize_base", "none"),
                          scan_layers=run.get("scan_layers", False), frozen_layers=run.get("frozen_layers", 0),
                          ignore_weights=tuple(run.get("ignore_weights", ())))
    model_def, params = ModelDef.split(lm)
    params = in_storage_dtype(params, param_dtype, decoder_layout(config.num_layers))  # (a GGUF loads float32)
    if mesh is not None:  # the adapters, and a base the loader kept on the host (GGUF), onto the mesh too
        layout = placement(model_def.names, {k: v.shape for k, v in params.items()}, model_def.axes)
        params = {k: sharding.put_global(v, layout[k]) for k, v in params.items()}
    lm = unscan_decoder(model_def.merge(rundir.restore_params(params, which)))  # per-layer again
    return (merge_lora(lm) if merge else lm), config, load_lm_tokenizer(run["model"], run.get("tokenizer", ""))


def load_lm(model: str | None = None, workdir: str | None = None, dtype: str | None = None):
    """(DecoderLM, tokenizer) of a pre-trained `model`, or of the fine-tuned weights of the run in `workdir`
    (whose model `model`, if given, must name). `dtype` (float32 / bfloat16) is the compute dtype."""
    if workdir is None:
        if not model:
            raise ValueError("give --model=NAME_OR_PATH or --workdir=DIR")
        lm, _ = load_decoder(model, dtype=jnp.dtype(dtype or "float32"))
        return lm, load_lm_tokenizer(model)
    run_model = require_task(workdir, ("sft", "language_modeling"), "complete prompts").get("model")
    if model and model != run_model and os.path.abspath(model) != os.path.abspath(str(run_model)):
        raise ValueError(f"--model={model} differs from the model {run_model!r} of the run in {workdir}; "
                         "drop --model")
    lm, config, tokenizer = load_finetuned_lm(workdir, merge=True)  # LoRA folded in: a plain, faster module
    if dtype and jnp.dtype(dtype) != jnp.dtype(config.dtype):
        lm = with_dtype(lm, jnp.dtype(dtype))
    return lm, tokenizer


def _one_record(raw: dict, where: str, fields) -> sft_data.Record:
    """The one example of a streamed sft record (a stream is indexed by record, so one example each)."""
    records = sft_data.parse_record(raw, where, fields)
    if len(records) != 1:
        raise DataError(f"{where}: {len(records)} instances in one record; config.data.streaming reads one example "
                        "per record (write one record per instance)")
    return records[0]
