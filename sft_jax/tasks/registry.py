"""The tasks `config.task` can name: each task class registers itself under its names."""

from __future__ import annotations

from collections.abc import Callable

from sft_jax.tasks.base import Task

_TASKS: dict[str, type[Task]] = {}


def register(*names: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: `@register("my_task")` makes `config.task="my_task"` build that class."""

    def add(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"{cls!r} is not a subclass of sft_jax.tasks.Task")
        for name in names:
            if _TASKS.get(name, cls) is not cls:
                raise ValueError(f"task {name!r} is already registered to {_TASKS[name].__name__}")
            _TASKS[name] = cls
        return cls

    return add


def get(name: str) -> type[Task]:
    """The task class registered as `name`; ValueError naming the known ones otherwise."""
    if name not in _TASKS:
        raise ValueError(f"config.task: unknown task {name!r}; expected one of {names()}")
    return _TASKS[name]


def names() -> tuple[str, ...]:
    return tuple(_TASKS)


def check_config(config) -> type[Task]:
    """The task class of `config.task`, once the config passes its checks (before anything is loaded): an
    option that only another task reads is refused, then the task's own `check_config` runs."""
    cls = get(config.task)
    for other in set(_TASKS.values()) - {cls}:
        for key, what in other.exclusive_options.items():
            value = config
            for part in key.split("."):
                value = value[part]
            if value and value != "none":  # set: not empty, zero, False or "none"
                owners = " or ".join(f"task={n!r}" for n, c in _TASKS.items() if c is other)
                raise ValueError(f"config.{key}: {what} needs {owners}")
    cls.check_config(config)
    return cls
