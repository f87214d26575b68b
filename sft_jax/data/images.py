"""Labelled images: JSONL manifests, class folders and TFDS; decoding, normalisation, augmentation, batches.

Specs:
  - `FILE.jsonl`: records `{"image": "dog.jpg", "label": "dog"}`, image paths relative to the manifest's folder;
  - `DIR`: class folders `DIR/<label>/<file>`; `DIR[a:b]` keeps files a..b-1 (sorted by name) of each class,
    so one folder gives disjoint train and eval sets (`DIR[:800]`, `DIR[800:]`);
  - `tfds:NAME[:SPLIT]` with an `image` and a ClassLabel `label` feature (e.g. `tfds:cifar10:test`);
  - `FILE.parquet`, `FILE.arrow`, a `datasets` folder `DIR[:SPLIT]` (see `columnar`): the image field holds
    encoded image bytes, a path (relative to the data file's folder) or, as the `datasets` Image feature
    stores it, `{"bytes": ..., "path": ...}` (the bytes when present, else the path).

Images are decoded once with Pillow (greyscale, RGBA, palette... converted to RGB), resized to the model's
square input and kept in memory as uint8. Batches are normalised (mean/std per channel) and, for training,
augmented (random crop after zero padding in normalised space, i.e. mean-coloured, and horizontal flips)
with a generator seeded by (seed, step): `batch(step)` stays a pure function of the step, as for text.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import re
from collections.abc import Sequence

import numpy as np

from sft_jax import storage
from sft_jax.data import columnar
from sft_jax.data.batching import LabelVocab, TrainBatches
from sft_jax.data.sources import DataError, iter_jsonl, label_to_str, open_tfds, tfds_label

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_SLICE = re.compile(r"^(?P<dir>.+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One labelled image before decoding: a file path, encoded bytes or an already decoded array (TFDS)."""

    source: str | bytes | np.ndarray
    label: str
    where: str  # "manifest.jsonl:3", the image path (folders) or "tfds:NAME:SPLIT:i"


@dataclasses.dataclass
class ImageDataset:
    """Decoded images [N, S, S, 3] uint8 and their class ids."""

    images: np.ndarray
    labels: np.ndarray
    where: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:  # TrainBatches groups by length; all images have the same
        return np.zeros(len(self), np.int32)


def _read_manifest(path: str, image_field: str, label_field: str) -> list[ImageRecord]:
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for where, record in iter_jsonl(path):
        for field in (image_field, label_field):
            if field not in record or record[field] is None:
                raise DataError(f"{where}: missing field {field!r} (record has {sorted(record)})")
        image = record[image_field]
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: field {image_field!r} must be a non-empty path string, got {image!r}")
        out.append(ImageRecord(os.path.join(root, image), label_to_str(record[label_field], where, label_field),
                               where))
    return out


