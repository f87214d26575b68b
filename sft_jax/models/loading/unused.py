"""Checkpoint tensors a loader leaves unread are an error, so a config.json that disagrees with its weights (4
layers said, 6 stored) stops the load instead of loading part of the checkpoint.

Two things are exempt: tensors a family's published checkpoints carry that are not weights of the module loaded
here (`NON_WEIGHTS`), and those the user names (`config.ignore_weights`: regexes, e.g. `"^classifier\\."` for
the head of another task). Missing tensors are the other half of the check, in each loader.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# Optional wrapper prefixes of the encoder in `BertFor*` / `RobertaFor*` / exported checkpoints.
_ENCODER = r"((bert|roberta|model)\.)?"

# Per family: tensors that are not weights of the module loaded here (re.fullmatch on the stored name).
# Everything else a loader does not read is an error. A decoder's duplicated tied `lm_head.weight` is exempt in
# code (`lm._tied_copy`), only when it equals the embedding it duplicates.
NON_WEIGHTS: dict[str, tuple[str, ...]] = {
    # BERT / RoBERTa / XLM-RoBERTa (`bert`).
    "bert": (
        _ENCODER + r"embeddings\.(position_ids|token_type_ids)",  # index buffers that older exports saved
        _ENCODER + r"pooler\.dense\.(weight|bias)",  # the NSP pooler; our heads pool the hidden states themselves
        # The pre-training heads every published base encoder ships (BERT's MLM and NSP, RoBERTa's MLM): a
        # fine-tuning run replaces them with its own head by design. A task head (`classifier.*`) is not here.
        r"cls\.(predictions|seq_relationship)\..+",
        r"lm_head\..+",
    ),
    "modernbert": (
        r"(model\.)?embeddings\.position_ids",
        r"head\.(dense|norm)\.(weight|bias)",  # ModernBertForMaskedLM's prediction head and tied decoder
        r"decoder\.(weight|bias)",
    ),
    # Every decoder family: RoPE tables that older transformers saved as buffers (we compute RoPE ourselves).
    "decoder": (r"(.+\.)?rotary_emb\w*\.(original_)?inv_freq",),
    # Gemma 3 multimodal (`gemma3`, Gemma3ForConditionalGeneration): the image tower and its projection into the
    # language model; only the language model is loaded.
    "gemma3": (r"(model\.)?(vision_tower|multi_modal_projector)\..+",),
    "vit": (
        r"((vit|model)\.)?pooler\.dense\.(weight|bias)",  # ViTModel's pooler; our heads pool on their own
        r"classifier\.(weight|bias)",  # ViTForImageClassification's head: `load_vit_head` reads it
    ),
}


def non_weights(*families: str) -> tuple[str, ...]:
    """The `NON_WEIGHTS` patterns of `families` ("bert", "decoder", "gemma3", ...), together."""
    return tuple(p for family in families for p in NON_WEIGHTS.get(family, ()))


def unused_tensors(names: Iterable[str], used: Iterable[str], *, allow: Sequence[str] = (),
                   ignore: Sequence[str] = ()) -> list[str]:
    """The tensors of `names` neither `used`, nor matching a pattern of `allow` (re.fullmatch: a family's
    non-weights), nor one of `ignore` (re.search: what the user said to drop), in checkpoint order."""
    used = set(used)
    allowed = [re.compile(p) for p in allow]
    ignored = [re.compile(p) for p in ignore]
    return [n for n in names if n not in used and not any(p.fullmatch(n) for p in allowed)
            and not any(p.search(n) for p in ignored)]


def describe_unused(unused: Sequence[str], where: str, shown: int = 3, *,
                    what: str = "not used by the model config.json describes",
                    why: str = "the config and the weights disagree, or drop them with config.ignore_weights") -> str:
    """One clause naming how many tensors of `where` (a weights file) were not used, the first few, and `why`."""
    more = f", ... ({len(unused) - shown} more)" if len(unused) > shown else ""
    count = f"{len(unused)} tensor{'s' if len(unused) != 1 else ''}"
    return f"{count} of {where} {what} ({', '.join(unused[:shown])}{more}): {why}"


def check_ignore_patterns(patterns: Sequence[str], key: str = "config.ignore_weights") -> None:
    """Each pattern compiles; else one ValueError line naming it."""
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{key}: {p!r} is not a regex string")
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{key}: {p!r} is not a valid regex ({e})") from None
