"""The `tokenizer.*` metadata of a GGUF file, from a Hugging Face fast tokenizer.

Two vocabulary kinds, as llama.cpp and transformers' GGUF tokenizer builder name them:
- "gpt2": byte-level BPE (SmolLM2, Qwen): tokens in the byte alphabet, merges as "a b" strings.
- "llama": SentencePiece-style BPE with byte fallback (Gemma): tokens with "▁" for spaces and a score per token.
  The fast tokenizer holds merges, not SentencePiece scores; a token's score is minus the rank of the merge
  that makes it, so llama.cpp (which merges the best-scored pair first) merges in BPE's order.
"""

from __future__ import annotations

import json
from typing import Any

# gguf.TokenType values (kept as ints: the writer stores them as int32).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _has_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_byte_level(v) for v in node)
    return False


def _pre_tokenizer_name(spec: dict[str, Any], family: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` (how text is split before BPE). llama.cpp recognises a vocabulary by
    its hash; here the split is read from the tokenizer: Qwen's regex, or GPT-2's default otherwise (with
    single digits split first: SmolLM's)."""
    text = json.dumps(spec.get("pre_tokenizer"))
    if family in ("qwen2", "qwen3") or r"\\p{N}| ?[^\\s\\p{L}\\p{N}]+" in text:
        return "qwen2"
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    return "gpt2"


def tokenizer_metadata(tokenizer, vocab_size: int, family: str) -> dict[str, Any]:
    """{GGUF key suffix after "tokenizer.": value} for `tokenizer`, its vocabulary padded to the model's
    `vocab_size` with unused tokens (llama.cpp needs one token per embedding row)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported (BPE only)")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab = dict(model["vocab"])
    for token_id, token in added.items():
        vocab.setdefault(token["content"], token_id)
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has token id {max(by_id)} but the model only "
                         f"{vocab_size} embedding rows")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    byte_level = _has_byte_level(spec.get("pre_tokenizer")) or _has_byte_level(spec.get("decoder"))
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append(CONTROL if added.get(i, {}).get("special") else USER_DEFINED if i in added else
                         UNKNOWN if token == unk else
                         BYTE if not byte_level and len(token) == 6 and token.startswith("<0x") else NORMAL)
    meta: dict[str, Any] = {"ggml.tokens": tokens, "ggml.token_type": types}
    if byte_level:
        meta.update({"ggml.model": "gpt2", "ggml.pre": _pre_tokenizer_name(spec, family), "ggml.merges": merges})
    else:
        rank = {m.replace(" ", ""): r for r, m in enumerate(merges)}
        meta.update({"ggml.model": "llama", "ggml.pre": "default",
                     "ggml.scores": [-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)],
                     "ggml.add_space_prefix": False})
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("unknown_token_id", "unk_token_id"), ("padding_token_id", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            meta[f"ggml.{key}"] = int(value)
    # What the tokenizer does, not its add_bos_token attribute: a post-processor may add BOS regardless of it.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a")["input_ids"]
    meta["ggml.add_bos_token"] = len(marked) > len(plain) and marked[0] == tokenizer.bos_token_id
    meta["ggml.add_eos_token"] = len(marked) > len(plain) and marked[-1] == tokenizer.eos_token_id
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["chat_template"] = template
    return meta
