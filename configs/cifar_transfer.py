"""Transfer of the CIFAR base (configs/cifar_pretrain.py) to the five other CIFAR-10 classes.

ARG: STRATEGY[,PER_CLASS]: head | partial | full (fine-tune the base), or scratch (the same ViT from random
weights, the baseline); PER_CLASS: training images per class (default 50), the first ones of each class.

    python -m sft_jax.main --config=configs/cifar_transfer.py:partial,50 --workdir=workdirs/cifar_partial_50 \\
        --config.model=workdirs/cifar_base

Target accuracy is measured on the 200 held-out images of each new class; forgetting on the 200 held-out
images of each source class, with the base's own head on the fine-tuned backbone (before / after / drop).
"""

import os

from configs.cifar_pretrain import TARGET_CLASSES, cifar_split, cifar_vit
from configs.common import get_config as common_config

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workdirs", "cifar_base")
LEARNING_RATES = {"head": 3e-3, "partial": 1e-3, "full": 5e-4, "scratch": 1e-3}
# (batch size, steps) per label budget: small budgets need (and can only use) few steps.
SCHEDULES = {10: (25, 60), 50: (64, 100), 200: (128, 200)}


def schedule(per_class: int) -> tuple[int, int]:
    if per_class in SCHEDULES:
        return SCHEDULES[per_class]
    return min(128, 5 * per_class), max(60, 3 * per_class // 2)


def get_config(arg=None):
    strategy, _, per_class = (arg or "partial").partition(",")
    per_class = int(per_class or 50)
    c = cifar_vit(common_config())
    if strategy == "scratch":
        c.model, c.strategy = "vit-scratch", "full"
    else:
        c.model, c.strategy = BASE, strategy
        c.forgetting.images = cifar_split("eval")  # the held-out images; the base head's classes are kept
    c.frozen_layers = 2 if strategy == "partial" else 0  # embeddings and blocks 0-1 of 4 frozen
    c.data.train, c.data.eval = cifar_split("train", per_class), cifar_split("eval")
    c.data.classes = TARGET_CLASSES
    c.batch_size, c.max_steps = schedule(per_class)
    c.eval_batch_size = 250
    c.learning_rate = LEARNING_RATES.get(strategy, 1e-3)
    c.schedule = "cosine"
    c.warmup_steps = c.max_steps // 10
    c.weight_decay = 0.05
    c.log_every = 10
    c.eval_every = c.checkpoint_every = c.max_steps  # one evaluation, at the end: no selection on the eval set
    return c

