"""Models out of a run's workdir, by one command (`python -m sft_jax.export`, `sft_jax/export/__main__.py`):

    export(workdir, "hf", out)     # classifiers (text, image) and language models as Hugging Face folders
    export(workdir, "peft", out)   # a LoRA language-model run's adapters as PEFT files
    export(workdir, "gguf", out)   # a language model as a GGUF file (gguf_type: f32, f16, bf16, q8_0)

Every export writes a model card (README.md). What each format does with each kind of run is in
`classifiers.py` and `decoders.py`. Several processes (`jax.distributed`, e.g. the hosts of the run) can export
a language model to hf together: each writes its own shards of every tensor into the one file.
"""

from __future__ import annotations

import os
import pathlib

import jax

from sft_jax.rundir import RunDir

FORMATS = ("hf", "gguf", "peft")
_CLASSIFIERS = ("text_classification", "image_classification")
_LANGUAGE_MODELS = ("sft", "language_modeling")


def export(workdir: str, fmt: str, out: str | os.PathLike, *, gguf_type: str = "f16",
           checkpoint: str = "best") -> pathlib.Path:
    """Writes the `checkpoint` ("best", falling back to "latest"; or "latest") of the run in `workdir` to `out`
    as `fmt`; returns the folder (the file, for gguf). A format the run cannot take is one ValueError line."""
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt}: expected one of {', '.join(FORMATS)}")
    rundir = RunDir(workdir)
    if not rundir.is_run():
        raise FileNotFoundError(f"{workdir}: not the workdir of a run (needs config.json and checkpoints/)")
    task = rundir.read_config().get("task", "text_classification")
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise ValueError(f"--out={out} is the workdir itself; give another folder")
    if jax.process_count() > 1 and (task not in _LANGUAGE_MODELS or fmt != "hf"):
        raise ValueError(f"--format={fmt} of a {task} run is written by one process; of several, only a language "
                         "model's --format=hf is (each process writing its shards)")
    if task in _CLASSIFIERS:
        if fmt != "hf":
            raise ValueError(f"{workdir}: a {task} run exports with --format=hf (gguf and peft are for language "
                             "models)")
        from sft_jax.export import classifiers

        write = classifiers.export_text_classifier if task == "text_classification" else \
            classifiers.export_image_classifier
        return write(workdir, out, checkpoint)
    if task not in _LANGUAGE_MODELS:
        raise ValueError(f"{workdir}: a run of task {task!r}, which sft_jax.export does not know")
    from sft_jax.export import decoders

    if fmt == "gguf":
        return decoders.export_gguf(workdir, out, gguf_type, checkpoint)
    return (decoders.export_hf if fmt == "hf" else decoders.export_peft)(workdir, out, checkpoint)
