"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), batched, EOS and stop strings.

The command line is `python -m sft_jax.generate` (`sft_jax/generate/__main__.py`). In Python (e.g. Colab)::

    model, cfg = load_decoder("smollm2-135m-instruct")
    generate(model, load_lm_tokenizer("smollm2-135m-instruct"), ["The capital of France is"], max_new_tokens=8)

Prompts are left-padded to a length bucket and prefilled in one call; decoding then runs one token per step
inside a jitted `lax.while_loop`, compiled once per (batch, prompt bucket, max_new_tokens) shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.state import ModelDef


def _sample(logits, key, temperature, top_p, sampling):
    """Next token ids [B] from float32 logits [B, V]; `sampling` = (greedy, top_k, nucleus) is static."""
    greedy, top_k, nucleus = sampling
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if not (top_k or nucleus):
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    # Candidates sorted by logit: the top k, or the whole vocabulary when only the nucleus is used.
    vals, idx = jax.lax.top_k(logits, min(top_k, logits.shape[-1]) if top_k else logits.shape[-1])
    if nucleus:
        probs = jax.nn.softmax(vals, axis=-1)
        # The smallest prefix whose mass reaches top_p: keep a token while the mass before it is < top_p
        # (the most likely token always stays, so a tiny top_p is greedy).
        vals = jnp.where(jnp.cumsum(probs, axis=-1) - probs < top_p, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _record(carry, token, knobs):
    """Writes the step's token (pad for finished rows) and marks rows that produced an EOS as done."""
    token = jnp.where(carry["done"], knobs["pad"], token)
    return dict(carry, token=token, done=carry["done"] | jnp.isin(token, knobs["eos"]),
                out=carry["out"].at[:, carry["step"]].set(token), step=carry["step"] + 1)


@functools.partial(jax.jit, static_argnames=("model_def", "max_new_tokens", "sampling"))
def _prefill(model_def, params, ids, segments, key, knobs, *, max_new_tokens, sampling):
    """Runs the left-padded prompts [B, P] through the model into a fresh cache and samples token 0."""
    model = model_def.merge(params)
    b, p = ids.shape
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)  # pads get 0; real tokens count from 0
    h, cache = model.hidden(ids, positions=positions, segment_ids=segments,
                            cache=model.init_cache(b, p + max_new_tokens))
    token = _sample(model.logits(h[:, -1]), jax.random.fold_in(key, 0), knobs["temperature"], knobs["top_p"],
                    sampling)
    carry = dict(cache=cache, token=token, pos=segments.sum(axis=1), done=jnp.zeros((b,), bool),
                 out=jnp.full((b, max_new_tokens), knobs["pad"], jnp.int32), step=jnp.int32(0))
    return _record(carry, token, knobs)


@functools.partial(jax.jit, static_argnames=("model_def", "sampling"), donate_argnames=("carry",))
def _decode(model_def, params, carry, limit, key, knobs, *, sampling):
    """Feeds the last token and samples the next, one step at a time, until `limit` steps or all rows are done."""
    model = model_def.merge(params)
    ones = jnp.ones_like(carry["token"])[:, None]

    def body(c):
        h, cache = model.hidden(c["token"][:, None], positions=c["pos"][:, None], segment_ids=ones,
                                cache=c["cache"])
        # Keys fold in the step, so samples do not depend on how the steps are split into calls.
        token = _sample(model.logits(h[:, 0]), jax.random.fold_in(key, c["step"]), knobs["temperature"],
                        knobs["top_p"], sampling)
        return _record(dict(c, cache=cache, pos=c["pos"] + 1), token, knobs)

    return jax.lax.while_loop(lambda c: (c["step"] < limit) & ~jnp.all(c["done"]), body, carry)


