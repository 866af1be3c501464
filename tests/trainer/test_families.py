"""The family table (healer/families.py) against the real tokenizer files, and `trainer run` on bad input."""

from __future__ import annotations

import json

import pytest
import testdata
import tiny_runs
from builders import REAL_TOKENIZER_MODELS
from click.testing import CliRunner

import cli
from healer import families

TRAINED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def test_the_table_lists_the_families_we_train():
    assert set(families.FAMILIES) == set(TRAINED)
    assert all(name == f.model_type for name, f in families.FAMILIES.items())


@pytest.mark.parametrize("name", REAL_TOKENIZER_MODELS)
def test_bos_rule_matches_the_official_tokenizer_files(name):
    """Llama 2/3/3.1 and Gemma 3 start sequences with BOS, by the tokenizer or by the official chat
    template (Llama 3 as first released: its tokenizer.json forgot it, its template writes it); Qwen3
    has no BOS at all."""
    from transformers import AutoTokenizer

    model_type, _ = REAL_TOKENIZER_MODELS[name]
    tok = AutoTokenizer.from_pretrained(str(testdata.real_tokenizer(name)))
    encoded_first = tok.bos_token_id is not None and tok("Hello world")["input_ids"][0] == tok.bos_token_id
    templated_first = False
    if tok.chat_template:  # Llama 2's base repo has none
        rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
        templated_first = tok.bos_token is not None and rendered.startswith(tok.bos_token)
    assert families.starts_with_bos(model_type) == (encoded_first or templated_first)


@pytest.mark.parametrize("name", REAL_TOKENIZER_MODELS)
def test_the_official_eos_is_a_stop_token_of_the_family_and_every_stop_token_is_one_token(name):
    from transformers import AutoTokenizer

    model_type, _ = REAL_TOKENIZER_MODELS[name]
    tok = AutoTokenizer.from_pretrained(str(testdata.real_tokenizer(name)))
    stops = families.get(model_type).stop_tokens
    assert tok.eos_token in stops
    vocab = tok.get_vocab()
    # every stop token this tokenizer knows is a single id (Llama 2 lacks Llama 3's, and the reverse)
    present = [t for t in stops if t in vocab]
    assert tok.eos_token in present
    assert all(tok.convert_ids_to_tokens(tok(t, add_special_tokens=False)["input_ids"]) == [t] for t in present)


@pytest.mark.parametrize("model_type", ["mixtral", "gemma3"])
def test_model_types_we_do_not_train_share_their_familys_bos_rule(model_type):
    assert families.starts_with_bos(model_type)
    assert families.get(model_type) is None


def test_unknown_model_types_do_not_start_with_bos():
    assert not families.starts_with_bos("gpt2") and not families.starts_with_bos(None)


def _refused(llama2, chat_data, tmp_path, **config_update):
    """`trainer run` on a copy of the tiny Llama whose config.json says something else, without its weights:
    the run must stop on config.json alone (a weights read would fail on the missing file instead)."""
    model = tiny_runs.copy_checkpoint(llama2, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(config_update)
    (model / "config.json").write_text(json.dumps(config))
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    r = CliRunner().invoke(cli.trainer, ["run", "--model", str(model), "--data", str(chat_data),
                                         "--out", str(tmp_path / "run"), "--template", "llama-2"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len([line for line in lines if line.startswith("error: ")]) == 1 and lines[-1].startswith("error: ")
    assert not (tmp_path / "run").exists()
    return lines[-1]


CHAT_ROWS = 4  # chat_data (conftest.py)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gemma4", "gpt_oss"])
def test_a_family_we_do_not_train_is_one_line_naming_it_and_ours_exit_2(llama2, chat_data, tmp_path, model_type):
    line = _refused(llama2, chat_data, tmp_path, model_type=model_type, architectures=["X"])
    assert repr(model_type) in line
    assert all(family in line for family in TRAINED)


def test_gemma3_with_a_vision_tower_says_only_text_models_are_supported(llama2, chat_data, tmp_path):
    line = _refused(llama2, chat_data, tmp_path, model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                    text_config={"model_type": "gemma3_text", "hidden_size": 64},
                    vision_config={"model_type": "siglip_vision_model"})
    assert "'gemma3'" in line and "vision tower" in line and "only text models" in line


def test_every_default_template_is_a_registry_entry():
    from healer.templates import registry

    for family in families.FAMILIES.values():
        if family.template is not None:
            assert registry.get(family.template).name == family.template


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_default_template_renders_like_the_official_one(name):
    from transformers import AutoTokenizer

    from healer.templates import registry

    model_type, _ = REAL_TOKENIZER_MODELS[name]
    tok = AutoTokenizer.from_pretrained(str(testdata.real_tokenizer(name)))
    entry = registry.get(families.get(model_type).template)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Colour of item 3?"}]
    for prompt in (False, True):
        official = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
        assert entry.render(chat, add_generation_prompt=prompt, bos_token=tok.bos_token or "",
                            eos_token=tok.eos_token) == official
