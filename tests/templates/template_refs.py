"""Reference material for the chat template tests: conversations, official templates, FastChat.

Official templates come from llama.cpp's models/templates (tests/testdata.template(name)) where
llama.cpp ships them, and from the official repos' tokenizer_config.json fetched with npm
(testdata.real_tokenizer, `REAL_OFFICIAL`) for Qwen3 and Gemma 3. Three families are not in that directory; their official templates are
quoted here verbatim from the models' tokenizer_config.json "chat_template" (test reference
only, never used by the registry):
- Llama 2: meta-llama/Llama-2-7b-chat-hf
- Llama 3.0: meta-llama/Meta-Llama-3-8B-Instruct (the revision with add_generation_prompt)
- Zephyr: HuggingFaceH4/zephyr-7b-beta
- Phi-4: microsoft/phi-4, the template of commit 6fbb3d3 ("Suggested tokenizer changes by
  Unsloth.ai (#21)", also in microsoft/phi-4-gguf); the first release (0d1cd29) wrote the assistant
  header after each user turn and had no generation prompt
FastChat's conversation templates (the reference implementation of the Vicuna format) come from
the fschat wheel on PyPI, downloaded once into the test data cache.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path

import testdata

LLAMA_CPP_OFFICIAL = {
    "llama-3.1": ["meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.3-70B-Instruct"],
    "llama-3.2": ["meta-llama-Llama-3.2-3B-Instruct"],
    "gemma": ["google-gemma-2-2b-it"],
    "phi-3": ["microsoft-Phi-3.5-mini-instruct"],
    "qwen2.5": ["Qwen-Qwen2.5-7B-Instruct"],
    "mistral-nemo": ["mistralai-Mistral-Nemo-Instruct-2407"],
    "qwen3": ["Qwen-Qwen3-0.6B"],
    "mistral-small-3": ["Mistral-Small-3.2-24B-Instruct-2506"],
}
# registry entry -> testdata.real_tokenizer name whose tokenizer_config.json holds the official template
REAL_OFFICIAL = {"qwen3": "qwen3", "gemma-3": "gemma3"}

LLAMA2_OFFICIAL = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA3_OFFICIAL = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
ZEPHYR_OFFICIAL = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
    "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
PHI4_OFFICIAL = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant"
    "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
QUOTED_OFFICIAL = {"llama-2": LLAMA2_OFFICIAL, "llama-3": LLAMA3_OFFICIAL, "zephyr": ZEPHYR_OFFICIAL,
                   "phi-4": PHI4_OFFICIAL}

# alpaca-lora's templates/alpaca.json "prompt_no_input" (tloen/alpaca-lora): the prompt, then the output
ALPACA_LORA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def real_official(name: str) -> str:
    """The chat_template of an official repo's tokenizer_config.json (REAL_OFFICIAL[name])."""
    config = testdata.real_tokenizer(REAL_OFFICIAL[name]) / "tokenizer_config.json"
    return json.loads(config.read_text(encoding="utf-8"))["chat_template"]


def m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYSTEM = m("system", "You are a careful assistant.")
CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "user": [m("user", "What is 2+2?")],
    "system_user": [SYSTEM, m("user", "What is 2+2?")],
    "one_turn": [m("user", "What is 2+2?"), m("assistant", "4.")],
    "system_one_turn": [SYSTEM, m("user", "What is 2+2?"), m("assistant", "4.")],
    "two_turns_open": [m("user", "Hi"), m("assistant", "Hello!"), m("user", "Name a colour.")],
    "system_three_turns": [SYSTEM, m("user", "A"), m("assistant", "B"), m("user", "C"), m("assistant", "D"),
                           m("user", "E"), m("assistant", "F")],
    "five_turns": [x for i in range(5) for x in (m("user", f"Question {i}?"), m("assistant", f"Answer {i}."))],
    "unicode": [m("system", "Réponds en français — s'il te plaît."), m("user", "Grüße 👋 世界, naïve café?"),
                m("assistant", "Привет! 你好 🌍 ok")],
    "padded": [m("user", "  spaced question \n"), m("assistant", "\n  spaced answer  \n"), m("user", "\tnext\t")],
    "multiline": [m("user", "line 1\nline 2\n\nline 4"), m("assistant", "- a\n- b\n\n```py\nx = 1\n```")],
    "empty_content": [m("user", ""), m("assistant", ""), m("user", "")],
    "empty_system": [m("system", ""), m("user", "Hi"), m("assistant", "Hello")],
    "repeats_user": [m("user", "Say exactly: the cat sat"), m("assistant", "the cat sat"),
                     m("user", "the cat sat"), m("assistant", "the cat sat")],
    "marker_text": [m("user", "Explain <|im_end|> and [INST] and <end_of_turn>"),
                    m("assistant", "Tokens like <|eot_id|>, </s>, [/INST] and <|end|> end turns.")],
    "assistant_first": [m("assistant", "I start."), m("user", "Ok")],
    # Reasoning (Qwen3): earlier turns lose their think block, turns after the last user message keep it
    "reasoning": [SYSTEM, m("user", "Q1?"), m("assistant", "<think>\nfirst thought\n</think>\n\nA1."),
                  m("user", "Q2?"), m("assistant", "<think>\n\nsecond\nthought\n\n</think>\n\n\nA2.")],
    "reasoning_unclosed": [m("user", "Q?"), m("assistant", "no open tag</think>answer <think>kept")],
    "reasoning_content": [m("user", "Q?"), {"role": "assistant", "content": "A.", "reasoning_content": "\nr\n"}],
    # a user message that is exactly a wrapped tool response is not the last query for Qwen3
    "tool_response_text": [m("user", "Q?"), m("assistant", "<think>\nr1\n</think>\n\nA."),
                           m("user", "<tool_response>\n42\n</tool_response>"),
                           m("assistant", "<think>\nr2\n</think>\n\nB.")],
}


