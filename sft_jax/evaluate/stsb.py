"""STS-B probe of a sentence encoder's general quality: Spearman correlation between the cosine similarity
of mean-pooled embeddings and the human 0-5 scores. Fine-tuning that damages the encoder lowers it."""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable

import numpy as np
from scipy import stats

from sft_jax.data.batching import EncodedDataset, eval_batches, tokenize
from sft_jax.data.sources import DataError


def read_stsb(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """GLUE STS-B TSV (columns sentence1, sentence2, score), or a directory holding dev.tsv."""
    if os.path.isdir(path):
        path = os.path.join(path, "dev.tsv")
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    csv.field_size_limit(sys.maxsize)
    s1, s2, scores = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        for col in ("sentence1", "sentence2", "score"):
            if col not in header:
                raise DataError(f"{path}:1: header has no column {col!r}")
        i1, i2, isc = header.index("sentence1"), header.index("sentence2"), header.index("score")
        for row in rows:
            try:
                scores.append(float(row[isc]))
            except (IndexError, ValueError):
                raise DataError(f"{path}:{rows.line_num}: malformed row") from None
            s1.append(row[i1])
            s2.append(row[i2])
    return s1, s2, np.asarray(scores)


def embed_texts(embed_fn: Callable, tokenizer, texts: list[str], *, batch_size: int = 64,
                max_length: int = 128, buckets=(32, 64, 128)) -> np.ndarray:
    """Runs `embed_fn(input_ids, attention_mask) -> [B, H]` over texts in length-bucketed batches."""
    ids, _ = tokenize(tokenizer, texts, max_length)
    ds = EncodedDataset(ids, np.zeros(len(ids), np.int32), [""] * len(ids))
    out = np.zeros((len(texts), 0), np.float32)
    for idx, batch in eval_batches(ds, batch_size, buckets, tokenizer.pad_token_id):
        emb = np.asarray(embed_fn(batch["input_ids"], batch["attention_mask"]))
        if out.shape[1] == 0:
            out = np.zeros((len(texts), emb.shape[1]), np.float32)
        out[idx] = emb[: len(idx)]
    return out


def stsb_spearman(embed_fn: Callable, tokenizer, path: str, **kwargs) -> float:
    s1, s2, gold = read_stsb(path)
    e = embed_texts(embed_fn, tokenizer, s1 + s2, **kwargs)
    a, b = e[: len(s1)], e[len(s1):]
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return float(stats.spearmanr(cos, gold).statistic)
