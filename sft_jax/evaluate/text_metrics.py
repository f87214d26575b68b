"""Generation metrics: ROUGE-1/2/L (rouge-score), sacreBLEU, and exact match of a final number (GSM8K)."""

from __future__ import annotations

import re
from collections.abc import Sequence

METRICS = ("rouge", "bleu", "exact_match")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) with the Porter stemmer, as reported for XSum."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: 100.0 * v / n for key, v in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus sacreBLEU (13a tokenizer, one reference per prediction)."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score}


def final_number(text: str) -> str | None:
    """The answer of a worked solution: the number after GSM8K's '####' if present, else the last number."""
    if "####" in text:
        text = text.split("####", 1)[1]
        found = _NUMBER.search(text)
    else:
        matches = list(_NUMBER.finditer(text))
        found = matches[-1] if matches else None
    if found is None:
        return None
    value = found.group().replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions whose final number equals the reference's final number."""
    hits = sum(final_number(p) is not None and final_number(p) == final_number(r)
               for p, r in zip(predictions, references, strict=True))
    return {"exact_match": 100.0 * hits / max(len(predictions), 1)}


def compute(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The named metrics (any of METRICS) of predictions against references."""
    out: dict[str, float] = {}
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown generation metric {name!r}; expected one of {METRICS}")
        out.update({"rouge": rouge, "bleu": bleu, "exact_match": exact_match}[name](predictions, references))
    return out
