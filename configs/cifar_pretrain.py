"""A small ViT trained from scratch on five CIFAR-10 classes: the base model of the transfer experiment.

    python -m sft_jax.main --config=configs/cifar_pretrain.py --workdir=workdirs/cifar_base

Data: ../shared/data/cifar10/test/<class>/NNNN.jpg (CIFAR-10's test split, 1,000 images per class). Classes
airplane, automobile, bird, cat, deer; per class the first 800 files train and the last 200 are held out.
Without the shared folder, TFDS's cifar10 (train / test splits) is used if it is prepared locally.
The finished workdir is a model: `--config.model=workdirs/cifar_base` in configs/cifar_transfer.py.
"""

import os

from configs.common import get_config as common_config
from configs.common import shared_data

SOURCE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
TARGET_CLASSES = ("dog", "frog", "horse", "ship", "truck")
TRAIN_PER_CLASS = 800  # of the 1,000 test images per class; the other 200 are the held-out eval set
# Per-channel statistics of CIFAR-10's training images.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cifar_split(role: str, per_class: int = TRAIN_PER_CLASS) -> str:
    """The data spec of the train images (first `per_class` files of each class) or the held-out ones."""
    folder = shared_data("cifar10", "test")
    if not os.path.isdir(folder):
        return "tfds:cifar10:train" if role == "train" else "tfds:cifar10:test"
    return f"{folder}[:{per_class}]" if role == "train" else f"{folder}[{TRAIN_PER_CLASS}:]"


def cifar_vit(c):
    """The image settings every CIFAR run shares: an 8x8-patch ViT on 32x32 images (16 patches: 4x cheaper
    than 4x4 patches, which matters on two shared CPU cores), CIFAR normalisation, random crops (4 pixels of
    padding) and flips."""
    c.task = "image_classification"
    c.vit.update(image_size=32, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=256)
    c.pooling = "mean"
    c.head_dropout = 0.0
    c.image.mean, c.image.std = CIFAR_MEAN, CIFAR_STD
    c.image.crop_padding, c.image.flip = 4, True
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}  # one CPU device: no data-parallel split of small batches
    return c


def get_config(arg=None):
    del arg
    c = cifar_vit(common_config())
    c.model = "vit-scratch"
    c.strategy = "full"
    c.data.train, c.data.eval = cifar_split("train"), cifar_split("eval")
    c.data.classes = SOURCE_CLASSES
    c.batch_size = 128
    c.eval_batch_size = 250
    c.learning_rate = 1e-3
    c.schedule = "cosine"
    c.warmup_steps = 50
    c.weight_decay = 0.05
    c.max_steps = 700  # 22 epochs of the 4,000 training images
    c.log_every = 25
    c.eval_every = 350
    c.checkpoint_every = 100
    return c
