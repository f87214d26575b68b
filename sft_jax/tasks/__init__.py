"""Task families behind one contract (`Task`), and the registry `config.task` names.

    text_classification   {"text", "label"} records, an encoder with a classification head (tasks/text.py)
    image_classification  {"image", "label"} records, a ViT with a classification head (tasks/image.py)
    language_modeling     plain text, next-token prediction of a decoder LM (tasks/language_model.py)
    sft                   prompt -> output records, chat and instructions, loss on the output tokens only

A new task subclasses `Task`, decorates itself with `@register("name")` and is importable before the run
starts; the loop needs no change (see tests/test_new_task.py).
"""

from sft_jax.tasks.base import Task
from sft_jax.tasks.registry import check_config, get, names, register

# Importing the built-in task modules registers them (in this order: config errors list them so).
from sft_jax.tasks import text  # noqa: E402,F401  isort: skip
from sft_jax.tasks import language_model  # noqa: E402,F401  isort: skip
from sft_jax.tasks import image  # noqa: E402,F401  isort: skip

__all__ = ["Task", "check_config", "get", "names", "register"]
