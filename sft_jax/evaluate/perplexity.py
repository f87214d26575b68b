"""Perplexity of a decoder LM on a text (WikiText-2 raw test by default): the decoder forgetting probe.

The method is Hugging Face's "perplexity of fixed-length models": the tokenized text is cut into windows
of `max_length` model positions that start every `stride` text tokens; each window scores only the tokens
that the previous window did not score, so every token is scored once, and a smaller stride gives each
scored token more context at the cost of more windows (stride = max_length - 1: no overlap, cheapest).

Definitions (shared with the transformers reference in tests/test_perplexity.py through `windows`):
- The text is tokenized once, without special tokens. A window's first model position only gives context.
- When the tokenizer adds BOS by default (Gemma), every window's input is [BOS] + `max_length - 1` text
  tokens, and its first text token can be scored (predicted from BOS). Otherwise (SmolLM2) a window holds
  `max_length` text tokens and its first one is context only; the text's first token is never scored.
  Either way a window scores at most `max_length - 1` new tokens, so `stride < max_length`.
- Token-level perplexity: exp(total NLL / scored tokens), the NLL in nats.
- Word-level perplexity: exp(total NLL / words), where words are the whitespace-separated words
  (`str.split()`) of the text the tokens cover. With the full text every token is scored once (all but the
  first without BOS), so the total NLL is that of the whole text and the word-level figure does not depend
  on the tokenizer: it compares models with different vocabularies.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.data.sft import adds_bos
from sft_jax.data.sources import DataError
from sft_jax.state import ModelDef

WIKITEXT2_FILE = "wiki.test.raw"
# Elements of one [batch, chunk, vocab] float32 logits block: 2**25 = 128 MiB. Logits of a whole window are
# never materialised (Gemma's [1, 1024, 262144] would be 1 GiB); the sequence is scored chunk by chunk.
_LOGITS_BUDGET = 2**25


@dataclasses.dataclass(frozen=True)
class Window:
    """One model input: text tokens [begin, end); tokens [score_begin, end) are scored.

    Each scored token is predicted from the tokens before it in the window (and BOS, when prepended).
    """

    begin: int
    end: int
    score_begin: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_begin


def windows(num_tokens: int, max_length: int, stride: int, *, score_first: bool = False) -> list[Window]:
    """The sliding windows of Hugging Face's fixed-length perplexity over `num_tokens` text tokens.

    Windows hold text tokens [k * stride, k * stride + max_length) (the last one cut at the text's end, and
    the first to reach it is the last). A window scores the tokens after the previous window's end, except
    its own first token unless `score_first` (BOS is prepended to predict it from): without BOS nothing in
    the window precedes it. So every token of [0 if score_first else 1, num_tokens) is scored exactly once
    when stride <= max_length - (0 if score_first else 1); with stride == max_length and no BOS (disjoint
    windows) each window's first token goes unscored, as in Hugging Face's loop.

    Args:
      num_tokens: length of the tokenized text.
      max_length: text tokens per window (the model input length, minus one when BOS is prepended).
      stride: distance between window starts, 1 <= stride <= max_length.
      score_first: score each window's first token (only meaningful with BOS to predict it from).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    context = 0 if score_first else 1  # positions at a window's start that only give context
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        score_begin = max(prev_end, begin + context)
        if end > score_begin:  # a window with nothing to score (a 1-token text without BOS) is dropped
            out.append(Window(begin, end, score_begin))
        prev_end = end
        if end == num_tokens:
            break
    return out


