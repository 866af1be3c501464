"""The chat template registry: our own Jinja templates for the common chat formats.

Each template is written in the format transformers' apply_chat_template reads (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`). Where a model family
publishes an official template, ours renders exactly the same string for chats without tool
calls (tests/templates compares them); tool calling is out of scope (`qwen3` and `mistral-small-3`,
whose official templates render tools, refuse them rather than render them differently).

Sources carry `{% generation %}` blocks around the trained part of each assistant turn
(content + end-of-turn token; for `qwen3` the think block too). `ChatTemplate.source` is the template with those tags removed,
which is what gets written into a checkpoint (llama.cpp and others do not know the tag);
`ChatTemplate.tracked_source` keeps them for assistant-only masks. Every output in these
sources goes through `{{- ... }}` so removing the tags cannot change whitespace.

Naming decisions:
- `llama-3` is the Llama 3.0 Instruct template. Llama 3.1, 3.2 and 3.3 always write a system header
  with "Cutting Knowledge Date: December 2023" and "Today Date: {date_string}"; they differ only
  in the default date. `llama-3.1` defaults to "26 Jul 2024", as 3.1's and 3.3's official
  templates do (3.3's is byte for byte 3.1's, so `llama-3.3` is an alias of `llama-3.1`, not an
  entry: detection could never tell two equal entries apart). `llama-3.2` is an entry of its own
  because 3.2's official template writes today's date (`strftime_now("%d %b %Y")`) unless
  `date_string` is passed: every day but one it renders differently from 3.1's. Training data
  rendered with it therefore carries the date of the run, exactly as the official template would
  render it; pass `date_string` for a fixed one.
- Mistral has three spellings that differ only in spaces (each space is a token): `mistral-v1`
  (Mistral-7B-Instruct v0.1/v0.2, Mixtral-8x7B: `<s> [INST] q [/INST] a</s>`), `mistral-v3`
  (Mistral-7B-Instruct-v0.3, Mixtral-8x22B: `<s>[INST] q[/INST] a</s>`, [INST] is a control
  token) and `mistral-nemo` (tekken tokenizers, Mistral-Nemo-Instruct-2407: no spaces).
  v3 and nemo follow the official Hugging Face templates: the system prompt goes in front of
  the last message only if that message is a user turn, so a conversation that ends with an
  assistant turn (training data) loses its system prompt, exactly as with the official
  template (mistral-common instead puts it before the last user turn).
- `qwen3` follows Qwen3's template (thinking models): reasoning (`<think>…</think>` at the start of
  the content, or a `reasoning_content` field) is kept only on assistant turns after the last user
  message; earlier turns render without it, and the last turn always gets a think block (empty if
  it has none). `enable_thinking=False` adds the empty block to the generation prompt. The trained
  span of a turn is everything after the `<|im_start|>assistant` line (think block included), so the
  assistant-only masks train the reasoning of the last turns, as the model writes it at inference.
  The official template cannot be rendered turn by turn (the reasoning of a turn disappears once a
  user message follows); the `{% generation %}` blocks here mark each turn in the full render.
  Tool calls and tool messages raise an error (the official template renders them; we do not).
- `mistral-small-3` follows Mistral-Small-3.2-24B-Instruct-2506's template: the system prompt in
  `[SYSTEM_PROMPT]…[/SYSTEM_PROMPT]` right after BOS, and Mistral's default system prompt (with
  today's date, `strftime_now`) when the chat has none, so training data without a system turn
  carries that prompt and the date of the run, as the official template renders it. Answers are
  not trimmed; a system message later in the chat gets its own [SYSTEM_PROMPT] block. (3.0's and
  3.1's templates have other default prompts.) Tool calls raise an error.
- `gemma` refuses a system message, as the official Gemma / Gemma 2 template does; `gemma-3` puts it
  (untrimmed, then a blank line) at the start of the first user turn, as Gemma 3's does.
- `phi-3` writes eos_token after the last turn when add_generation_prompt is off (as Phi-3.5's
  official template does); that eos is not part of any trained span.
- `phi-4` is microsoft/phi-4's template as revised with its tokenizer fixes (generation prompt
  only when asked; the first release wrote the assistant header after every user turn). Other roles
  are skipped, as there. Phi-4-mini is another format (`<|user|>…<|end|>`), not this entry.
- No official templates exist for `vicuna` (follows FastChat's vicuna_v1.1, with bos_token in
  front) and `alpaca` (alpaca-lora's prompt: Stanford Alpaca's layout with a newline after
  "### Response:"; further turns repeat the Instruction/Response pair).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from healer.templates.render import Message, Span, TemplateError, render_spans

_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclass(frozen=True)
class ChatTemplate:
    """One registry entry: a Jinja chat template and the facts checks and training need about it."""

    name: str
    description: str
    tracked_source: str
    eot_token: str | None
    """Literal string that ends an assistant turn; None: the tokenizer's eos_token does."""
    generation_prompt: str
    """What add_generation_prompt=True appends (may be empty: the user turn already ends in the cue)."""
    emits_bos: bool
    """The template writes bos_token itself (so the tokenizer must not add another)."""
    control_tokens: tuple[str, ...]
    """Literal markers the template writes; a tokenizer for it must encode each as one id."""
    bos_token: str
    """The family's usual BOS (used when no tokenizer is given)."""
    eos_token: str
    """The family's usual EOS (used when no tokenizer is given)."""

    @property
    def source(self) -> str:
        """The Jinja template to write into a checkpoint (no `{% generation %}` tags)."""
        return _GENERATION_TAG.sub("", self.tracked_source)

    def end_of_turn(self, eos_token: str | None = None) -> str:
        """The string that ends an assistant turn, given the tokenizer's eos_token."""
        if self.eot_token is not None:
            return self.eot_token
        return eos_token if eos_token is not None else self.eos_token

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
               bos_token: str | None = None, eos_token: str | None = None, **variables: Any) -> str:
        """Render to text; bos/eos default to the family's tokens."""
        return self.render_spans(messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                                 eos_token=eos_token, **variables)[0]

    def render_spans(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                     bos_token: str | None = None, eos_token: str | None = None,
                     **variables: Any) -> tuple[str, list[Span]]:
        """Render to text plus the character spans of the trained parts (assistant content + end of turn)."""
        values = {"bos_token": self.bos_token if bos_token is None else bos_token,
                  "eos_token": self.eos_token if eos_token is None else eos_token, **variables}
        return render_spans(self.tracked_source, messages, add_generation_prompt=add_generation_prompt,
                            name=self.name, **values)


