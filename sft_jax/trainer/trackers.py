"""Where `MetricWriter` sends each logged step besides metrics.jsonl: TensorBoard always, Weights & Biases and
MLflow when `config.logging` names them. Each tracker gets the run's config once (as hyperparameters), every
train / eval line at its step, and results.json at the end.

A resumed run appends to the same W&B / MLflow run: their ids are kept in WORKDIR/trackers.json, with the last
step any process of the run has sent. TensorBoard forgets the steps after the checkpoint (`purge_step`); W&B and
MLflow cannot, so the steps a killed process had already sent are not sent again (a resume recomputes them
bit-identically: only timings differ).

wandb and mlflow are optional imports, opened at the first logged step: a run failing in set-up makes no
tracker run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from typing import Any

from sft_jax.rundir import TRACKERS_FILE, RunDir

# config.logging key -> (module imported, what to pip install)
PACKAGES = {"wandb": ("wandb", "wandb==0.31.0"), "mlflow": ("mlflow", "mlflow-skinny==3.18.0")}


def check_installed(logging_config) -> None:
    """Refuses, in one line naming the pip package, a tracker the config names whose package is missing: before
    the model loads, not at the first logged step."""
    for key, (module, pip_name) in PACKAGES.items():
        if logging_config[key] and importlib.util.find_spec(module) is None:
            raise ValueError(f"config.logging.{key}={logging_config[key]!r} needs the {module} package: "
                             f"pip install {pip_name}")


class RunIds:
    """WORKDIR/trackers.json: each tracker's run id, and `sent_until`, the last step sent to them."""

    def __init__(self, rundir: RunDir):
        self.path = rundir.file(TRACKERS_FILE)
        self.ids: dict[str, Any] = {}
        if os.path.exists(self.path):
            from sft_jax.rundir import read_json

            self.ids = read_json(self.path, "W&B / MLflow run ids")
            if not isinstance(self.ids, dict):
                raise ValueError(f"{self.path} is damaged (not a JSON object): restore it or delete it (a new "
                                 "tracker run starts)")

    def get(self, key: str, default=None):
        return self.ids.get(key, default)

    def set(self, key: str, value) -> None:
        self.ids[key] = value
        tmp = self.path + ".tmp"  # replaced at once: a crash never leaves half a file
        with open(tmp, "w") as f:
            json.dump(self.ids, f, indent=1)
        os.replace(tmp, self.path)