def read_wikitext(path: str | os.PathLike) -> str:
    """The text of a WikiText raw file, or of a folder holding `wiki.test.raw`.

    Read in text mode, so the file's Windows line endings ("\\r\\n") become "\\n": a stray "\\r" token per
    line is an artifact of how the file was stored, not part of the corpus.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WIKITEXT2_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected the WikiText-2 raw test split, {WIKITEXT2_FILE})")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """(token ids without special tokens, number of whitespace-separated words they cover).

    With `max_tokens`, the text is cut after its first `max_tokens` tokens and the words are those of the
    covered prefix (a word split by the cut counts as one).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast, verbose=False)
    ids = np.asarray(enc["input_ids"], np.int32)
    if max_tokens is None or max_tokens >= len(ids):
        return ids, len(text.split())
    ids = ids[:max_tokens]
    covered = text[: enc["offset_mapping"][max_tokens - 1][1]] if tokenizer.is_fast else tokenizer.decode(ids)
    return ids, len(covered.split())


def window_arrays(ids: np.ndarray, wins: list[Window], length: int, bos_id: int | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded model inputs [W, length]: input_ids, attention_mask, and `scored` (the token at this
    position is scored, predicted from the logits one position earlier). BOS is prepended if `bos_id`."""
    n = len(wins)
    input_ids = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.int32)
    scored = np.zeros((n, length), bool)
    shift = 0 if bos_id is None else 1
    for i, w in enumerate(wins):
        size = w.end - w.begin + shift
        if size > length:
            raise ValueError(f"window {w} with BOS={bos_id is not None} does not fit in {length} positions")
        if w.score_begin - w.begin + shift < 1:
            raise ValueError(f"window {w}: its first token has nothing to be predicted from (no BOS)")
        if bos_id is not None:
            input_ids[i, 0] = bos_id
        input_ids[i, shift:size] = ids[w.begin:w.end]
        mask[i, :size] = 1
        scored[i, w.score_begin - w.begin + shift:size] = True
    return input_ids, mask, scored


def _chunk_size(length: int, batch: int, vocab: int) -> int:
    """Largest divisor of `length` whose [batch, chunk, vocab] logits block fits the budget."""
    limit = max(1, _LOGITS_BUDGET // (batch * vocab))
    return max(c for c in range(1, min(length, limit) + 1) if length % c == 0)


@functools.partial(jax.jit, static_argnames=("model_def", "chunk"))
def window_nll(model_def: ModelDef, params: dict[str, jax.Array], input_ids: jax.Array, attention_mask: jax.Array,
               scored: jax.Array, *, chunk: int) -> jax.Array:
    """Summed NLL (nats, float32) of the scored tokens of each window: [B]."""
    model = model_def.merge(params)
    h, _ = model.hidden(input_ids, attention_mask=attention_mask)
    b, t = input_ids.shape
    # Position j predicts token j + 1; the last position predicts nothing (weight 0).
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros((b, 1), input_ids.dtype)], axis=1)
    weights = jnp.concatenate([scored[:, 1:], jnp.zeros((b, 1), bool)], axis=1).astype(jnp.float32)

    def chunk_nll(xs):
        hc, tc, wc = xs  # [B, C, H], [B, C], [B, C]
        logits = model.logits(hc)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * wc, axis=-1)

    def split(x):  # [B, T, ...] -> [T / C, B, C, ...]
        return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)

    # lax.map runs the chunks one after another, so only one logits block is alive at a time.
    return jnp.sum(jax.lax.map(chunk_nll, (split(h), split(targets), split(weights))), axis=0)


def perplexity(model_def: ModelDef, params: dict[str, Any], tokenizer, text: str, *, max_length: int = 1024,
               stride: int = 512, max_tokens: int | None = None, batch_size: int = 1, bos: bool | None = None,
               progress: bool = True, desc: str = "perplexity") -> dict[str, Any]:
    """Token- and word-level perplexity of `text` under a decoder LM (definitions: the module docstring).

    Every batch has the fixed shape [batch_size, max_length] (the last windows are padded and masked), so
    the scoring function compiles once per model and shape.

    Args:
      model_def, params: from `ModelDef.split(model)`; params may be a train state's (sharded) params.
      tokenizer: a transformers tokenizer of the model.
      text: the text to score.
      max_length: model input length of a window (BOS included).
      stride: distance between window starts in text tokens, < max_length (max_length - 1: no overlap).
      max_tokens: score only the first `max_tokens` tokens of the text (a fast probe during training).
      batch_size: windows per forward pass.
      bos: prepend BOS to every window; None: when the tokenizer adds BOS by default.
      progress: show a tqdm progress bar.

    Returns:
      a dict: token_perplexity, word_perplexity, nll (total, nats), nll_per_token, scored_tokens,
      num_tokens (text tokens used), num_words, num_windows, windows ([begin, end, score_begin] each),
      window_nll (summed NLL of each window's scored tokens), max_length, stride, bos, wall_s.
    """
    start = time.perf_counter()
    bos = adds_bos(tokenizer) if bos is None else bos
    bos_id = tokenizer.bos_token_id if bos else None
    if bos and bos_id is None:
        raise ValueError("bos=True but the tokenizer has no bos_token_id")
    if not 1 <= stride < max_length:
        # A window's first position only gives context (BOS, or a token the previous window scored), so
        # a window scores at most max_length - 1 new tokens; a longer stride would skip tokens.
        raise ValueError(f"stride must be in [1, max_length - 1 = {max_length - 1}], got {stride}")
    ids, num_words = tokenize_text(tokenizer, text, max_tokens)
    wins = windows(len(ids), max_length - int(bos), stride, score_first=bos)
    if not wins:
        raise ValueError(f"the text has {len(ids)} token(s): nothing to score")
    input_ids, mask, scored = window_arrays(ids, wins, max_length, bos_id)
    pad = -len(wins) % batch_size  # all-padding rows (mask 0) keep the batch shape fixed; they score nothing
    if pad:
        input_ids, mask, scored = (np.concatenate([a, np.zeros((pad, max_length), a.dtype)])
                                   for a in (input_ids, mask, scored))
    chunk = _chunk_size(max_length, batch_size, model_def.merge(params).config.vocab_size)

    from tqdm.auto import tqdm

    per_window = []
    with tqdm(total=len(wins), desc=desc, unit="win", disable=not progress) as bar:
        for i in range(0, len(input_ids), batch_size):
            sl = slice(i, i + batch_size)
            nll = window_nll(model_def, params, input_ids[sl], mask[sl], scored[sl], chunk=chunk)
            per_window.extend(np.asarray(nll, np.float64).tolist())
            bar.update(min(batch_size, len(wins) - i))
    per_window = per_window[: len(wins)]
    total = math.fsum(per_window)  # summed on the host in float64: 300k tokens would lose digits in float32
    count = int(scored.sum())
    return {
        "token_perplexity": math.exp(total / count),
        "word_perplexity": math.exp(total / num_words),
        "nll": total,
        "nll_per_token": total / count,
        "scored_tokens": count,
        "num_tokens": len(ids),
        "num_words": num_words,
        "num_windows": len(wins),
        "windows": [[w.begin, w.end, w.score_begin] for w in wins],
        "window_nll": per_window,
        "max_length": max_length,
        "stride": stride,
        "bos": bool(bos),
        "wall_s": time.perf_counter() - start,
    }


def wikitext2_perplexity(model_def: ModelDef, params: dict[str, Any], tokenizer, path: str | os.PathLike, *,
                         max_length: int = 1024, stride: int = 512, max_tokens: int | None = None,
                         batch_size: int = 1, bos: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """`perplexity` of the WikiText-2 raw test text at `path` (the file, or the folder holding
    wiki.test.raw). For a fast probe during fine-tuning, pass `max_tokens` (e.g. 16384)."""
    return perplexity(model_def, params, tokenizer, read_wikitext(path), max_length=max_length, stride=stride,
                      max_tokens=max_tokens, batch_size=batch_size, bos=bos, progress=progress,
                      desc="wikitext2 perplexity")