def generate_ids(model_def: ModelDef, params: dict[str, jax.Array], prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, eos_ids: Sequence[int] = (), pad_id: int = 0, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_fn: Callable[[int, list[int]], bool] | None = None, chunk: int = 16,
                 bucket: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Generates up to `max_new_tokens` tokens after each prompt (lists of token ids, of any lengths).

    Args:
      eos_ids: a row ends at the first of these; later steps of that row emit `pad_id`.
      temperature: 0 is greedy; otherwise logits / temperature, then top-k (0 = off), then top-p (1 = off).
      stop_fn: `stop_fn(row, new_ids) -> bool`, checked on the host every `chunk` steps; a row ends at the
        shortest prefix of its new ids for which it is true (e.g. its decoded text contains a stop string).
      bucket: prompts are left-padded to a multiple of this, to limit recompiles.

    Returns:
      (tokens int32 [B, max_new_tokens], lengths int [B]): row i's completion is `tokens[i, :lengths[i]]`;
      a row that ended on EOS has it at `tokens[i, lengths[i]]`, then `pad_id`.
    """
    problems = [message for ok, message in (
        (max_new_tokens >= 1, f"max_new_tokens={max_new_tokens} must be >= 1"),
        (temperature >= 0, f"temperature={temperature} must be >= 0"), (top_k >= 0, f"top_k={top_k} must be >= 0"),
        (0 < top_p <= 1, f"top_p={top_p} must be in (0, 1]"), (chunk >= 1, f"chunk={chunk} must be >= 1")) if not ok]
    if problems:
        raise ValueError("; ".join(problems))
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    b, n = len(prompts), max_new_tokens
    p = -(-max(len(x) for x in prompts) // bucket) * bucket
    ids, segments = np.full((b, p), pad_id, np.int32), np.zeros((b, p), np.int32)
    for i, x in enumerate(prompts):  # left padding: every row's last prompt token sits at slot p - 1
        ids[i, p - len(x):], segments[i, p - len(x):] = x, 1
    sampling = (temperature == 0, int(top_k), top_p < 1)
    knobs = dict(temperature=jnp.float32(temperature or 1.0), top_p=jnp.float32(top_p), pad=jnp.int32(pad_id),
                 eos=jnp.asarray(list(eos_ids) or [-1], jnp.int32))
    key = jax.random.key(seed)
    carry = _prefill(model_def, params, ids, segments, key, knobs, max_new_tokens=n, sampling=sampling)
    eos = np.asarray(list(eos_ids), np.int32)
    lengths, checked = np.full(b, n), np.zeros(b, int)
    while True:
        step = int(carry["step"])
        if stop_fn is not None:
            out, stopped = np.asarray(carry["out"][:, :step]), np.zeros(b, bool)
            for i in np.flatnonzero(lengths == n):
                new = out[i, :_first(out[i], eos)].tolist()
                # The stop was absent from the prefix checked last time: search only the new lengths.
                for length in range(checked[i] + 1, len(new) + 1):
                    if stop_fn(int(i), new[:length]):
                        lengths[i], stopped[i] = length, True
                        break
                checked[i] = len(new)
            if stopped.any():
                carry = dict(carry, done=carry["done"] | jnp.asarray(stopped))
        if step >= n or bool(jnp.all(carry["done"])):
            break
        limit = n if stop_fn is None else min(step + chunk, n)
        carry = _decode(model_def, params, carry, jnp.int32(limit), key, knobs, sampling=sampling)
    tokens = np.asarray(carry["out"])
    return tokens, np.array([min(lengths[i], _first(tokens[i], eos)) for i in range(b)])


def _first(row: np.ndarray, values: np.ndarray) -> int:
    """Index of the first element of `row` in `values`, or len(row)."""
    hits = np.flatnonzero(np.isin(row, values))
    return int(hits[0]) if hits.size else len(row)


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt; with `chat`, as one user message in the tokenizer's chat template
    (which writes any BOS itself, so the tokenizer does not add another)."""
    if not chat:
        return [tokenizer(text).input_ids for text in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: no chat template; "
                         "this is not a chat model, generate without chat")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=False) for t in prompts]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


# ModelDef hashes by identity (it is a static jit argument): reuse one per graph so repeated calls hit the cache.
_MODEL_DEFS: dict[Any, ModelDef] = {}


def generate(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
             chat: bool = False, batch_size: int = 0, **kwargs: Any) -> list[str]:
    """Completions (without the prompt) of `prompts` by a `DecoderLM`; see `generate_ids` for the options.

    `prompts` are texts, or token ids already encoded (a training run's prompt format, say). A row ends at an
    EOS (of the model config or the tokenizer), which its text excludes, or before the first of the `stop`
    strings its text contains. `chat` wraps each text prompt as a user message. With `batch_size`, prompts go
    in batches of that size, the last one filled up with copies of its last prompt, so that one compiled
    decode loop serves every batch.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts and not isinstance(prompts[0], str):
        encoded = [list(p) for p in prompts]
    else:
        encoded = encode_prompts(tokenizer, prompts, chat)
    model_def, params = ModelDef.split(model)
    model_def = _MODEL_DEFS.setdefault(model_def.graphdef, model_def)
    longest, limit = max(map(len, encoded), default=0), model.config.max_position_embeddings
    if longest + max_new_tokens > limit:  # RoPE positions past the trained range give garbage, not an error
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"{limit} positions")
    eos = set(model.config.eos_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    size = batch_size or len(encoded)
    out = []
    for start in range(0, len(encoded), max(size, 1)):
        chunk = encoded[start: start + size]
        out += _complete(model_def, params, tokenizer, chunk + [chunk[-1]] * (size - len(chunk)),
                         max_new_tokens=max_new_tokens, eos=sorted(eos), pad=pad, stop=stop,
                         sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                         **kwargs)[: len(chunk)]
    return out


def _complete(model_def, params, tokenizer, encoded: list[list[int]], *, max_new_tokens: int, eos: list[int],
              pad: int, stop: Sequence[str], sampling: dict, **kwargs: Any) -> list[str]:
    """The completion texts of one batch of encoded prompts, each cut before its first stop string."""
    prompt_texts = [tokenizer.decode(x, skip_special_tokens=True) for x in encoded]

    def text(i: int, new: Sequence[int]) -> str:
        # Decode prompt + completion and drop the prompt's text, so a completion's leading space survives.
        full = tokenizer.decode(list(encoded[i]) + list(new), skip_special_tokens=True)
        prompt = prompt_texts[i]
        return full[len(prompt):] if full.startswith(prompt) else tokenizer.decode(new, skip_special_tokens=True)

    stop_fn = (lambda i, new: any(s in text(i, new) for s in stop)) if stop else None
    tokens, lengths = generate_ids(model_def, params, encoded, max_new_tokens=max_new_tokens, eos_ids=eos,
                                   pad_id=pad, stop_fn=stop_fn, **sampling, **kwargs)
    out = []
    for i in range(len(encoded)):
        completion = text(i, tokens[i, :lengths[i]].tolist())
        cut = min((completion.find(s) for s in stop if s in completion), default=len(completion))
        out.append(completion[:cut])
    return out