class TensorBoard:
    """Event files in the workdir; a resume purges the steps after its checkpoint from TensorBoard's view."""

    def __init__(self, path: str, resume_step: int):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(path, purge_step=resume_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run named after the workdir, its files under WANDB_DIR or else the workdir."""

    def __init__(self, config, rundir: RunDir, ids: RunIds):
        self.config, self.rundir, self.ids, self.run = config, rundir, ids, None

    def _open(self):
        import wandb
        from wandb.sdk.lib.runid import generate_id

        run_id, resumed = self.ids.get("wandb"), True
        if run_id is None:  # kept before the run starts: a process killed in wandb.init still resumes this id
            run_id, resumed = generate_id(), False
            self.ids.set("wandb", run_id)
        hyper = self.config.to_dict()
        # finish_previous: the run of a train_and_evaluate that raised earlier in this process (a notebook) ends
        self.run = wandb.init(project=self.config.logging.wandb, mode=self.config.logging.wandb_mode, id=run_id,
                              resume="allow", reinit="finish_previous", name=_run_name(self.rundir),
                              dir=None if os.environ.get("WANDB_DIR") else self.rundir.path,
                              config=None if resumed else hyper)
        if resumed:  # this process's config (e.g. a longer max_steps) replaces the first one's
            self.run.config.update(hyper, allow_val_change=True)
        return self.run

    def log(self, step: int, values: dict[str, float]) -> None:
        (self.run or self._open()).log(values, step=step)

    def summarise(self, results: dict[str, Any]) -> None:
        (self.run or self._open()).summary.update(results)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


_MLFLOW_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")  # what MLflow refuses in metric and param names


class MLflow:
    """An MLflow run named after the workdir in `config.logging.mlflow_experiment`; results go in as
    `final/<key>` metrics (numbers) and tags (the rest)."""

    def __init__(self, config, rundir: RunDir, ids: RunIds):
        self.config, self.rundir, self.ids = config, rundir, ids
        self.client, self.run_id, self.finished = None, None, False

    def _open(self) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        logging = self.config.logging
        self.client = client = MlflowClient(tracking_uri=logging.mlflow)
        run_id = self.ids.get("mlflow")
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            except MlflowException as e:
                print(f"{self.ids.path}: MLflow run {run_id} not found at {logging.mlflow} ({e.error_code}); "
                      "starting a new one", file=sys.stderr)
        if self.run_id is None:
            experiment = client.get_experiment_by_name(logging.mlflow_experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                logging.mlflow_experiment)
            self.run_id = client.create_run(experiment_id, run_name=_run_name(self.rundir)).info.run_id
            self.ids.set("mlflow", self.run_id)
        self._log_params()
        return self.run_id

    def _log_params(self) -> None:
        """The config, flattened to dotted keys. MLflow refuses to change a logged param: a resumed run adds only
        the keys the first process did not log."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        logged = self.client.get_run(self.run_id).data.params
        params = [Param(_mlflow_key(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in _flatten(self.config.to_dict())]
        params = [p for p in params if p.key not in logged]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        run_id = self.run_id or self._open()
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(_mlflow_key(k), float(v), now, step) for k, v in values.items()])

    def summarise(self, results: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self.run_id or self._open()
        now, step = int(time.time() * 1000), int(results.get("step", 0))
        numbers = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        self.client.log_batch(
            run_id, metrics=[Metric(_mlflow_key(f"final/{k}"), float(v), now, step) for k, v in numbers.items()],
            tags=[RunTag(_mlflow_key(f"final/{k}"), str(v)) for k, v in results.items() if k not in numbers])
        self.finished = True

    def close(self) -> None:
        if self.run_id is not None:  # a preempted run is KILLED until a resume finishes it
            self.client.set_terminated(self.run_id, "FINISHED" if self.finished else "KILLED")


def _run_name(rundir: RunDir) -> str:
    return os.path.basename(os.path.abspath(rundir.path))


def _mlflow_key(key: str) -> str:
    return _MLFLOW_BAD_KEY_CHARS.sub("_", key)


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        out.extend(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)])
    return out


class Trackers:
    """TensorBoard and the trackers `config.logging` names (a config without that section: TensorBoard alone).
    `sent_until`: the last step in metrics.jsonl before a resume dropped what came after its checkpoint."""

    def __init__(self, rundir: RunDir, resume_step: int, config=None, sent_until: int = 0):
        self.tensorboard = TensorBoard(rundir.path, resume_step)
        logging = config.get("logging") if config is not None else None
        self.external: list = []
        if logging and any(logging[key] for key in PACKAGES):
            ids = RunIds(rundir)
            self.sent_until = max(sent_until, ids.get("sent_until", 0))  # also what a process before that sent
            if self.sent_until > ids.get("sent_until", 0):  # a fresh run writes the file at its first send
                ids.set("sent_until", self.sent_until)
            kinds = {"wandb": WandB, "mlflow": MLflow}
            self.external = [kinds[key](config, rundir, ids) for key in PACKAGES if logging[key]]

    def log(self, step: int, values: dict[str, float]) -> None:
        self.tensorboard.log(step, values)
        if self.external and step > self.sent_until:
            for tracker in self.external:
                tracker.log(step, values)

    def summarise(self, results: dict[str, Any]) -> None:
        for tracker in self.external:
            tracker.summarise(results)

    def close(self) -> None:
        self.tensorboard.close()
        for tracker in self.external:
            tracker.close()
