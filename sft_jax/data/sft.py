"""Supervised fine-tuning data: input-output pairs, instructions and chats -> tokens + a target mask.

Record formats (field names mapped by the config, e.g. GSM8K question/answer, XSum document/summary):
    pair          {"input": ..., "output": ...}
    instruction   {"instruction": ..., "input": ... (optional), "output": ...}
    self-instruct {"instruction": ..., "instances": [{"input": ..., "output": ...}, ...]}  (one example each)
    chat          {"messages": [{"role": "user" | "assistant" | "system", "content": ...}, ...]}
in a .jsonl file, a .parquet or .arrow file or a `datasets` folder `DIR[:SPLIT]` (rows read as jsonl records,
see `columnar`), and `parallel:SRC_FILE,TGT_FILE` for line-aligned translation text (plain or .gz).

The loss mask is 1 exactly on the tokens the model must produce: the output and the EOS after it, or each
assistant turn of a chat (its content and the end-of-turn token that closes it, e.g. `<|eot_id|>`,
`<|im_end|>`, `<end_of_turn>`, `</s>`, `<|end|>`; never a system or user turn or the assistant header). Chat
masks are found by rendering the chat template with stand-ins for the contents and on prefixes of the
conversation, so they are right for templates with no generation markers, including ones that render a
prefix differently (Mistral v0.3 moves the system prompt to the last user turn; Phi-3 ends a conversation
with EOS).
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
from collections.abc import Sequence

import numpy as np

from sft_jax import storage
from sft_jax.data import columnar
from sft_jax.data.lm import LmDataset, _slice
from sft_jax.data.sources import DataError, iter_jsonl

PAIR, INSTRUCTION, CHAT = "pair", "instruction", "chat"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Fields:
    """Names of the record fields; anything a data set calls differently is mapped here."""

    input: str = "input"
    output: str = "output"
    instruction: str = "instruction"
    messages: str = "messages"


DEFAULT_FIELDS = Fields()


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a record becomes a prompt. Templates use {input} and {instruction}; `chat=True` sends the rendered
    prompt as a user turn (and the output as the assistant turn) through the tokenizer's chat template."""

    template: str = "{input}\n"
    instruction_template: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    instruction_only_template: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    chat: bool = False
    system: str = ""


@dataclasses.dataclass(frozen=True)
class Record:
    kind: str  # PAIR | INSTRUCTION | CHAT
    where: str
    input: str = ""
    output: str = ""
    instruction: str = ""
    messages: tuple = ()


def _text(record: dict, field: str, where: str, *, required: bool = True, allow_empty: bool = False) -> str:
    value = record.get(field)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {field!r} (record has {sorted(record)})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _check_turns(messages: list[dict], where: str) -> None:
    """An optional system message first, then user and assistant turns alternating from a user turn (what
    chat templates expect: most refuse anything else, the rest render it as a conversation the model never
    saw); every assistant turn says something (an empty one would teach the model to answer nothing)."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(turns)
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"{where}: message {i + offset} is {m['role']!r} where {expected!r} was due; after an "
                            "optional system message, a chat alternates user / assistant, starting with user")
        if expected == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: message {i + offset} (assistant) is empty")


def parse_record(record: dict, where: str, fields: Fields = DEFAULT_FIELDS) -> list[Record]:
    """One raw JSON record -> the examples it holds (several for a self-instruct task)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fields.messages in record:
        messages = record[fields.messages]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field {fields.messages!r} must be a non-empty list of messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: the chat has no assistant message, so nothing to learn")
        _check_turns(out, where)
        return [Record(CHAT, where, messages=tuple(out))]
    if "instances" in record and fields.instruction in record:
        instruction = _text(record, fields.instruction, where)
        instances = record["instances"]
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{where}: field 'instances' must be a non-empty list")
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise DataError(f"{where}: instance {i} must be an object with {fields.output!r} (and "
                                f"{fields.input!r}), got {type(inst).__name__}")
        return [Record(INSTRUCTION, f"{where}#{i}", instruction=instruction,
                       input=_text(inst, fields.input, f"{where}#{i}", required=False, allow_empty=True),
                       output=_text(inst, fields.output, f"{where}#{i}"))
                for i, inst in enumerate(instances)]
    if fields.instruction in record:
        return [Record(INSTRUCTION, where, instruction=_text(record, fields.instruction, where),
                       input=_text(record, fields.input, where, required=False, allow_empty=True),
                       output=_text(record, fields.output, where))]
    return [Record(PAIR, where, input=_text(record, fields.input, where), output=_text(record, fields.output, where))]


def _read_lines(path: str) -> list[str]:
    """The lines of a plain or .gz text file; bad UTF-8 is named by line."""
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a damaged .gz
        raise DataError(f"{path}: cannot read ({e})") from None
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return raw.decode("utf-8").splitlines()