def _image_source(value, root: str, where: str, field: str) -> str | bytes:
    """A columnar image cell: encoded bytes, a path, or the `datasets` Image struct {"bytes", "path"}."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, str) and value.strip():
        return os.path.join(root, value)
    raise DataError(f"{where}: field {field!r} must be image bytes, a non-empty path string or "
                    f"{{'bytes': ..., 'path': ...}}, got {value!r:.80}")


def _read_columnar(spec: str, image_field: str, label_field: str) -> list[ImageRecord]:
    out = []
    for where, record in columnar.iter_records(spec, label_field):
        for field in (image_field, label_field):
            if field not in record or record[field] is None:
                raise DataError(f"{where}: missing field {field!r} (record has {sorted(record)})")
        root = os.path.dirname(os.path.abspath(where.rsplit(":", 1)[0]))
        out.append(ImageRecord(_image_source(record[image_field], root, where, image_field),
                               label_to_str(record[label_field], where, label_field), where))
    return out


def _read_folder(spec: str) -> list[ImageRecord]:
    directory, start, stop = spec, None, None
    match = _SLICE.match(spec)
    if match and not os.path.isdir(spec):
        directory = match["dir"]
        start = int(match["start"]) if match["start"] else None
        stop = int(match["stop"]) if match["stop"] else None
    classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
    if not classes:
        raise DataError(f"{spec}: no class folders (expected DIR/<label>/<image file>)")
    out = []
    for label in classes:
        files = sorted(f for f in os.listdir(os.path.join(directory, label))
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        for name in files[start:stop]:
            path = os.path.join(directory, label, name)
            out.append(ImageRecord(path, label, path))
    return out


def _read_tfds_images(spec: str, image_field: str, label_field: str, data_dir: str | None) -> list[ImageRecord]:
    source = open_tfds(spec, data_dir)
    features = source.dataset_info.features
    if image_field not in features or label_field not in features:
        raise DataError(f"{spec}: features {sorted(features)} lack {image_field!r} or {label_field!r}")
    names = getattr(features[label_field], "names", None)
    out = []
    for i in range(len(source)):
        record, where = dict(source[i]), f"{spec}:{i}"
        label = label_to_str(tfds_label(record, label_field, names, where), where, label_field)
        out.append(ImageRecord(np.asarray(record[image_field]), label, where))
    return out


@storage.reads_data  # gs:// and s3:// specs: read from a local mirror
def read_image_records(spec: str, *, image_field: str = "image", label_field: str = "label",
                       data_dir: str | None = None, classes: Sequence[str] = ()) -> list[ImageRecord]:
    """Labelled image records from a manifest, a class folder (optionally `[a:b]`-sliced), a Parquet / Arrow
    file or `datasets` folder, or TFDS;
    with `classes`, only records of those labels are kept (a class that has none is an error)."""
    if spec.startswith("tfds:"):
        records = _read_tfds_images(spec, image_field, label_field, data_dir)
    elif columnar.is_columnar(spec):
        records = _read_columnar(spec, image_field, label_field)
    elif os.path.isfile(spec):
        if os.path.splitext(spec)[1].lower() != ".jsonl":
            raise DataError(f"{spec}: an image manifest must be a .jsonl, .parquet or .arrow file (or give a "
                            "folder DIR/<label>/... or a `datasets` folder)")
        records = _read_manifest(spec, image_field, label_field)
    elif os.path.isdir(spec) or (_SLICE.match(spec) and os.path.isdir(_SLICE.match(spec)["dir"])):
        records = _read_folder(spec)
    else:
        raise DataError(f"{spec}: file not found")
    if classes:
        found = {r.label for r in records}
        absent = [c for c in classes if c not in found]
        if absent:
            raise DataError(f"{spec}: no images of the configured classes {absent} (labels found: {sorted(found)})")
        kept = [r for r in records if r.label in set(classes)]
        logging.info("%s: kept %d of %d images (classes %s)", spec, len(kept), len(records), list(classes))
        records = kept
    if not records:
        raise DataError(f"{spec}: no images")
    return records


def decode_image(source: str | bytes | np.ndarray, size: int, where: str) -> np.ndarray:
    """An RGB uint8 [size, size, 3] array from a file, encoded bytes or an array; errors name `where` and the
    file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        array = source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source
        image = Image.fromarray(array.astype(np.uint8))
    elif isinstance(source, bytes):
        try:
            with Image.open(io.BytesIO(source)) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{where}: cannot decode the image bytes ({type(e).__name__}: {e})") from None
    else:
        prefix = where if where == source else f"{where}: {source}"
        if os.path.isdir(source):
            raise DataError(f"{prefix}: is a directory, not an image file")
        if not os.path.isfile(source):
            raise DataError(f"{prefix}: image file not found")
        if os.path.getsize(source) == 0:
            raise DataError(f"{prefix}: the image file is empty (0 bytes)")
        try:
            with Image.open(source) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{prefix}: cannot decode image ({type(e).__name__}: {e})") from None
    try:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits, not clip
            values = np.asarray(image, np.float64)
            image = Image.fromarray((values * 255.0 / max(float(values.max()), 1.0)).astype(np.uint8))
        image = image.convert("RGB")  # L, LA, P, RGBA (alpha dropped), CMYK, YCbCr ...
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        out = np.asarray(image, np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot convert image of mode {image.mode!r} to RGB ({e})") from None
    if out.shape != (size, size, 3):
        raise DataError(f"{where}: image of unusable shape {out.shape}")
    return out


def load_images(records: Sequence[ImageRecord], vocab: LabelVocab, size: int) -> ImageDataset:
    """Checks every label against `vocab` (before any decoding), then decodes each image once."""
    labels = np.array([vocab.encode(r.label, r.where) for r in records], np.int32)
    images = np.stack([decode_image(r.source, size, r.where) for r in records])
    return ImageDataset(images=images, labels=labels, where=[r.where for r in records])


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., 3] -> float32 ((x / 255) - mean) / std, as Hugging Face image processors do."""
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def make_image_batch(ds: ImageDataset, indices: np.ndarray, batch_size: int, buckets=None, pad_id=None, *,
                     mean: Sequence[float], std: Sequence[float]) -> dict[str, np.ndarray]:
    """Normalised images at `indices`; rows past len(indices) are zeros with weight 0.
    (`buckets` and `pad_id` are unused: the signature of `batching.TrainBatches`' collate.)"""
    del buckets, pad_id
    size = ds.images.shape[1]
    pixels = np.zeros((batch_size, size, size, 3), np.float32)
    labels = np.zeros((batch_size,), np.int32)
    weights = np.zeros((batch_size,), np.float32)
    pixels[: len(indices)] = normalise(ds.images[indices], mean, std)
    labels[: len(indices)] = ds.labels[indices]
    weights[: len(indices)] = 1.0
    return {"pixel_values": pixels, "labels": labels, "weights": weights}


def augment(pixels: np.ndarray, rng: np.random.Generator, crop_padding: int, flip: bool) -> np.ndarray:
    """Random crop of each image after zero-padding `crop_padding` pixels per side, and random horizontal
    flips (probability 1/2). `pixels` is a normalised [B, S, S, C] batch."""
    b, size = pixels.shape[0], pixels.shape[1]
    out = pixels
    if crop_padding:
        p = crop_padding
        padded = np.pad(pixels, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = rng.integers(0, 2 * p + 1, size=(b, 2))
        out = np.stack([padded[i, y: y + size, x: x + size] for i, (y, x) in enumerate(offsets)])
    if flip:
        mirrored = rng.random(b) < 0.5
        out = np.where(mirrored[:, None, None, None], out[:, :, ::-1], out)
    return out


class ImageTrainBatches(TrainBatches):
    """Shuffled, augmented image batches addressed by step: `batch(step)` depends on (seed, step) only."""

    def __init__(self, ds: ImageDataset, batch_size: int, seed: int, *, mean: Sequence[float],
                 std: Sequence[float], crop_padding: int = 0, flip: bool = False):
        super().__init__(ds, batch_size, (1,), seed, 0, collate=functools.partial(make_image_batch, mean=mean,
                                                                                  std=std))
        self.crop_padding, self.flip = crop_padding, flip

    def batch(self, step: int) -> dict[str, np.ndarray]:
        batch = super().batch(step)
        if self.crop_padding or self.flip:
            # A stream of its own (three-word seed): the shuffle uses [seed, epoch].
            rng = np.random.default_rng([self.seed, step, 1])
            batch["pixel_values"] = augment(batch["pixel_values"], rng, self.crop_padding, self.flip)
        return batch


def image_collate(mean: Sequence[float], std: Sequence[float]):
    """The collate function for `batching.eval_batches` over an `ImageDataset`."""
    return functools.partial(make_image_batch, mean=mean, std=std)
