"""The `sft-jax` command (setup.py console_scripts): `sft-jax COMMAND [flags]` runs the same module as
`python -m sft_jax.<module> [flags]`, with the same flags, output and exit status.

The module runs as __main__ (runpy), exactly as under `python -m`: each one defines its absl flags on import,
so none of them is imported here.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys

# command -> (module run as `python -m`, one line for `sft-jax --help`)
COMMANDS = {
    "train": ("sft_jax.main", "fine-tune a model per a config file; rerun on the same workdir to resume"),
    "predict": ("sft_jax.predict", "classify texts or images with a run's best checkpoint"),
    "generate": ("sft_jax.generate", "complete prompts with a pre-trained model or a run's checkpoint"),
    "export": ("sft_jax.export", "write a run's model as Hugging Face, GGUF or PEFT files"),
    "plan": ("sft_jax.plan", "per-device memory and FLOPs of a config's train step, before launching it"),
    "lm_eval": ("sft_jax.lm_eval", "lm-evaluation-harness tasks on a model or a run (--model sft_jax ...)"),
    "interpolate": ("sft_jax.interpolation", "score a run's weights interpolated from the base or another run"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}  {text}  (python -m {module})" for name, (module, text) in COMMANDS.items()]
    return "\n".join(["usage: sft-jax COMMAND [flags]", "", "Commands:", *lines, "",
                      "sft-jax COMMAND --help lists the command's flags (train: every config key, documented)."])


def _runnable(module: str) -> bool:
    """Whether `python -m module` would find something to run (a module, or a package with __main__)."""
    try:
        spec = importlib.util.find_spec(module)
        return spec is not None and (spec.submodule_search_locations is None
                                     or importlib.util.find_spec(module + ".__main__") is not None)
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("--help", "-h", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: sft-jax {command}: unknown command; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = COMMANDS[command][0]
    if not _runnable(module):
        print(f"error: sft-jax {command}: {module} is not in this installation of sft_jax", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"sft-jax {command}", *rest]  # the program name absl's usage and error lines show
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