def outcome(render, *args, **kwargs) -> tuple[str, str]:
    """('ok', text) or ('error', '') so two renderers can be compared, refusals included."""
    try:
        return "ok", render(*args, **kwargs)
    except Exception:  # the reference raises jinja2 errors, ours TemplateError (checked on its own)
        return "error", ""


def hf_render(template: str, messages, add_generation_prompt: bool, **variables) -> str:
    """transformers' own renderer, the one apply_chat_template(tokenize=False) calls."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **variables)
    return rendered[0]


def spans_after_prompt(official: str, conv, add_generation_prompt: bool, end_of_turn: str,
                       **variables) -> list[tuple[int, int]]:
    """Reference assistant spans for a template whose trained part of a turn is everything the model
    writes after the generation prompt (Qwen3: a think block, then the content): each from the end of
    the official render of the turns before it with the generation prompt, to the `end_of_turn` that
    follows its content (found by rendering the content with a marker appended)."""
    text = hf_render(official, conv, add_generation_prompt, **variables)
    probe = [m("user", "x")]
    prompt = hf_render(official, probe, True, **variables)[len(hf_render(official, probe, False, **variables)):]
    spans = []
    for i, msg in enumerate(conv):
        if msg["role"] != "assistant":
            continue
        before = hf_render(official, conv[:i], True, **variables) if i else prompt
        assert text.startswith(before)
        marked = hf_render(official, [*conv[:i], {**msg, "content": msg["content"] + "\x00"}, *conv[i + 1:]],
                           add_generation_prompt, **variables)
        content_end = next(k for k, (a, b) in enumerate(zip(text, marked, strict=False)) if a != b)
        assert text.startswith(end_of_turn, content_end)
        spans.append((len(before), content_end + len(end_of_turn)))
    return spans


FSCHAT = "fschat==0.2.36"


@cache
def fastchat_conversation():
    """fastchat.conversation from the fschat wheel (imports only the standard library)."""
    dest = testdata.CACHE / "fschat" / "conversation.py"
    if not dest.exists():
        with testdata._locked():
            if not dest.exists():
                tmp = testdata.CACHE / "fschat" / "wheel"
                tmp.mkdir(parents=True, exist_ok=True)
                subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
                                ":all:", "-d", str(tmp), FSCHAT], check=True)
                (wheel,) = Path(tmp).glob("fschat-*.whl")
                with zipfile.ZipFile(wheel) as z:
                    testdata._atomic_write(dest, z.read("fastchat/conversation.py"))
    spec = importlib.util.spec_from_file_location("fastchat_conversation", dest)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mistral_fast_tokenizer(version: str):
    """A transformers fast tokenizer converted from Mistral's sentencepiece model (conversion cached)."""
    from transformers import PreTrainedTokenizerFast

    dest = testdata.CACHE / "fast-mistral" / version / "tokenizer.json"
    if not dest.exists():
        import builders

        with testdata._locked(), tempfile.TemporaryDirectory(dir=testdata.CACHE) as work:
            if not dest.exists():
                made = builders.converted_tokenizer_json(testdata.mistral_model(version), Path(work))
                testdata._atomic_write(dest, made.read_bytes())
    return PreTrainedTokenizerFast(tokenizer_file=str(dest), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
