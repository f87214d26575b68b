"""Split CIFAR-10: five two-class stages in one sequence (`config.stages`) on the CIFAR ViT.

    python -m sft_jax.main --config=configs/continual_cifar.py:METHOD,SCENARIO --workdir=DIR \
        --config.model=BASE_WORKDIR [--config.seed=S]

METHOD: plain (full fine-tuning), l2sp, ewc (online: the stages' Fishers summed), lora (adapters folded into the
model after each stage), replay (full fine-tuning with a memory of earlier classes' training images; class only);
SCENARIO: task (a head per stage) or class (one head growing by two classes a stage).
BASE_WORKDIR: a finished run of configs/cifar_pretrain.py, a ViT trained from scratch on airplane, automobile,
bird, cat and deer: the starting model has seen the classes of the first stages (stages 1-2 and half of 3).
Data: per class the first 800 of the 1,000 images in ../shared/data/cifar10/test train (10% of them carved as
validation, which selects each stage's best checkpoint) and the last 200 are the stage's evaluation set.
"""

from configs.cifar_pretrain import cifar_split, cifar_vit
from configs.common import get_config as common_config

STAGES = (("airplane", "automobile"), ("bird", "cat"), ("deer", "dog"), ("frog", "horse"), ("ship", "truck"))
METHODS = ("plain", "l2sp", "ewc", "lora", "replay")
# Penalty weights: chosen before the runs, not tuned (a sweep on the validation split is the next step).
L2SP_WEIGHT = 0.01
EWC_WEIGHT = 100.0
REPLAY_PER_CLASS = 50  # training images kept per earlier class (400 of them by the last stage, beside its 1,440)


def get_config(arg: str = "plain,task"):
    method, scenario = (arg or "plain,task").split(",")
    if method not in METHODS:
        raise ValueError(f"configs/continual_cifar.py: method {method!r} is not one of {METHODS}")
    c = cifar_vit(common_config())
    c.data.train, c.data.eval = cifar_split("train"), cifar_split("eval")
    c.data.validation_fraction = 0.1
    c.stages = tuple({"data.classes": classes} for classes in STAGES)
    c.stages_scenario = scenario
    c.strategy = "lora" if method == "lora" else "full"
    c.learning_rate = 1e-3 if method == "lora" else 3e-4
    c.lora.rank = 8
    if method == "l2sp":
        c.regularizer.l2sp = L2SP_WEIGHT
    if method == "replay":
        c.stages_replay = REPLAY_PER_CLASS
    if method == "ewc":  # each stage: the Fisher under the previous stage's head on its classes' training images
        c.regularizer.ewc = EWC_WEIGHT
        c.regularizer.fisher_data = cifar_split("train")
        c.regularizer.fisher_batches = 8
        c.regularizer.fisher_batch_size = 32
    c.batch_size = 64
    c.eval_batch_size = 200
    c.schedule = "cosine"
    c.warmup_steps = 10
    c.weight_decay = 0.0
    c.max_steps = 150  # per stage: 6 epochs of a stage's 1,440 training images
    c.eval_every = 50
    c.log_every = 25
    c.checkpoint_every = 50
    c.early_stopping.metric = "eval/accuracy"
    return c
