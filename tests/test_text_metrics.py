"""Generation metrics against hand-computed values."""

import pytest

from sft_jax.evaluate import text_metrics


def test_final_number_follows_gsm8k_convention():
    assert text_metrics.final_number("48/2 = 24 clips\n#### 1,234") == "1234"
    assert text_metrics.final_number("so the answer is 72.") == "72"
    assert text_metrics.final_number("costs 12.50 dollars") == "12.5"
    assert text_metrics.final_number("no digits here") is None


def test_exact_match():
    preds = ["She sold 72 clips. #### 72", "The answer is 10", "I don't know"]
    refs = ["... #### 72", "#### 11", "#### 5"]
    assert text_metrics.exact_match(preds, refs) == {"exact_match": pytest.approx(100 / 3)}


def test_rouge_and_bleu():
    r = text_metrics.rouge(["the cat sat on the mat"], ["a cat sat on a mat"])
    # unigrams: cat, sat, on, mat shared of 6 each -> F1 4/6; bigrams: "cat sat", "sat on" of 5 -> 2/5.
    assert r["rouge1"] == pytest.approx(100 * 4 / 6) and r["rouge2"] == pytest.approx(40.0)
    assert text_metrics.bleu(["a b c d"], ["a b c d"])["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="unknown generation metric 'meteor'"):
        text_metrics.compute(["meteor"], ["a"], ["a"])
