"""The Task contract: everything the training loop needs from a task, so that the loop never names one.

A task family (text classification, language modelling, ...) subclasses `Task` and registers under the
`config.task` names it serves (`sft_jax.tasks.register`). The loop asks the class to check the config before
anything loads, builds it once per run, and from then on uses only the attributes and hooks below.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import ml_collections
import numpy as np

from sft_jax.data import mixture
from sft_jax.flops import FlopsModel
from sft_jax.models.layout import ParamLayout
from sft_jax.rundir import RunDir
from sft_jax.state import ModelDef

# A pure loss `(model, batch, rng) -> (loss, aux)`; aux holds sums that metrics are made of.
LossFn = Callable[[Any, dict, jax.Array | None], tuple[jax.Array, dict]]
# The jitted evaluation step the loop hands to `Task.evaluate`: `(params, host_batch) -> aux` (see `losses`).
EvalFn = Callable[[dict, dict], dict]


class TrainBatches(Protocol):
    """The training stream: `batch(step)` is a host batch (numpy arrays), a pure function of the step, so a
    resumed run sees exactly the batches an uninterrupted one would."""

    def batch(self, step: int) -> dict[str, np.ndarray]: ...


class Task(abc.ABC):
    """A task family behind one interface.

    Declared on the class (read before anything is loaded):
      strategies          the `config.strategy` values the task supports;
      decoder             whether the model is a decoder LM (picks XLA:CPU's matmul library, see
                          `train_step.compiler_options`);
      higher_is_better    for each forgetting probe the task reports, whether a higher value is better (the
                          forgetting summary reports a "drop" of those and a "rise" of the others);
      exclusive_options   config keys only this task reads, each with what it is: set for another task,
                          they are refused (`registry.check_config`) instead of silently ignored;
      streams             whether it reads `config.data.streaming` training data (`data.streaming`);
      mixture_formats     the `format` values a source of `config.data.mixture` may have ("": the task's own
                          records; `data.mixture`); () for a task that trains on data.train alone;
      rebuilds_base       whether the parameters a run never trains are rebuilt bit-identically from its
                          config.json (pre-trained weights, then the run's deterministic changes: adapters,
                          quantisation, scanning, storage dtype), by the task and by its loaders of a workdir:
                          its checkpoints then leave them out (`checkpoint.FrozenBase`).

    Set by `__init__(config, rundir)`, which reads the data before it loads a model (bad input stops a run
    before minutes go into loading weights):
      model_def, params   the model to fine-tune (`ModelDef.split` of an NNX module), parameters by path;
      layout              where its embeddings, blocks and head live (for strategies and layer groups);
      loss_fn             the training loss, also used by evaluation;
      batches             the training batches (`TrainBatches`);
      summary             counts for results.json (examples, labels, truncation, ...);
      test_data           with `data.validation_fraction`: the reported split (data.eval), as the attributes
                          `evaluate` reads its evaluation set from ({"eval_ds": ..., ...}), while those
                          attributes hold the validation examples carved from train; None otherwise;
      source_evals        with `data.mixture`: for each source with evaluation data, its name and the attributes
                          `evaluate` reads for it (like `test_data`); {} otherwise.
    """

    strategies: ClassVar[tuple[str, ...]] = ("head", "partial", "full")
    decoder: ClassVar[bool] = False
    higher_is_better: ClassVar[dict[str, bool]] = {}
    exclusive_options: ClassVar[dict[str, str]] = {}
    rebuilds_base: ClassVar[bool] = False
    streams: ClassVar[bool] = False
    mixture_formats: ClassVar[tuple[str, ...]] = ()

    model_def: ModelDef
    params: dict[str, jax.Array]
    layout: ParamLayout
    loss_fn: LossFn
    batches: TrainBatches
    summary: dict[str, Any]
    test_data: dict[str, Any] | None = None
    source_evals: dict[str, dict[str, Any]] = {}  # noqa: RUF012 (replaced, never mutated)

    @abc.abstractmethod
    def __init__(self, config: ml_collections.ConfigDict, rundir: RunDir):
        """Reads the data and builds the model of `config`; `rundir` holds what an earlier run saved."""

    # --- before loading -----------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def metric_names(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The names `evaluate` returns under `config` (early stopping picks one of them)."""

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Refuses, with one line naming the key, an option this task does not support. Subclasses extend it."""
        if config.strategy not in cls.strategies:
            raise ValueError(f"config.strategy: {config.strategy} is not supported by task {config.task!r}; "
                             f"use one of {cls.strategies}")
        names = cls.metric_names(config)
        names += mixture.metric_names(config, names)
        if config.early_stopping.metric not in names:
            raise ValueError(f"config.early_stopping.metric: {config.early_stopping.metric!r} is not one of "
                             f"{names} for task {config.task!r}")
        if config.data.streaming and config.data.validation_fraction:
            raise ValueError("config.data.validation_fraction: not with data.streaming (a stream holds no examples to "
                             "carve from; write the validation examples to their own file and evaluate on it)")
        if config.data.streaming and not cls.streams:
            raise ValueError(f"config.data.streaming: task {config.task!r} reads its training data into memory; "
                             "set streaming=False")
        if config.data.mixture:
            cls._check_mixture(config)
        if config.regularizer.ewc and not cls.supports_ewc():
            raise ValueError(f"config.regularizer.ewc: task {config.task!r} has no Fisher objective")
        if (config.drift.cka or config.drift.kl) and not cls.supports_reference():
            raise ValueError(f"config.drift: task {config.task!r} has no reference inputs for drift.cka / drift.kl")
        if config.drift.kl and not cls.decoder:
            raise ValueError(f"config.drift.kl: next-token distributions need a decoder LM, not task {config.task!r}")

    @classmethod
    def _check_mixture(cls, config: ml_collections.ConfigDict) -> None:
        if not cls.mixture_formats:
            raise ValueError(f"config.data.mixture: task {config.task!r} trains on data.train alone")
        for i, source in enumerate(mixture.sources(config)):
            if source.format not in cls.mixture_formats:
                raise ValueError(f"config.data.mixture[{i}].format: {source.format!r} is not one task "
                                 f"{config.task!r} reads; use one of {cls.mixture_formats}")
        d = config.data
        for key, value in (("data.train", d.train), ("data.streaming", d.streaming),
                           ("data.validation_fraction", d.validation_fraction),
                           ("data.max_train_examples", d.max_train_examples), ("packing", config.packing)):
            if value:
                raise ValueError(f"config.{key}: not with data.mixture (each source of the mixture names its own "
                                 f"training file, read whole into memory and unpacked); got {value!r}")

    @classmethod
    def supports_ewc(cls) -> bool:
        return cls.fisher is not Task.fisher

    @classmethod
    def supports_reference(cls) -> bool:
        """Whether the task gives reference inputs (`reference_inputs`): drift.cka and drift.kl need them."""
        return cls.reference_inputs is not Task.reference_inputs

    # --- during and after training ------------------------------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, eval_fn: EvalFn, params: dict, step: int | None = None) -> dict[str, float]:
        """The task's metrics (`metric_names`) of `params` on its evaluation set; `step` labels any output
        written along the way (generations)."""

    def evaluate_reported(self, eval_fn: EvalFn, params: dict, step: int | None = None) -> dict[str, float]:
        """With `test_data`: `evaluate` on the reported split, its eval/... metrics named test/...; else {}."""
        if not self.test_data:
            return {}
        metrics = self._evaluate_on(self.test_data, eval_fn, params, step)
        return {"test/" + k[len("eval/"):]: v for k, v in metrics.items() if k.startswith("eval/")}

    def evaluate_sources(self, eval_fn: EvalFn, params: dict, step: int | None = None) -> dict[str, float]:
        """`evaluate` on the evaluation data of each mixture source (`source_evals`), its eval/... metrics named
        eval/<source>/...; {} without a mixture."""
        out = {}
        for name, data in self.source_evals.items():
            metrics = self._evaluate_on(data, eval_fn, params, step)
            out.update({f"eval/{name}/{k[len('eval/'):]}": v for k, v in metrics.items() if k.startswith("eval/")})
        return out

    def _evaluate_on(self, data: dict[str, Any], eval_fn: EvalFn, params: dict, step: int | None) -> dict[str, float]:
        """`evaluate` with the attributes `data` names set to its values for the call."""
        selection = {name: getattr(self, name) for name in data}
        try:
            for name, value in data.items():
                setattr(self, name, value)
            return self.evaluate(eval_fn, params, step)
        finally:
            for name, value in selection.items():
                setattr(self, name, value)

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Logged training metrics from the train step's summed aux values."""
        return {"train/accuracy": sums["correct"] / max(sums["count"], 1)}

    def batch_tokens(self, batch: dict[str, np.ndarray]) -> int:
        """How many real tokens a host batch holds (0 for inputs that are not tokens), for tokens/s."""
        return 0

    def flops_model(self, trainable: tuple[str, ...]) -> FlopsModel | None:
        """What counts the model FLOPs of a train step of this run (MFU) with `trainable` parameters; None: the
        task does not count them (no MFU is logged)."""
        return None

    def flops_shape(self, batch: dict[str, np.ndarray]) -> tuple[int, int]:
        """(rows, sequence length) a host batch is computed at, for `flops_model`."""
        rows, length = batch["input_ids"].shape
        return rows, length

    def probes(self, params: dict) -> dict[str, float]:
        """Forgetting probes of general ability (named as in `higher_is_better`); {} when none is configured."""
        return {}

    def reference_inputs(self, count: int, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Representation drift (`sft_jax.representation_drift`): a host batch of `rows` rows holding the first
        `count` evaluation examples (fewer when there are fewer; the other rows padding), the same at every
        call, and its token mask [rows, T] (1 for a real token of a real example, 0 for padding). A task
        without them leaves this as it is: drift.cka and drift.kl are then refused."""
        raise NotImplementedError

    def reference_forward(self, model, batch: dict[str, jax.Array]) -> jax.Array | None:
        """Runs `model` on a `reference_inputs` batch (traced; every block's output is recorded on the way,
        `models.block_outputs`): the next-token logits [rows, T, V] of a decoder LM, None for other models."""
        raise NotImplementedError

    def fisher(self, params: dict, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """EWC: the diagonal Fisher of a pre-training-like objective at `params`, for the parameters `names`
        (`regularizers.empirical_fisher`). A task without one leaves this as it is: EWC is then refused."""
        raise NotImplementedError
