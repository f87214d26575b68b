"""An sft_jax decoder as an lm-evaluation-harness model, and harness tasks as a forgetting probe.

`HarnessLM` answers the harness's three request types with a `DecoderLM`'s parameters as they are (a
pre-trained model, a run's checkpoint, or a train state's sharded params, on whatever mesh they live):

- loglikelihood(context, continuation): the summed log-probability of the continuation's tokens and whether
  each was the argmax, tokenized as the harness's `hf` backend does (`TemplateLM._encode_pair`: the context's
  trailing spaces move into the continuation; context + continuation encoded whole, then split), and cut on
  the left to `max_length` model positions the same way, so the numbers are those of `hf` on the same weights.
- loglikelihood_rolling(text): the text's summed log-probability over disjoint windows (the harness's own
  `get_rolling_token_windows`, as `hf` does).
- generate_until(context, gen_kwargs): KV-cached decoding (`sft_jax.generate.generate_ids`), greedy unless
  the request samples, ended by EOS, `max_gen_toks` or a stop string; the text is cut before the first stop.

Requests are sorted by length and scored in fixed-shape batches: `batch_size` rows (the last batch filled with
copies of its last row) of a power-of-two length bucket, so the scoring function compiles once per bucket.
Batches are laid out over the batch axes of the parameters' mesh.

The harness's command line reaches this through `python -m sft_jax.lm_eval` (`sft_jax/lm_eval/`), which loads
the model named in `--model_args`. `run_tasks` is the forgetting probe `config.forgetting.lm_eval_tasks` runs.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # an optional dependency: only this adapter needs it
    raise ImportError("lm-evaluation-harness is not installed: pip install 'lm_eval==0.4.13'") from e

from sft_jax import sharding
from sft_jax.generate import generate_ids
from sft_jax.state import ModelDef

# Elements of one [batch, chunk, vocab] float32 logits block (128 MiB): a long sequence's logits over a large
# vocabulary are never materialised whole; they are scored chunk by chunk.
_LOGITS_BUDGET = 2**25
_MIN_BUCKET = 16


@functools.partial(jax.jit, static_argnames=("model_def", "chunk"))
def continuation_scores(model_def: ModelDef, params: dict[str, jax.Array], input_ids: jax.Array,
                        attention_mask: jax.Array, targets: jax.Array, scored: jax.Array, *, chunk: int
                        ) -> tuple[jax.Array, jax.Array]:
    """Per row [B]: the summed float32 log-probability of `targets` at the `scored` positions (position j's
    logits predict targets[j]), and whether every scored target was the argmax."""
    model = model_def.merge(params)
    h, _ = model.hidden(input_ids, attention_mask=attention_mask)
    b, t = input_ids.shape

    def chunk_scores(xs):
        hc, tc, sc = xs  # [B, C, H], [B, C], [B, C]
        logits = model.logits(hc).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        logp = jnp.sum((picked - jax.nn.logsumexp(logits, axis=-1)) * sc, axis=-1)
        greedy = jnp.all((jnp.argmax(logits, axis=-1) == tc) | ~sc, axis=-1)
        return logp, greedy

    def split(x):  # [B, T, ...] -> [T / C, B, C, ...]
        return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)

    # lax.map runs the chunks one after another, so only one logits block is alive at a time.
    logp, greedy = jax.lax.map(chunk_scores, (split(h), split(targets), split(scored)))
    return jnp.sum(logp, axis=0), jnp.all(greedy, axis=0)


def length_bucket(length: int, max_length: int) -> int:
    """The padded length of a row of `length` tokens: the next power of two (at least 16), at most max_length."""
    return min(max(_MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), max_length)


def _chunk(length: int, batch: int, vocab: int) -> int:
    """Largest divisor of `length` whose [batch, chunk, vocab] logits block fits the budget."""
    limit = max(1, _LOGITS_BUDGET // (batch * vocab))
    return max(c for c in range(1, min(length, limit) + 1) if length % c == 0)


def _mesh_of(params: dict[str, jax.Array]) -> jax.sharding.Mesh | None:
    sharding_ = getattr(next(iter(params.values())), "sharding", None)
    return sharding_.mesh if isinstance(sharding_, jax.sharding.NamedSharding) else None


class HarnessLM(TemplateLM):
    """A decoder LM (`ModelDef.split` of a `DecoderLM`, params on any mesh) and its tokenizer, for the harness.

    Args:
      batch_size: rows per forward pass (rounded up to a multiple of the mesh's batch-axis devices).
      max_length: model positions a request may use; default: the model's `max_position_embeddings`.
      max_gen_toks: tokens to generate when a request does not say.
      seed: sampling seed, for generation requests that sample (do_sample with a temperature).
    """

    backend = "causal"

    def __init__(self, model_def: ModelDef, params: dict[str, jax.Array], tokenizer, *, batch_size: int = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.model_def, self.params, self.tokenizer = model_def, params, tokenizer
        self.config = model_def.merge(params).config
        self._max_length = int(max_length or self.config.max_position_embeddings)
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        mesh = _mesh_of(params)
        self._batch_sharding = sharding.batch_sharding(mesh) if mesh is not None else None
        rows = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
        self.batch_size = -(-max(int(batch_size), 1) // rows) * rows

    # --- tokenization, as the harness's `hf` backend does it ---

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: BOS, or EOS for a tokenizer without one."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """The tokenizer's own special tokens (BOS where it adds one), unless the text already starts with it."""
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- log-likelihoods ---

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """((context, continuation) or None, context ids, continuation ids) -> (log-probability, is greedy)."""
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm_eval: a loglikelihood request with an empty continuation")
            # As `hf`: the last max_length + 1 tokens; the model reads all but the last and predicts the rest.
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            logp, greedy = self._score([rows[i] for i in idx])
            for i, lp, g in zip(idx, logp, greedy):
                out[i] = (float(lp), bool(g))
        for request, result in zip(requests, out):
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], result)
        return out

    def _score(self, rows: list[tuple[list[int], list[int], int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded fixed-shape batch of (inputs, targets, scored count) rows -> (log-prob, greedy) per row."""
        n = len(rows)
        rows = rows + [rows[-1]] * (self.batch_size - n)  # fill: one compiled shape per length bucket
        t = length_bucket(max(len(r[0]) for r in rows), self.max_length)
        batch = {k: np.zeros((len(rows), t), dtype) for k, dtype in
                 (("input_ids", np.int32), ("attention_mask", np.int32), ("targets", np.int32), ("scored", bool))}
        for i, (inputs, targets, count) in enumerate(rows):
            batch["input_ids"][i, :len(inputs)] = inputs
            batch["attention_mask"][i, :len(inputs)] = 1
            batch["targets"][i, :len(targets)] = targets
            batch["scored"][i, len(targets) - count:len(targets)] = True
        if self._batch_sharding is not None:
            batch = sharding.put_batch(batch, self._batch_sharding)
        logp, greedy = continuation_scores(self.model_def, self.params, **batch,
                                           chunk=_chunk(t, len(rows), self.config.vocab_size))
        return sharding.to_host(logp)[:n], sharding.to_host(greedy)[:n]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's summed log-probability, over the disjoint windows `hf` scores it in."""
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation ---

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions cut before the first stop string (EOS's text is one), requests with the same
        generation settings batched together."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            new_tokens = int(kwargs.pop("max_gen_toks"))
            if new_tokens >= self.max_length:
                raise ValueError(f"lm_eval: max_gen_toks={new_tokens} leaves no room for a context in the "
                                 f"model's {self.max_length} positions")
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - new_tokens)
                       for i in indices}
            ordered = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(ordered), self.batch_size):
                idx = ordered[start: start + self.batch_size]
                for i, text in zip(idx, self._generate([prompts[i] for i in idx], until, new_tokens, kwargs)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, prompts: list[list[int]], until: list[str], new_tokens: int, kwargs: dict) -> list[str]:
        n = len(prompts)
        prompts = prompts + [prompts[-1]] * (self.batch_size - n)
        stops = [s for s in until if s]

        def stop_fn(row: int, new: list[int]) -> bool:
            return any(s in self.tok_decode(new) for s in stops)

        eos = sorted(set(self.config.eos_ids) | {self.eot_token_id} - {None})
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        tokens, lengths = generate_ids(
            self.model_def, self.params, prompts, max_new_tokens=new_tokens, eos_ids=eos, pad_id=pad,
            temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0) if temperature else 1.0, seed=self.seed,
            stop_fn=stop_fn if stops else None, bucket=_MIN_BUCKET)
        return [postprocess_generated_text(self.tok_decode(tokens[i, :lengths[i]].tolist()), until, None)
                for i in range(n)]


