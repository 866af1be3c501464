"""detect() names the registry entry an official (or reformatted) template is equivalent to."""

from __future__ import annotations

import pytest
import testdata
from template_refs import LLAMA_CPP_OFFICIAL, QUOTED_OFFICIAL, REAL_OFFICIAL, real_official

from healer.templates import TemplateError, detect, equivalent, get, names


@pytest.mark.parametrize("official,name", [(o, n) for n, offs in LLAMA_CPP_OFFICIAL.items() for o in offs])
def test_detects_official_templates_from_llama_cpp(official, name):
    assert detect(testdata.template(official)) == name


@pytest.mark.parametrize("name", sorted(REAL_OFFICIAL))
def test_detects_official_templates_of_the_repos_tokenizer_config(name):
    assert detect(real_official(name)) == name


def test_detects_qwen3_only_with_its_reasoning_rule():
    # ChatML that keeps every turn's <think> text (or writes no think block) is not qwen3
    official = testdata.template("Qwen-Qwen3-0.6B")
    keeps_all = official.replace("loop.index0 > ns.last_query_index", "true")
    no_empty_block = official.replace("{%- if loop.last or (not loop.last and reasoning_content) %}",
                                      "{%- if reasoning_content %}")
    no_thinking_switch = official.replace("enable_thinking is false", "false")
    for variant in (keeps_all, no_empty_block, no_thinking_switch):
        assert variant != official
        assert detect(variant) != "qwen3"


@pytest.mark.parametrize("name", sorted(QUOTED_OFFICIAL))
def test_detects_quoted_official_templates(name):
    assert detect(QUOTED_OFFICIAL[name]) == name


@pytest.mark.parametrize("name", names())
def test_each_entry_is_detected_as_itself_and_no_other(name):
    assert detect(get(name).source) == name
    others = [n for n in names() if n != name and equivalent(get(name).source, get(n))]
    assert others == []


@pytest.mark.parametrize("official", ["Qwen3.5-4B", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
                                      "mistralai-Ministral-3-14B-Reasoning-2512", "openai-gpt-oss-120b"])
def test_templates_of_other_formats_are_not_detected(official):
    assert detect(testdata.template(official)) is None


def test_reformatted_chatml_is_still_chatml():
    reformatted = (
        "{% for m in messages %}"
        "{{ '<|im_start|>' ~ m.role ~ '\n' ~ m.content ~ '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert detect(reformatted) == "chatml"


def test_template_hard_coding_bos_matches_when_bos_token_is_given():
    hard_coded = QUOTED_OFFICIAL["llama-2"].replace("bos_token + ", "'<s>' + ").replace("+ eos_token", "+ '</s>'")
    assert hard_coded != QUOTED_OFFICIAL["llama-2"]
    assert detect(hard_coded, bos_token="<s>", eos_token="</s>") == "llama-2"
    assert detect(hard_coded, bos_token="<|bos|>", eos_token="<|eos|>") is None


def test_near_miss_is_not_detected():
    # Llama 3 with the generation prompt forgotten: every prompt-only render differs
    broken = QUOTED_OFFICIAL["llama-3"].replace("{% if add_generation_prompt %}", "{% if false %}")
    assert detect(broken) is None


def test_template_that_refuses_everything_is_not_detected():
    assert detect("{{ raise_exception('no') }}") is None


def test_unparsable_template_raises_typed_error():
    with pytest.raises(TemplateError, match="does not parse"):
        detect("{% for m in messages %}")
