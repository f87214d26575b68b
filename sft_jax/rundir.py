"""The run directory (workdir) format, owned here and nowhere else.

    WORKDIR/
      config.json        the resolved config of the run (written once training has started: after the first step,
                         so a run that fails in set-up leaves none; its presence means the workdir has trained)
      run.lock           the lock of the training run using the workdir (`sft_jax.workdir_lock`), held for the
                         run's life; empty when released, naming host, pid and start time while held
      labels.json        the label vocabulary of a classification run
      results.json       final metrics (flat keys)
      metrics.jsonl      one line per logged step; TensorBoard event files beside it
      trackers.json      the W&B / MLflow run ids a resume appends to (`sft_jax.trainer.trackers`); wandb/ the
                         W&B run's local files (unless WANDB_DIR)
      generations.jsonl  sample generations of a language-model run's evaluations
      checkpoints/       orbax: latest/ (full train state) and best/ (parameters), see `sft_jax.checkpoint`;
                         a language model's frozen base is left out and rebuilt from config.json

Training, predict, generate and loading models from earlier runs all go through `RunDir`. Training claims the
workdir (`RunDir.claim`): one run at a time; predict and generate only read a finished one and take no lock.
A workdir may be a local path, a `file://` URL or on gs:// (`sft_jax.storage`); orbax cannot write checkpoints
to s3:// (`sft_jax.checkpoint.check_store`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

from sft_jax import storage
from sft_jax.checkpoint import CHECKPOINTS_DIR, Checkpoints, DamagedCheckpoint, check_store
from sft_jax.data.batching import LabelVocab
from sft_jax.workdir_claim import Claim, claim
from sft_jax.workdir_lock import WorkdirLock

CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
TRACKERS_FILE = "trackers.json"
GENERATIONS_FILE = "generations.jsonl"
# Changing these between runs on one workdir would resume a different experiment.
INCOMPATIBLE_KEYS = ("model", "task", "strategy", "frozen_layers", "pooling", "seed", "batch_size", "lora",
                     "param_dtype", "master_dtype", "quantize_base", "optimizer_state_dtype", "vit", "regularizer",
                     "llrd", "gradual_unfreeze", "lp_ft", "scan_layers", "tokenizer")


def read_json(path: str, what: str) -> Any:
    """The JSON in a run file; one cut short or garbled is a ValueError naming it (json's own message names
    no file)."""
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        detail = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else e
        raise ValueError(f"{path} is damaged ({detail}); it holds the run's {what}: restore it or use a new "
                         "workdir") from None


class RunDir:
    """One run's directory: its file paths, and reading and writing what it holds."""

    def __init__(self, path: str | os.PathLike):
        self.path = storage.normalize(path)

    def file(self, name: str) -> str:
        return storage.join(self.path, name)

    def is_run(self, *, labels: bool = False) -> bool:
        """Whether this is an sft_jax workdir (config.json and checkpoints/, and labels.json if `labels`)."""
        names = (CONFIG_FILE, CHECKPOINTS_DIR) + ((LABELS_FILE,) if labels else ())
        return storage.isdir(self.path) and all(storage.exists(self.file(n)) for n in names)

    # --- config -------------------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """The run's resolved config; FileNotFoundError when this is not a workdir."""
        path = self.file(CONFIG_FILE)
        if not storage.isfile(path):
            raise FileNotFoundError(f"{self.path}: no {CONFIG_FILE}; is this a sft_jax workdir?")
        config = read_json(path, "resolved config")
        if not isinstance(config, dict):
            raise ValueError(f"{path} is damaged (not a JSON object): restore it or use a new workdir")
        return config

    def write_config(self, config: dict[str, Any]) -> None:
        # Written whole (CONFIG_FILE.tmp replaced at once): a crash never leaves half a config.json.
        storage.write_json(self.file(CONFIG_FILE), config, default=str)

    def has_trained(self) -> bool:
        """Whether a run has trained here (config.json is written at its first step): what a run left behind
        before that (labels.json of a failed set-up) binds no later run."""
        return storage.isfile(self.file(CONFIG_FILE))

    def check_resume(self, config: dict[str, Any]) -> None:
        """Refuses to resume a run whose config differs from `config` in a key that changes the experiment; a
        workdir that has not trained (`has_trained`) binds nothing."""
        if not self.has_trained():
            return
        old = self.read_config()
        changed = [k for k in INCOMPATIBLE_KEYS if k in old and old[k] != config[k]]
        if changed:
            detail = ", ".join(f"{k}: {old[k]!r} -> {config[k]!r}" for k in changed)
            raise ValueError(f"{self.path}: cannot resume, the config changed incompatibly ({detail}); "
                             "use a new workdir")

    # --- the training run's claim ---------------------------------------------------------------------------
    def lock(self) -> WorkdirLock:
        """The workdir's lock (`sft_jax.workdir_lock`), not yet taken."""
        return WorkdirLock(self.path)

    def claim(self) -> contextlib.AbstractContextManager[Claim]:
        """For a training run's whole life: creates the workdir and holds its lock (a second run stops with one
        line naming the holder); yields a `Claim` whose `commit(config)` at the first step writes config.json.
        A run that fails before that leaves nothing behind (`sft_jax.workdir_claim`)."""
        return claim(self, (LABELS_FILE, METRICS_FILE, CONFIG_FILE + ".tmp"))

    def ensure_writable(self) -> None:
        """Creates the directory and fails now, not at the first checkpoint an hour later, if it is read-only (or on
        a store orbax cannot write checkpoints to)."""
        check_store(self.path)
        try:
            storage.makedirs(self.path)
            probe = self.file(f".write_test.{os.getpid()}")
            with storage.open(probe, "w") as f:
                f.write("ok")
            storage.remove(probe)
        except OSError as e:
            raise PermissionError(f"{self.path}: cannot write the workdir ({e.strerror or e})") from None

    # --- labels, results, generations ---------------------------------------------------------------------
    @property
    def labels_path(self) -> str:
        return self.file(LABELS_FILE)

    def read_labels(self) -> LabelVocab:
        if not storage.isfile(self.labels_path):
            raise FileNotFoundError(f"{self.path}: no {LABELS_FILE}; is this the workdir of a classification run?")
        saved = read_json(self.labels_path, "label vocabulary")
        labels = saved.get("labels") if isinstance(saved, dict) else None
        if not isinstance(labels, list) or not labels:
            raise ValueError(f"{self.labels_path} is damaged (no list of labels): restore it or use a new workdir")
        return LabelVocab(labels)

    def write_labels(self, vocab: LabelVocab) -> None:
        storage.write_json(self.labels_path, {"labels": vocab.labels})

    def write_results(self, results: dict[str, Any]) -> None:
        storage.write_json(self.file(RESULTS_FILE), results)

    def append_generations(self, rows: list[dict[str, Any]]) -> None:
        out = storage.Appender(self.file(GENERATIONS_FILE))
        try:
            out.write("".join(json.dumps(row) + "\n" for row in rows))
        finally:
            out.close()

    # --- checkpoints --------------------------------------------------------------------------------------
    def restore_params(self, target_params: dict, which: str = "best", *, fallback: bool = True) -> dict:
        """The parameters of the `which` checkpoint, in the shapes of `target_params`; with `fallback`, "best"
        falls back to "latest" for a run that has not evaluated yet, or whose best checkpoint is damaged (said in
        one line)."""
        ckpt = Checkpoints(self.path)
        try:
            try:
                params, _ = ckpt.restore_params(target_params, which)
            except (FileNotFoundError, DamagedCheckpoint) as e:
                if not fallback or which == "latest":
                    raise
                if isinstance(e, DamagedCheckpoint):
                    print(f"{e}; using the latest checkpoint instead", file=sys.stderr)
                params, _ = ckpt.restore_params(target_params, "latest")
        finally:
            ckpt.close()
        return params