@functools.cache
def _task_manager(include_path: str, tasks: tuple[str, ...]):
    """The harness's task index: of `include_path` alone when it defines every task (indexing the harness's
    thousands of own task files takes seconds), else of both. Built once per process."""
    from lm_eval.tasks import TaskManager

    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    return TaskManager(include_path=include_path or None)


def run_tasks(lm: HarnessLM, tasks: Sequence[str], *, include_path: str = "", limit: int | None = None,
              num_fewshot: int | None = None) -> tuple[dict[str, float], dict[str, bool]]:
    """Runs harness tasks on `lm`: ({"lm_eval/TASK/METRIC": value}, {same name: higher is better}).

    `include_path` is a folder of task YAML files beside the harness's own; `limit` caps the documents per
    task. A metric under a filter other than the default one is named `.../METRIC/FILTER`; standard errors
    (not bootstrapped here) are left out.
    """
    from lm_eval import simple_evaluate

    manager = _task_manager(include_path, tuple(tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ValueError(f"lm_eval tasks {unknown}: not among the harness's tasks{where}")
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    values, higher = {}, {}
    for task, metrics in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, filter_ = key.partition(",")
            # Metrics are "METRIC,FILTER"; the other entries (alias, sample_len) describe the task.
            if not filter_ or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = f"lm_eval/{task}/{metric}" + ("" if filter_ in ("", "none") else f"/{filter_}")
            values[name] = float(value) if math.isfinite(value) else float("nan")
            if metric in better:
                higher[name] = bool(better[metric])
    return values, higher
