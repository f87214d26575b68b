"""`hf:ORG/NAME[:CONFIG][:SPLIT]`: a dataset from the local Hugging Face `datasets` cache.

`datasets.load_dataset("ORG/NAME", CONFIG)` leaves its data as Arrow files in
    CACHE/ORG___NAME/CONFIG/VERSION/HASH/NAME-SPLIT.arrow    (or NAME-SPLIT-00000-of-00003.arrow, ...)
beside a dataset_info.json with the features and splits; CACHE is $HF_DATASETS_CACHE, else $HF_HOME/datasets,
else ~/.cache/huggingface/datasets. `columnar` reads those files like any Arrow file, without the `datasets`
library. A dataset (or config) not in the cache is downloaded into it once with `datasets.load_dataset` where the
hub may be used (`datasets` installed; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE not set), then read the same way.

Choosing: `hf:ORG/NAME:X` is config X when the cache holds a config of that name, else split X. A config or
split left out is the only one cached, else the choices are named in the error (a guess could train on the
test split). Of several cached versions or revisions of a config, the most recently written is read.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

from sft_jax.data.errors import DataError

PREFIX = "hf:"
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.arrow$")


@dataclasses.dataclass(frozen=True)
class CachedSplit:
    files: tuple[str, ...]
    features: dict


def cache_root() -> str:
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(hf_home, "datasets")


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))) if os.path.isdir(path) else []


def _info(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "dataset_info.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _newest_data_dir(config_dir: str) -> str | None:
    """The most recently written VERSION/HASH folder holding a dataset_info.json (a finished download)."""
    found = [os.path.join(config_dir, v, h) for v in _subdirs(config_dir)
             for h in _subdirs(os.path.join(config_dir, v)) if not h.endswith(".incomplete")]  # still downloading
    found = [d for d in found if os.path.isfile(os.path.join(d, "dataset_info.json"))]
    return max(found, key=lambda d: os.path.getmtime(os.path.join(d, "dataset_info.json")), default=None)


def _split_files(data_dir: str, split: str) -> list[str]:
    single = glob.glob(os.path.join(glob.escape(data_dir), f"*-{split}.arrow"))
    shards = [p for p in glob.glob(os.path.join(glob.escape(data_dir), f"*-{split}-*-of-*.arrow"))
              if _SHARD.search(p)]
    return sorted(single) + sorted(shards, key=lambda p: int(_SHARD.search(p)[1]))


def _splits(data_dir: str) -> list[str]:
    splits = _info(data_dir).get("splits")
    if isinstance(splits, dict) and splits:
        return list(splits)
    names = {_SHARD.sub(".arrow", os.path.basename(p))[:-len(".arrow")].rsplit("-", 1)[-1]
             for p in glob.glob(os.path.join(glob.escape(data_dir), "*.arrow"))}
    return sorted(names)


def hub_offline() -> bool:
    """Whether the environment forbids the hub, as huggingface_hub and datasets read it."""
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _download(spec: str, name: str, config: str | None, dataset_dir: str) -> None:
    """Fills the cache with `name` (its `config`) through `datasets.load_dataset`, or says in one line why not."""
    if hub_offline():
        raise DataError(f"{spec}: not in the local Hugging Face datasets cache (looked for {dataset_dir}) and "
                        "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid downloading it")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: not in the local Hugging Face datasets cache (looked for {dataset_dir}); pip "
                        "install datasets to download it, or set HF_DATASETS_CACHE to where it is") from None
    try:
        datasets.load_dataset(name, config, cache_dir=cache_root())
    except Exception as e:  # an unknown dataset or config, no network, a gated dataset: all one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{spec}: not in the local Hugging Face datasets cache (looked for {dataset_dir}) and "
                        f"the download failed ({type(e).__name__}: {reason})") from None
    if not _subdirs(dataset_dir):
        raise DataError(f"{spec}: datasets.load_dataset({name!r}) left nothing in {dataset_dir} (a dataset "
                        "streamed or stored elsewhere); point HF_DATASETS_CACHE at its Arrow files")


def resolve(spec: str) -> CachedSplit:
    """The Arrow files and features of `hf:ORG/NAME[:CONFIG][:SPLIT]` in the local cache."""
    parts = spec[len(PREFIX):].split(":")
    name, rest = parts[0], parts[1:]
    if not name or len(rest) > 2 or not all(rest) or name.count("/") > 1:
        raise DataError(f"{spec}: expected hf:ORG/NAME[:CONFIG][:SPLIT]")
    root = cache_root()
    dataset_dir = os.path.join(root, name.replace("/", "___"))
    configs = _subdirs(dataset_dir)
    missing = not configs or (len(rest) == 2 and rest[0] not in configs)
    if missing and not (configs and hub_offline()):  # offline, a missing config is named with those cached
        # The named config, or the dataset's default one (`hf:ORG/NAME:X` takes X as a split then).
        _download(spec, name, rest[0] if len(rest) == 2 else None, dataset_dir)
        configs = _subdirs(dataset_dir)
    config = split = None
    if len(rest) == 2:
        config, split = rest
    elif len(rest) == 1:
        config, split = (rest[0], None) if rest[0] in configs else (None, rest[0])
    if config is None:
        if len(configs) != 1:
            raise DataError(f"{spec}: cached configs {configs}; choose one with hf:{name}:CONFIG[:SPLIT]")
        config = configs[0]
    if config not in configs:
        raise DataError(f"{spec}: config {config!r} not in the local cache {dataset_dir} (cached: {configs})")
    data_dir = _newest_data_dir(os.path.join(dataset_dir, config))
    if data_dir is None:
        raise DataError(f"{spec}: {os.path.join(dataset_dir, config)} holds no finished download "
                        "(no VERSION/HASH/dataset_info.json)")
    splits = _splits(data_dir)
    if split is None:
        if len(splits) != 1:
            raise DataError(f"{spec}: cached splits {splits}; choose one with hf:{name}:{config}:SPLIT")
        split = splits[0]
    files = _split_files(data_dir, split)
    if split not in splits or not files:
        raise DataError(f"{spec}: no split {split!r} in the local cache {data_dir} (splits: {splits})")
    features = _info(data_dir).get("features")
    return CachedSplit(tuple(files), features if isinstance(features, dict) else {})
