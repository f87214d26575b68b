"""train_and_evaluate(config, workdir): load, fine-tune, evaluate, probe forgetting, checkpoint, resume."""

from __future__ import annotations

import time

import jax
import ml_collections
import tqdm

from sft_jax import distributed, drift, platform, sharding, storage, tasks
from sft_jax.checkpoint import Checkpoints, DamagedCheckpoint
from sft_jax.config_defaults import early_stopping_mode, validate
from sft_jax.models import quant
from sft_jax.representation_drift import RepresentationDrift
from sft_jax.rundir import RunDir
from sft_jax.state import count_params, params_fingerprint
from sft_jax.trainer import forgetting, guards, setup, throughput, trackers
from sft_jax.trainer.metrics import MetricWriter, due
from sft_jax.trainer.profile import StepProfiler
from sft_jax.workdir_claim import Claim


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes per `config`, writing everything to `workdir`; resumes from its latest checkpoint. With
    `config.stages`, trains the stages in order (`sft_jax.trainer.stages`)."""
    validate(config)  # the task's own checks included: before anything loads
    if config.stages:
        from sft_jax.trainer.stages import train_stages

        return train_stages(config, workdir, train_and_evaluate)
    trackers.check_installed(config.logging)  # wandb / mlflow named but not installed: one line, now
    task_cls = tasks.get(config.task)
    platform.configure_determinism(config.deterministic)  # XLA_FLAGS: before the backend starts
    distributed.initialize(config)  # before anything touches the devices
    rundir = RunDir(workdir)
    with rundir.claim() as claim:  # one run per workdir; a run that fails in set-up leaves nothing behind
        return _train(config, task_cls, rundir, claim)


def _train(config: ml_collections.ConfigDict, task_cls, rundir: RunDir, claim: Claim) -> dict:
    workdir = rundir.path
    rundir.check_resume(config.to_dict())
    task = task_cls(config, rundir)
    task.params = setup.in_storage_dtype(task.params, config.param_dtype, task.layout)
    task.model_def = setup.with_model_options(task.model_def, task.params, config)
    # WiSE-FT interpolates from the pre-trained weights: a host copy (the device ones are donated).
    keep_pretrained = config.wise_ft.alphas or config.drift.params or config.drift.cka or config.drift.kl
    pretrained = {k: sharding.to_host(v) for k, v in task.params.items()} if keep_pretrained else None
    ckpt = Checkpoints(workdir, clean_unfinished=True)  # removes what an interrupted save left
    run = setup.prepare(config, task, ckpt, workdir)
    drift_of = _drift_probe(config, task, pretrained, run)
    if not (config.wise_ft.alphas or config.drift.params):
        pretrained = None  # the representation probe keeps its own host copies: the trained tensors' only
    state, meta = run.state, run.meta
    results = {"trainable_params": count_params(task.params, run.trainable),
               "total_params": quant.count_weights(task.params), **task.summary}
    if task.test_data:
        results["test_examples"] = len(task.test_data["eval_ds"])
    # The "before" probe runs once, on the pre-trained weights, and is kept in the checkpoint meta for resumes.
    if "probes_before" not in meta:
        meta["probes_before"] = task.probes(task.params)
    for name, value in meta["probes_before"].items():
        results[f"forgetting/{name}/before"] = value

    writer = MetricWriter(rundir, resume_step=int(state.step), config=config)  # drops lines logged after the checkpoint
    step = prior_step = int(state.step)
    t0, examples, tokens, eval_time = time.time(), 0, 0, 0.0
    bar = tqdm.tqdm(total=config.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not distributed.is_primary())
    last_eval, last = None, False
    prior_seconds = meta.get("train_seconds", 0.0)  # training time of earlier processes (resumes)
    nonfinite: list[tuple[int, jax.Array]] = []  # (step, flag) of steps not yet checked on the host
    speed = _throughput(config, task, run)
    flops_model = task.flops_model(run.trainable)
    profiler = StepProfiler(config.profile_steps, rundir.file("profile"))
    preempt = guards.Preemption()
    try:
        while (step < config.max_steps and not meta["stopped_early"] and not meta.get("out_of_time")
               and not preempt.requested):
            ckpt.poll()  # a save that failed in the background stops the run here, not at the next save
            distributed.set_phase(f"train step {step + 1}")  # named if another process dies meanwhile
            host_batch = task.batches.batch(step)
            batch_tokens = task.batch_tokens(host_batch)
            tokens += batch_tokens
            profiler.before(step + 1)
            state, m = run.train_fns(step)(state, sharding.put_batch(host_batch, run.b_shard))
            profiler.after(step + 1, state)
            claim.commit(config)  # compiled and running: from here the workdir is this run's
            if step == prior_step:  # this process's first step compiled: the windows start after it
                jax.block_until_ready(m)
                speed.restart()
            else:
                speed.add(batch_tokens, flops_model.per_step(*task.flops_shape(host_batch)) if flops_model else 0.0)
            step += 1
            examples += config.batch_size
            meta["train_seconds"] = prior_seconds + time.time() - t0 - eval_time
            if config.max_train_seconds and meta["train_seconds"] >= config.max_train_seconds:
                meta["out_of_time"] = True  # an equal-compute budget: stop here, as if max_steps were reached
            last = step == config.max_steps or bool(meta.get("out_of_time"))
            nonfinite.append((step, m["nonfinite"]))
            keep = step in config.keep_checkpoints_at
            if due(step, config.log_every, last, step % config.eval_every == 0,
                   step % config.checkpoint_every == 0, preempt.requested, keep):  # before anything is saved
                guards.check_finite(nonfinite, config.nan_policy, meta, ckpt)
                nonfinite.clear()
            if due(step, config.log_every, last):
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                rate = examples / max(time.time() - t0 - eval_time, 1e-9)
                window = speed.report()
                writer.write(step, {"train/loss": m["loss"], **task.train_metrics(m), "train/grad_norm": m["grad_norm"],
                                    "train/learning_rate": float(run.schedule(step - 1)), "train/examples_per_s": rate,
                                    **window, "train/skipped_steps": meta.get("skipped_steps", 0)})
                bar.set_postfix(loss=f"{m['loss']:.4f}", ex_per_s=f"{rate:.1f}", **_speed_postfix(window))
            bar.update(1)
            if due(step, config.eval_every, last):
                distributed.set_phase(f"the evaluation at step {step}")
                t_eval = time.time()
                last_eval = _evaluate(config, task, run, state, step, meta, ckpt, writer, bar, drift_of)
                eval_time += time.time() - t_eval
                speed.exclude(time.time() - t_eval)
            if keep:
                guards.check_saveable(state)
                ckpt.save_kept(state, meta)
            if due(step, config.checkpoint_every, last, meta["stopped_early"], preempt.requested):
                guards.check_saveable(state)
                distributed.set_phase(f"the checkpoint save of step {step}")
                ckpt.save_latest(state, meta)
    finally:
        profiler.close()
        preempt.restore()
        bar.close()  # also when the loop raises: the error prints on a line of its own
    distributed.set_phase(f"the last checkpoint save and final evaluation (step {step})")
    ckpt.wait()
    if preempt.requested and step < config.max_steps and not last:
        writer.close()
        ckpt.close()
        return {"preempted": True, "step": step}
    elapsed = time.time() - t0
    train_seconds = elapsed - eval_time  # includes compilation and checkpoint saves

    # Final metrics are those of the best checkpoint (early stopping keeps it).
    guards.check_trained(meta, step, config.early_stopping.metric)  # e.g. every step skipped
    best_params = _best_params(ckpt, state, meta, step)
    if last_eval is not None and meta["best_step"] == step:
        results.update(last_eval)  # the last evaluation was of these very parameters
    else:
        results.update(task.evaluate(run.eval_fn, best_params, meta["best_step"]))
        results.update(task.evaluate_sources(run.eval_fn, best_params, meta["best_step"]))  # with data.mixture
    results.update(task.evaluate_reported(run.eval_fn, best_params, meta["best_step"]))  # with a validation split
    results.update(forgetting.summarise(task, meta["probes_before"], task.probes(best_params)))
    if drift_of is not None:
        results.update(drift_of(best_params))
        if distributed.is_primary() and not storage.is_remote(workdir):
            drift.plot(results, rundir.file("drift.png"))
    if config.wise_ft.alphas:
        results.update(forgetting.wise_ft_sweep(task, config.wise_ft.alphas, run.eval_fn, pretrained, best_params,
                                                run.p_shard, meta["probes_before"]))
    results.update({"step": step, "best_step": meta["best_step"], "stopped_early": meta["stopped_early"],
                    "skipped_steps": meta.get("skipped_steps", 0),
                    "stopped_out_of_time": bool(meta.get("out_of_time")),
                    **({"forked_from": meta["forked_from"]} if meta.get("forked_from") else {}),
                    "params_fingerprint": params_fingerprint(state.params),
                    "best_params_fingerprint": params_fingerprint(best_params)})
    if examples:
        results.update({"train/examples_per_s": examples / train_seconds, "train/wall_time_s": elapsed})
        if tokens:  # texts only
            results["train/tokens_per_s"] = tokens / train_seconds
    guards.check_results(results, meta["best_step"])  # never a nan result
    if distributed.is_primary():
        rundir.write_results(results)
    writer.write_results(results)
    writer.close()
    ckpt.close()
    return results


def _throughput(config, task, run: setup.Training) -> throughput.Throughput:
    """The window counter of train/tokens_per_s and train/mfu (process 0 logs: only it finds the peak)."""
    peak = None
    if distributed.is_primary():
        peak = throughput.total_peak_flops(config.dtype, config.logging.peak_flops, list(run.b_shard.mesh.devices.flat),
                                           compiler_options=run.compiler_options or None)
    return throughput.Throughput(peak)


def _speed_postfix(window: dict[str, float]) -> dict[str, str]:
    out = {}
    if "train/tokens_per_s" in window:
        out["tok_per_s"] = f"{window['train/tokens_per_s']:.0f}"
    if "train/mfu" in window:
        out["mfu"] = f"{window['train/mfu']:.0%}"
    return out


def _drift_probe(config, task, pretrained: dict | None, run: setup.Training):
    """params -> drift/... metrics against the pre-trained model (`config.drift`: the weights' change, the
    blocks' representations and a decoder's next-token distributions), or None when none is asked for."""
    d = config.drift
    probes = []
    if d.params:
        scale = config.lora.alpha / config.lora.rank if config.strategy == "lora" else None
        probes.append(lambda params: drift.param_drift(pretrained, {k: sharding.to_host(v) for k, v in params.items()},
                                                       task.layout, scale))
    if d.cka or d.kl:
        probes.append(RepresentationDrift(task, pretrained, run.trainable, count=d.reference_examples, cka=d.cka,
                                          kl=d.kl, p_shard=run.p_shard, b_shard=run.b_shard,
                                          logical_rules=sharding.run_logical_rules(config)))
    if not probes:
        return None

    def probe(params: dict) -> dict[str, float]:
        return {k: v for one in probes for k, v in one(params).items()}

    return probe


def _evaluate(config, task, run: setup.Training, state, step: int, meta: dict, ckpt: Checkpoints,
              writer: MetricWriter, bar, drift_of=None) -> dict[str, float]:
    """Evaluates (and probes, with forgetting.every_eval), keeps the best checkpoint, decides early stopping."""
    ev = {**task.evaluate(run.eval_fn, state.params, step), **task.evaluate_sources(run.eval_fn, state.params, step)}
    probed = {f"forgetting/{k}": v for k, v in task.probes(state.params).items()} \
        if config.forgetting.every_eval else {}
    writer.write(step, {**ev, **probed, **(drift_of(state.params) if drift_of else {})})
    value, stopping = ev[config.early_stopping.metric], config.early_stopping
    best = meta["best_metric"]
    if guards.improves(value, best, early_stopping_mode(stopping)):  # a non-finite value never does
        meta.update(best_metric=value, best_step=step, bad_evals=0)
        guards.check_saveable(state)
        ckpt.save_best(state, meta)
    else:
        meta["bad_evals"] += 1
        if stopping.patience and meta["bad_evals"] >= stopping.patience:
            meta["stopped_early"] = True
            best_text = "none finite" if meta["best_step"] is None else \
                f"{meta['best_metric']:.4f} at step {meta['best_step']}"
            bar.write(f"early stopping at step {step}: best {stopping.metric} {best_text}")
    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
    return ev


def _best_params(ckpt: Checkpoints, state, meta: dict, step: int) -> dict:
    """The parameters of the best checkpoint; when every best step is damaged, says so in one line and takes the
    last step's parameters (then also the best step reported)."""
    try:
        return ckpt.restore_params(state.params, "best")[0]
    except DamagedCheckpoint as e:
        tqdm.tqdm.write(f"{e}; the final metrics are of the last step ({step}) instead")
        meta["best_step"] = step
        return state.params