_ALTERNATE = ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
              "{%- endif %}")
_SPLIT_SYSTEM = r"""
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}"""

CHATML = r"""
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] + '<|im_end|>' }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

QWEN25 = r"""
{%- if messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}""" + CHATML

LLAMA2 = r"""
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    """ + _ALTERNATE + r"""
    {%- set content = message['content'] %}
    {%- if loop.first and system_message is defined %}
        {%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + content %}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' }}
        {%- generation %}{{- content | trim + ' ' + eos_token }}{%- endgeneration %}
    {%- endif %}
{%- endfor %}"""

_NO_TOOLS = ("{{- raise_exception('Tool calls and tool messages are not supported by this registry template; "
             "train with the model\\'s own template file (--template FILE.jinja)') }}")

# Qwen3 keeps an assistant turn's reasoning only after the last user message (the turns the model is
# generating now); earlier turns lose their <think> block. The last assistant turn after that user
# message always gets one, empty if it has no reasoning, so training teaches the think block the
# model writes at inference. A user message that is exactly a wrapped tool response does not count
# as the last query (a rule of the official template, kept so such chats render alike).
QWEN3 = r"""
{%- if tools %}""" + _NO_TOOLS + r"""
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- set last = namespace(query=messages | length - 1) %}
{%- for message in messages %}
    {%- if message['role'] == 'user' and not (message['content'].startswith('<tool_response>')
                                              and message['content'].endswith('</tool_response>')) %}
        {%- set last.query = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- elif message['role'] == 'assistant' and not message['tool_calls'] %}
        {%- set answer = message['content'] %}
        {%- set thought = '' %}
        {%- if message['reasoning_content'] is defined and message['reasoning_content'] is not none %}
            {%- set thought = message['reasoning_content'] %}
        {%- elif '</think>' in answer %}
            {%- set parts = answer.split('</think>') %}
            {%- set answer = parts[-1].lstrip('\n') %}
            {%- set thought = parts[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {%- if loop.index0 > last.query and (loop.last or thought) %}
                {{- '<think>\n' + thought.strip('\n') + '\n</think>\n\n' + answer.lstrip('\n') }}
            {%- else %}
                {{- answer }}
            {%- endif %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif message['role'] in ['assistant', 'tool'] %}""" + _NO_TOOLS + r"""
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

_LLAMA3_TURNS = r"""
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

LLAMA3 = r"""
{%- for message in messages %}
    {%- if loop.first %}
        {{- bos_token }}
    {%- endif %}""" + _LLAMA3_TURNS


def _llama31(default_date: str) -> str:
    return r"""
{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = """ + default_date + r""" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: ' }}
{{- date_string + '\n\n' + system_message + '<|eot_id|>' }}
{%- for message in loop_messages %}""" + _LLAMA3_TURNS


LLAMA31 = _llama31("'26 Jul 2024'")
LLAMA32 = _llama31("strftime_now('%d %b %Y')")


def _mistral(inst: str, end_inst: str, before_answer: str, system_turn: str, trim: bool) -> str:
    content = "message['content'] | trim" if trim else "message['content']"
    return _SPLIT_SYSTEM + r"""
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if loop.""" + system_turn + r""" and system_message is defined %}
            {{- '""" + inst + r"""' + system_message + '\n\n' + message['content'] + '""" + end_inst + r"""' }}
        {%- else %}
            {{- '""" + inst + r"""' + message['content'] + '""" + end_inst + r"""' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- '""" + before_answer + r"""' }}
        {%- generation %}{{- """ + content + r""" + eos_token }}{%- endgeneration %}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}"""


# Mistral Small 3.2's default system prompt ({date}: today, as %Y-%m-%d), written when a chat has none
MISTRAL_SMALL_3_SYSTEM = (
    'You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French '
    'startup headquartered in Paris.\n'
    'Your knowledge base was last updated on 2023-10-01. The current date is '
    '{date}'
    '.\n'
    '\n'
    "When you're not sure about some information or when the user's request requires "
    'up-to-date or specific data, you must use the available tools to fetch the information. '
    'Do not hesitate to use tools whenever they can provide a more accurate or complete '
    "response. If no relevant tools are available, then clearly state that you don't have the "
    'information and avoid making up anything.\n'
    '\n'
    "If the user's question is not clear, ambiguous, or does not provide enough context for "
    'you to accurately answer the question, you do not try to answer it right away and you '
    'rather ask the user to clarify their request (e.g. "What are some good restaurants around '
    'me?" => "Where are you?" or "When is the next flight to Tokyo" => "Where do you travel '
    'from?").\n'
    'You are always very attentive to dates, and when asked about information at specific '
    'dates, you discard information that is at another date.\n'
    'You follow these instructions in all languages, and always respond to the user in the '
    'language they use or request.\n'
    'Next sections describe the capabilities that you have.\n'
    '\n'
    '# WEB BROWSING INSTRUCTIONS\n'
    '\n'
    'You cannot perform any web search or access internet to open URLs, links etc. If it seems '
    'like the user is expecting you to do so, you clarify the situation and ask the user to '
    'copy paste the text directly in the chat.\n'
    '\n'
    '# MULTI-MODAL INSTRUCTIONS\n'
    '\n'
    'You have the ability to read images, but you cannot generate images. You also cannot '
    'transcribe audio files or videos.\n'
    'You cannot read nor transcribe audio files or videos.\n'
    '\n'
    '# TOOL CALLING INSTRUCTIONS\n'
    '\n'
    'You may have access to tools that you can use to fetch information or perform actions. '
    'You must use these tools in the following situations:\n'
    '\n'
    '1. When the request requires up-to-date information.\n'
    '2. When the request requires specific data that you do not have in your knowledge base.\n'
    '3. When the request involves actions that you cannot perform without tools.\n'
    '\n'
    'Always prioritize using tools to provide the most accurate and helpful response. If tools '
    'are not available, inform the user that you cannot perform the requested action at the '
    'moment.'
)
_BEFORE_DATE, _AFTER_DATE = MISTRAL_SMALL_3_SYSTEM.split("{date}")
# A JSON string is a valid Jinja string literal (same escapes), so the prompt needs no hand escaping
_MISTRAL_SMALL_3_DEFAULT = json.dumps(_BEFORE_DATE) + " + strftime_now('%Y-%m-%d') + " + json.dumps(_AFTER_DATE)
MISTRAL_SMALL_3 = r"""
{%- if tools %}""" + _NO_TOOLS + r"""
{%- endif %}
{%- macro mistral_text(content, where) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for block in content %}
            {%- if block['type'] == 'text' %}
                {{- block['text'] }}
            {%- elif block['type'] in ['image', 'image_url'] %}
                {{- '[IMG]' }}
            {%- else %}
                {{- raise_exception('Only text and image blocks are supported in ' + where + ' content!') }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set first = messages[0]['content'] %}
    {%- set system_prompt = first if first is string else first[0]['text'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_prompt = """ + _MISTRAL_SMALL_3_DEFAULT + r""" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
{%- endfor %}
{{- '[SYSTEM_PROMPT]' + system_prompt + '[/SYSTEM_PROMPT]' }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'system' %}
        {%- set text = message['content'] if message['content'] is string else message['content'][0]['text'] %}
        {{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'user' %}
        {{- '[INST]' + mistral_text(message['content'], 'message') + '[/INST]' }}
    {%- elif message['role'] == 'assistant' and not message['tool_calls'] %}
        {%- generation %}{{- mistral_text(message['content'], 'assistant') + eos_token }}{%- endgeneration %}
    {%- elif message['role'] in ['assistant', 'tool', 'tool_results'] %}""" + _NO_TOOLS + r"""
    {%- else %}
        {{- raise_exception('Only system, user, assistant, and tool roles are supported!') }}
    {%- endif %}
{%- endfor %}"""

GEMMA = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- raise_exception('System role not supported') }}
{%- endif %}
{%- for message in messages %}
    """ + _ALTERNATE + r"""
    {%- if message['role'] == 'assistant' %}
        {{- '<start_of_turn>model\n' }}
        {%- generation %}{{- message['content'] | trim + '<end_of_turn>' }}{%- endgeneration %}
    {%- else %}
        {{- '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>' }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}"""

# Gemma 3 has no system turn: the system prompt and a blank line open the first user turn. Content
# may also be a list of parts (the multimodal processor's format): text parts trimmed, images as
# <start_of_image>.
GEMMA3 = r"""
{%- macro gemma3_text(content) %}
    {%- if content is string %}
        {{- content | trim }}
    {%- elif content is iterable %}
        {%- for part in content %}
            {%- if part['type'] == 'image' %}
                {{- '<start_of_image>' }}
            {%- elif part['type'] == 'text' %}
                {{- part['text'] | trim }}
            {%- endif %}
        {%- endfor %}
    {%- else %}
        {{- raise_exception('Invalid content type') }}
    {%- endif %}
{%- endmacro %}
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text'] %}
    {%- set first_user_prefix = system + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    """ + _ALTERNATE + r"""
    {%- if message['role'] == 'assistant' %}
        {{- '<start_of_turn>model\n' }}
        {%- generation %}{{- gemma3_text(message['content']) + '<end_of_turn>' }}{%- endgeneration %}
    {%- else %}
        {{- '<start_of_turn>' + message['role'] + '\n' + (first_user_prefix if loop.first else '') }}
        {{- gemma3_text(message['content']) + '<end_of_turn>' }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}"""

PHI3 = r"""
{%- for message in messages %}
    {%- if message['role'] == 'system' and message['content'] %}
        {{- '<|system|>\n' + message['content'] + '<|end|>\n' }}
    {%- elif message['role'] == 'user' %}
        {{- '<|user|>\n' + message['content'] + '<|end|>\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|assistant|>\n' }}
        {%- generation %}{{- message['content'] + '<|end|>' }}{%- endgeneration %}
        {{- '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- else %}
    {{- eos_token }}
{%- endif %}"""

# Phi-4 (14B) writes no newline anywhere: <|im_sep|> ends the role, <|im_end|> the turn
PHI4 = r"""
{%- for message in messages %}
    {%- if message['role'] in ['system', 'user'] %}
        {{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant<|im_sep|>' }}
        {%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant<|im_sep|>' }}
{%- endif %}"""

ZEPHYR = r"""
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '<|user|>\n' + message['content'] + eos_token + '\n' }}
    {%- elif message['role'] == 'system' %}
        {{- '<|system|>\n' + message['content'] + eos_token + '\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|assistant|>\n' }}
        {%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}
        {{- '\n' }}
    {%- endif %}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|assistant|>\n' }}
    {%- endif %}
{%- endfor %}"""

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VICUNA = r"""
{{- bos_token }}""" + _SPLIT_SYSTEM + r"""
{{- (system_message if system_message is defined else '""" + VICUNA_SYSTEM.replace("'", "\\'") + r"""') + ' ' }}
{%- for message in loop_messages %}
    """ + _ALTERNATE + r"""
    {%- if message['role'] == 'user' %}
        {{- 'USER: ' + message['content'] + ' ' }}
    {%- else %}
        {{- 'ASSISTANT: ' }}
        {%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'ASSISTANT:' }}
{%- endif %}"""

ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA = r"""
{{- bos_token }}""" + _SPLIT_SYSTEM + r"""
{{- system_message if system_message is defined else '""" + ALPACA_SYSTEM + r"""' }}
{%- for message in loop_messages %}
    """ + _ALTERNATE + r"""
    {%- if message['role'] == 'user' %}
        {{- '\n\n### Instruction:\n' + message['content'] }}
    {%- else %}
        {{- '\n\n### Response:\n' }}
        {%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '\n\n### Response:\n' }}
{%- endif %}"""

_LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (
    ChatTemplate("chatml", "ChatML (<|im_start|>role ... <|im_end|>), no default system prompt",
                 CHATML.strip(), "<|im_end|>", "<|im_start|>assistant\n", False,
                 ("<|im_start|>", "<|im_end|>"), "", "<|im_end|>"),
    ChatTemplate("qwen2.5", "Qwen2.5 Instruct: ChatML with Qwen's default system prompt",
                 QWEN25.strip(), "<|im_end|>", "<|im_start|>assistant\n", False,
                 ("<|im_start|>", "<|im_end|>"), "", "<|im_end|>"),
    ChatTemplate("qwen3", "Qwen3 (thinking): ChatML; <think> kept after the last user turn, dropped before it",
                 QWEN3.strip(), "<|im_end|>", "<|im_start|>assistant\n", False,
                 ("<|im_start|>", "<|im_end|>", "<think>", "</think>"), "", "<|im_end|>"),
    ChatTemplate("llama-2", "Llama 2 chat: <s>[INST] <<SYS>> ... [/INST] answer </s>",
                 LLAMA2.strip(), None, "", True, (), "<s>", "</s>"),
    ChatTemplate("llama-3", "Llama 3.0 Instruct (no date header)",
                 LLAMA3.strip(), "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", True,
                 _LLAMA3_MARKERS, "<|begin_of_text|>", "<|eot_id|>"),
    ChatTemplate("llama-3.1", "Llama 3.1 and 3.3 (alias llama-3.3) Instruct without tools: system header with "
                 "knowledge date and date_string (default 26 Jul 2024)",
                 LLAMA31.strip(), "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", True,
                 _LLAMA3_MARKERS, "<|begin_of_text|>", "<|eot_id|>"),
    ChatTemplate("llama-3.2", "Llama 3.2 Instruct without tools: as llama-3.1, but date_string defaults to today",
                 LLAMA32.strip(), "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", True,
                 _LLAMA3_MARKERS, "<|begin_of_text|>", "<|eot_id|>"),
    ChatTemplate("mistral-v1", "Mistral v1 tokenizer (7B-Instruct v0.1/v0.2, Mixtral-8x7B): ' [INST] q [/INST] a</s>'",
                 _mistral(" [INST] ", " [/INST]", " ", "first", trim=False).strip(), None, "", True, (),
                 "<s>", "</s>"),
    ChatTemplate("mistral-v3", "Mistral v3 tokenizer (7B-Instruct-v0.3, Mixtral-8x22B): '[INST] q[/INST] a</s>'",
                 _mistral("[INST] ", "[/INST]", " ", "last", trim=True).strip(), None, "", True,
                 ("[INST]", "[/INST]"), "<s>", "</s>"),
    ChatTemplate("mistral-nemo", "Mistral tekken tokenizers (Nemo-Instruct-2407): '[INST]q[/INST]a</s>'",
                 _mistral("[INST]", "[/INST]", "", "last", trim=False).strip(), None, "", True,
                 ("[INST]", "[/INST]"), "<s>", "</s>"),
    ChatTemplate("mistral-small-3", "Mistral Small 3.2 (2506): '[SYSTEM_PROMPT]s[/SYSTEM_PROMPT][INST]q[/INST]a</s>', "
                 "Mistral's default system prompt (with today's date) when none is given",
                 MISTRAL_SMALL_3.strip(), None, "", True,
                 ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"), "<s>", "</s>"),
    ChatTemplate("gemma", "Gemma and Gemma 2 instruct (<start_of_turn>user/model; no system role)",
                 GEMMA.strip(), "<end_of_turn>", "<start_of_turn>model\n", True,
                 ("<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>"),
    ChatTemplate("gemma-3", "Gemma 3 instruct: Gemma's turns; the system prompt opens the first user turn",
                 GEMMA3.strip(), "<end_of_turn>", "<start_of_turn>model\n", True,
                 ("<start_of_turn>", "<end_of_turn>"), "<bos>", "<end_of_turn>"),
    ChatTemplate("phi-3", "Phi-3 / Phi-3.5 mini instruct (<|user|> ... <|end|>)",
                 PHI3.strip(), "<|end|>", "<|assistant|>\n", False,
                 ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<s>", "<|endoftext|>"),
    ChatTemplate("phi-4", "Phi-4 (14B): <|im_start|>role<|im_sep|>...<|im_end|>, no newlines",
                 PHI4.strip(), "<|im_end|>", "<|im_start|>assistant<|im_sep|>", False,
                 ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), "<|endoftext|>", "<|im_end|>"),
    ChatTemplate("zephyr", "Zephyr (<|user|>\\n ... </s>; markers are plain text)",
                 ZEPHYR.strip(), None, "<|assistant|>\n", False, (), "<s>", "</s>"),
    ChatTemplate("vicuna", "Vicuna v1.1 (FastChat): 'SYSTEM USER: q ASSISTANT: a</s>'",
                 VICUNA.strip(), None, "ASSISTANT:", True, (), "<s>", "</s>"),
    ChatTemplate("alpaca", "Alpaca (alpaca-lora layout): '### Instruction:\\n...\\n\\n### Response:\\n...'",
                 ALPACA.strip(), None, "\n\n### Response:\n", True, (), "<s>", "</s>"),
)}


# Other names `get` accepts for an entry (see "Naming decisions" above)
ALIASES: dict[str, str] = {"llama-3.3": "llama-3.1"}


def names() -> list[str]:
    """Registry entry names, in registry order (aliases not included)."""
    return list(TEMPLATES)


def get(name: str) -> ChatTemplate:
    """The registry entry called `name` (or aliased so); TemplateError listing the known names otherwise."""
    try:
        return TEMPLATES[ALIASES.get(name, name)]
    except KeyError:
        known = ", ".join([*TEMPLATES, *ALIASES])
        raise TemplateError(f"unknown chat template {name!r}; known: {known}") from None
