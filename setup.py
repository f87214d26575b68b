"""sft_jax: supervised fine-tuning of pre-trained models in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Pinned to versions that install together on Python 3.11 (CPU); GPU users swap in jax[cuda12].
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "numpy>=1.26,<3",
    "scipy==1.17.1",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "tensorflow-datasets==4.9.10",
    "gguf==0.19.0",
    "rouge-score==0.1.2",
    "sacrebleu==2.6.0",
    "matplotlib>=3.8,<4",
    "pillow>=10,<14",  # image decoding (image_classification)
    "pyarrow==26.0.1",  # Parquet / Arrow files and `datasets` folders as data (sft_jax/data/columnar.py)
    "grain==0.2.18",  # the (seed, step) order of streamed training data (sft_jax/data/streaming.py)
]

EXTRAS = {
    # torch is only the reference implementation in parity tests and the benchmark baseline.
    # accelerate: transformers needs it to load GGUF files (the decoder parity reference).
    # peft: loads the LoRA adapters sft_jax writes onto the transformers base model (tests/test_peft_library.py).
    # nbclient/nbformat/ipykernel: the notebook test runs the tutorial in a real Jupyter kernel.
    # pytest-xdist: `make test` runs two workers; most test time is single-threaded XLA compilation.
    # datasets: tests write real save_to_disk folders (sft_jax itself reads them with pyarrow alone).
    # wandb / mlflow-skinny: the optional trackers (config.logging), tested offline (tests/test_trackers.py).
    # lm_eval: the lm-evaluation-harness model `sft_jax` and the forgetting probe forgetting.lm_eval_tasks
    # (optional at run time); pinned: its command line and model API change between releases.
    # s3fs / moto[server]: workdirs and data on s3:// (sft_jax/storage.py), tested against a local moto S3 server.
    "test": ["pytest==8.4.2", "torch==2.13.0", "accelerate==1.15.0", "ruff==0.14.0", "nbclient==0.11.0",
             "nbformat==5.11.1", "ipykernel==7.4.0", "pytest-xdist==3.8.0", "peft==0.21.2",
             "datasets==5.2.0", "lm_eval==0.4.13", "wandb==0.31.0", "mlflow-skinny==3.18.0",
             "s3fs==2026.9.0", "moto[server]==5.2.5"],
}

setup(
    name="sft_jax",
    version="0.1.0",
    description="Supervised fine-tuning of pre-trained models in JAX / Flax NNX",
    packages=find_packages(include=["sft_jax", "sft_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    # sft-jax train | predict | generate | export | plan | lm_eval: the `python -m sft_jax.<module>` commands.
    entry_points={"console_scripts": ["sft-jax=sft_jax.console:main"]},
)