@storage.reads_data  # gs:// and s3:// specs: read from a local mirror
def read_sft(spec: str, fields: Fields = DEFAULT_FIELDS, max_examples: int = 0) -> list[Record]:
    """Reads a .jsonl / .parquet / .arrow file, a `datasets` folder or `parallel:SRC,TGT` into records.
    `max_examples` > 0 keeps the first N.

    A percent slice (`xsum.jsonl[:90%]`, by example) takes part of the file, as for TFDS splits."""
    spec, lo, hi = _slice(spec)
    records = _read_sft(spec, fields, 0 if (lo, hi) != (0.0, 1.0) else max_examples)
    if (lo, hi) != (0.0, 1.0):
        a, b = round(lo * len(records)), round(hi * len(records))
        if a == b:
            raise DataError(f"{spec}[{lo:.0%}:{hi:.0%}]: the slice is empty")
        records = records[a:b]
    return records[:max_examples] if max_examples else records


def _read_sft(spec: str, fields: Fields, max_examples: int) -> list[Record]:
    records: list[Record] = []
    if spec.startswith("parallel:"):
        src, _, tgt = spec.removeprefix("parallel:").partition(",")
        if not src or not tgt:
            raise DataError(f"{spec}: expected parallel:SOURCE_FILE,TARGET_FILE")
        for path in (src, tgt):
            if not os.path.isfile(path):
                raise DataError(f"{spec}: no such file {path}")
        src_lines, tgt_lines = _read_lines(src), _read_lines(tgt)
        if len(src_lines) != len(tgt_lines):
            raise DataError(f"{spec}: {len(src_lines)} source lines but {len(tgt_lines)} target lines")
        for i, (s, t) in enumerate(zip(src_lines, tgt_lines), start=1):
            if not s.strip() or not t.strip():
                raise DataError(f"{src if not s.strip() else tgt}:{i}: empty line in parallel text")
            records.append(Record(PAIR, f"{src}:{i}", input=s, output=t))
            if max_examples and len(records) >= max_examples:
                break
        return records
    if columnar.is_columnar(spec):
        rows = columnar.iter_records(spec)
    elif os.path.isdir(spec):
        raise DataError(f"{spec}: is a directory; SFT data must be a .jsonl, .parquet or .arrow file, a `datasets` "
                        "folder or parallel:SRC,TGT")
    elif not os.path.isfile(spec):
        raise DataError(f"{spec}: no such file")
    elif not spec.endswith(".jsonl"):
        raise DataError(f"{spec}: SFT data must be .jsonl, .parquet, .arrow, a `datasets` folder or "
                        "parallel:SRC,TGT")
    else:
        rows = iter_jsonl(spec)
    for where, raw in rows:
        records.extend(parse_record(raw, where, fields))
        if max_examples and len(records) >= max_examples:
            return records[:max_examples]
    if not records:
        raise DataError(f"{spec}: no records")
    return records


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends BOS by default (Gemma does; SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _prompt_parts(record: Record, fmt: PromptFormat) -> tuple[str, str, str]:
    """(text before the input, the input, text after it): the input is what truncation shortens."""
    if record.kind == PAIR:
        template = fmt.template
    elif record.input.strip():
        template = fmt.instruction_template
    else:
        template = fmt.instruction_only_template
    template = template.replace("{instruction}", record.instruction)
    if "{input}" not in template:
        return template, "", ""
    pre, post = template.split("{input}", 1)
    return pre, record.input, post


def as_chat(record: Record, fmt: PromptFormat, with_output: bool = True) -> list[dict]:
    """The record as chat messages (a chat record as is; others: the rendered prompt as the user turn)."""
    if record.kind == CHAT:
        return list(record.messages)
    messages = [{"role": "system", "content": fmt.system}] if fmt.system else []
    pre, inp, post = _prompt_parts(record, fmt)
    messages.append({"role": "user", "content": (pre + inp + post).strip()})
    if with_output:
        messages.append({"role": "assistant", "content": record.output})
    return messages


# Stand-ins for a message's content, used to find where the template puts it; text no chat holds.
_SENTINEL, _PROBE = "\u27e6sft_jax:content\u27e7", "\u27e6sft_jax:next\u27e7"


def _render(tokenizer, messages: Sequence[dict], where: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # the template's own checks (roles must alternate, no system role, ...)
        raise DataError(f"{where}: the chat template refused the conversation: {str(e).splitlines()[0]}") from e


def _with_content(messages: Sequence[dict], i: int, content: str) -> list[dict]:
    return [dict(m, content=content) if j == i else m for j, m in enumerate(messages)]


def _after_sentinel(text: str, where: str) -> str:
    """The text a rendering puts after the sentinel content (which it must hold exactly once)."""
    if text.count(_SENTINEL) != 1:
        raise DataError(f"{where}: the chat template does not copy message contents into its rendering; "
                        "cannot locate the assistant turns")
    return text[text.index(_SENTINEL) + len(_SENTINEL):]


def _assistant_spans(messages: Sequence[dict], tokenizer, full: str, where: str) -> list[tuple[int, int, int]]:
    """(start, content end, closing end) in `full` (the rendered chat) of each assistant turn: the model must
    produce it from the end of the generation prompt (or, where the template renders the conversation before
    the turn differently on its own, the start of the content) to the end of the turn's closing text.

    The closing is what the template renders after an assistant's content whether the conversation ends there
    or goes on (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `</s>`, `<|end|>`), less trailing whitespace; text
    a template adds only at the end of a conversation (Phi-3's final EOS) belongs to no turn. The span ends
    may fall inside a token (`<|end|>\n<|` is common to `<|end|>\n<|endoftext|>` and `<|end|>\n<|user|>`);
    `_encode_chat` cuts them back to token boundaries.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # Where the content sits in the full rendering: substitute a sentinel and compare.
        marked = _render(tokenizer, _with_content(messages, i, _SENTINEL), where)
        tail = _after_sentinel(marked, where)
        c0 = marked.index(_SENTINEL)
        c1 = len(full) - len(tail)
        if not (full.startswith(marked[:c0]) and full.endswith(tail) and c0 <= c1):
            raise DataError(f"{where}: the chat template renders message {i} in a way that depends on its "
                            "content; cannot locate the assistant turns")
        # The closing: common to the conversation ending at this turn and going on after it.
        upto = messages[: i + 1]
        ends = _after_sentinel(_render(tokenizer, _with_content(upto, i, _SENTINEL), where), where)
        goes_on = _after_sentinel(_render(tokenizer, _with_content(
            [*upto, {"role": "user", "content": _PROBE}], i, _SENTINEL), where), where)
        n = 0
        while n < min(len(ends), len(goes_on)) and ends[n] == goes_on[n]:
            n += 1
        closing = ends[:n]
        if not full.startswith(closing, c1):
            raise DataError(f"{where}: the chat template closes assistant message {i} differently mid-"
                            "conversation; cannot locate the assistant turns")
        # The start: everything after the generation prompt, when the template renders the conversation
        # before the turn as it is in the full rendering (so nothing the template adds to an assistant turn
        # before its content is missed); else the content itself (Mistral v0.3 moves the system prompt).
        try:
            before = _render(tokenizer, messages[:i], where, generation_prompt=True)
        except DataError:  # e.g. a template that reads messages[0] given a chat opening with the assistant
            before = None
        start = len(before) if before is not None and full.startswith(before) and len(before) <= c0 else c0
        spans.append((start, c1, c1 + len(closing)))
    return spans


def _encode_chat(messages: Sequence[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Tokens of the rendered chat and a mask that is 1 on assistant turns (content + end-of-turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the model's tokenizer has no chat template; use a prompt template instead")
    full = _render(tokenizer, messages, where)
    for j, m in enumerate(messages):  # e.g. Mistral v0.3 renders the system prompt only before a final user turn
        if m["role"] != "assistant" and m["content"].strip() not in full:
            raise DataError(f"{where}: the chat template leaves message {j} ({m['role']}) out of the rendered chat "
                            "(Mistral v0.3's keeps a system prompt only before a final user turn); put its text "
                            "into the first user message")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    token_ends = sorted({end for _, end in offsets})
    spans = []
    for start, content_end, end in _assistant_spans(messages, tokenizer, full, where):
        # Cut the closing back to the last token it holds whole, then drop trailing whitespace ("\n").
        end = max([e for e in token_ends if content_end <= e <= end], default=content_end)
        end = max(content_end, len(full[:end].rstrip()))
        spans.append((start, end))
    # Overlap, not containment: BPE merges the space a template leaves after "Assistant:" into the first
    # answer token (" blue"), which must still be learned.
    mask = [int(any(s < hi and e > lo for lo, hi in spans)) for s, e in offsets]
    return list(enc["input_ids"]), mask


def _fit_input(record: Record, tokenizer, budget: int, length) -> tuple[Record, bool]:
    """Shortens a templated record's input (cutting its end) until `length(record) <= budget`; used when the
    prompt goes through a chat template, whose rendering can't be cut token by token like a plain template."""
    if record.kind == CHAT or not record.input:
        return record, False
    over = length(record) - budget
    if over <= 0:
        return record, False
    inp = _ids(tokenizer, record.input)
    for slack in (0, 2, 8, 32):  # decode/re-encode may merge tokens differently at the cut
        keep = max(len(inp) - over - slack, 0)
        shorter = dataclasses.replace(record, input=tokenizer.decode(inp[:keep]))
        if length(shorter) <= budget or keep == 0:
            return shorter, True
    return shorter, True


def encode_record(record: Record, tokenizer, fmt: PromptFormat, max_length: int) -> tuple[list[int], list[int], bool]:
    """(tokens, target mask, truncated). At most max_length + 1 tokens (model input + last target).

    Too long: the input field is shortened first (its end is cut); if the output still does not fit,
    its end is cut too (and the EOS dropped). A prompt that leaves no room for any output is an error.
    """
    budget = max_length + 1
    if record.kind == CHAT or fmt.chat:
        record, truncated = _fit_input(record, tokenizer, budget,
                                       lambda r: len(_encode_chat(as_chat(r, fmt), tokenizer, r.where)[0]))
        ids, mask = _encode_chat(as_chat(record, fmt), tokenizer, record.where)
        truncated |= len(ids) > budget
        ids, mask = ids[:budget], mask[:budget]
    else:
        bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        pre, inp, post = _prompt_parts(record, fmt)
        pre_ids, inp_ids, post_ids = bos + _ids(tokenizer, pre), _ids(tokenizer, inp), _ids(tokenizer, post)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        out_ids = _ids(tokenizer, record.output) + eos
        over = len(pre_ids) + len(inp_ids) + len(post_ids) + len(out_ids) - budget
        truncated = over > 0
        if over > 0:
            cut = min(over, len(inp_ids))
            inp_ids = inp_ids[: len(inp_ids) - cut]
            over -= cut
        if over > 0:
            out_ids = out_ids[: max(len(out_ids) - over, 0)]
        prompt = pre_ids + inp_ids + post_ids
        ids, mask = prompt + out_ids, [0] * len(prompt) + [1] * len(out_ids)
    if sum(mask[1:]) == 0:
        raise DataError(f"{record.where}: no output tokens fit in max_length={max_length} after the prompt")
    return ids, mask, truncated


def encode_prompt(record: Record, tokenizer, fmt: PromptFormat, max_prompt_length: int) -> list[int]:
    """The prompt tokens a model generates from: the same tokens as training's prompt part."""
    if record.kind == CHAT or fmt.chat:
        def length(r):
            text = tokenizer.apply_chat_template(as_chat(r, fmt, with_output=False), tokenize=False,
                                                 add_generation_prompt=True)
            return len(_ids(tokenizer, text))

        record, _ = _fit_input(record, tokenizer, max_prompt_length, length)
        messages = as_chat(record, fmt, with_output=False)
        if record.kind == CHAT:  # prompt = everything before the last assistant turn
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            messages = messages[:last]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _ids(tokenizer, text)[-max_prompt_length:]  # tokenized as in training: the whole rendering
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    pre, inp, post = _prompt_parts(record, fmt)
    pre_ids, inp_ids, post_ids = bos + _ids(tokenizer, pre), _ids(tokenizer, inp), _ids(tokenizer, post)
    room = max(max_prompt_length - len(pre_ids) - len(post_ids), 0)
    return pre_ids + inp_ids[:room] + post_ids


def reference_output(record: Record) -> str:
    """What a generated answer is scored against: the output, or a chat's last assistant turn."""
    if record.kind == CHAT:
        return [m for m in record.messages if m["role"] == "assistant"][-1]["content"]
    return record.output


def encode_checked(record: Record, tokenizer, fmt: PromptFormat, max_length: int,
                   too_long: str) -> tuple[list[int], list[int], bool]:
    """`encode_record`, stopping with a DataError naming the record when it is too long and too_long="error"."""
    ids, mask, cut = encode_record(record, tokenizer, fmt, max_length)
    if cut and too_long == "error":
        raise DataError(f"{record.where}: longer than max_length={max_length} tokens "
                        "(config.data.too_long='error'; 'truncate' cuts the input, then the output)")
    return ids, mask, cut


def encode_sft(records: Sequence[Record], tokenizer, fmt: PromptFormat, max_length: int,
               too_long: str = "truncate") -> LmDataset:
    """Tokens and target masks of `records`. A record over max_length is truncated (logged and counted) or,
    with too_long="error", stops with a DataError naming its file and line."""
    tokens, masks, where = [], [], []
    truncated = 0
    for record in records:
        ids, mask, cut = encode_checked(record, tokenizer, fmt, max_length, too_long)
        truncated += cut
        tokens.append(np.asarray(ids, np.int32))
        masks.append(np.asarray(mask, np.int32))
        where.append(record.where)
    if truncated:
        logging.warning("%d of %d examples longer than max_length=%d tokens were truncated (first file: %s)",
                        truncated, len(records), max_length, records[0].where.rsplit(":", 1)[0])
    return LmDataset(tokens, masks, where, truncated)
