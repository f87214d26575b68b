"""Hand-written documents of the tiny harness tasks (tests/test_lm_eval.py): no download, no dataset files."""

import datasets

QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "a banana"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five", "the sea"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": ["green", "blue", "loud"], "answer": 1},
    {"question": "Ice is made of frozen", "choices": ["fire", "sand", "water"], "answer": 2},
]

PROMPTS = [
    {"prompt": "Once upon a time", "answer": "there was"},
    {"prompt": "The quick brown fox jumps over the lazy", "answer": "dog"},
    {"prompt": "One two three four", "answer": "five"},
]

TEXTS = [
    {"text": "First Citizen: Before we proceed any further, hear me speak."},
    {"text": "All: Speak, speak. You are all resolved rather to die than to famish? Resolved. resolved."},
]


def _split(records, **kwargs):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def questions(**kwargs):
    return _split(QUESTIONS)


def prompts(**kwargs):
    return _split(PROMPTS)


def texts(**kwargs):
    return _split(TEXTS)
