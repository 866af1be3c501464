"""Doctor check embeddings.untrained_stop_token: the tokens generation stops at (eos ids of the tokenizer,
config.json and generation_config.json, and the chat template's end of turn) must have trained rows.

Token ids come from transformers' tokenizer; the checkpoints are tiny Llamas with the real Llama 3 tokenizer
and the official Llama 3.1 chat template, whose assistant turns end with <|eot_id|>."""

import json
import shutil
from pathlib import Path

import builders
import torch
from embedding_fixtures import EMBED, LM_HEAD
from safetensors.torch import load_file, save_file

from healer.doctor import Context, all_checks
from healer.embeddings.checks import check_untrained, check_untrained_stop_tokens
from healer.model_dir import ModelDir

CHECK = "embeddings.untrained_stop_token"
EOT = "<|eot_id|>"


def copy_with_zero_rows(src: Path, dst: Path, rows: dict[str, list[int]]) -> Path:
    """A copy of checkpoint `src` whose tensors (by name) have the given rows set to exactly 0."""
    shutil.copytree(src, dst)
    (shard,) = dst.glob("*.safetensors")
    tensors = load_file(str(shard))
    for name, ids in rows.items():
        tensors[name][ids] = 0
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return dst


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def by_id(finding) -> dict[int, dict]:
    return {t["id"]: t for t in finding.details["tokens"]}


def test_stop_token_check_is_registered_with_doctor():
    assert check_untrained_stop_tokens in all_checks()


def test_healthy_checkpoint_gets_no_stop_token_finding(llama3_healthy):
    ckpt = ModelDir(llama3_healthy.path)
    assert check_untrained_stop_tokens(ckpt, Context()) == []


def test_untrained_rows_of_tokens_that_do_not_stop_generation_give_no_stop_token_finding(llama3_healthy, tmp_path):
    reserved = hf_tokenizer(llama3_healthy.path).convert_tokens_to_ids("<|reserved_special_token_5|>")
    model = copy_with_zero_rows(llama3_healthy.path, tmp_path / "m", {EMBED: [reserved], LM_HEAD: [reserved]})
    ckpt = ModelDir(model)
    (untrained,) = check_untrained(ckpt, Context())
    assert untrained.details["first"][0]["id"] == reserved
    assert check_untrained_stop_tokens(ckpt, Context()) == []


def test_zeroed_eos_row_is_reported_although_untrained_rows_leave_eos_out(llama3_healthy, tmp_path):
    eos = hf_tokenizer(llama3_healthy.path).eos_token_id
    model = copy_with_zero_rows(llama3_healthy.path, tmp_path / "m", {EMBED: [eos], LM_HEAD: [eos]})
    ckpt = ModelDir(model)
    assert check_untrained(ckpt, Context()) == []  # by design: eos is a protected row
    (finding,) = check_untrained_stop_tokens(ckpt, Context())
    assert finding.check == CHECK and finding.severity == "warning"
    assert list(by_id(finding)) == [eos]
    token = by_id(finding)[eos]
    assert {"eos", "config.eos_token_id"} <= set(token["stops_as"])
    assert sorted(token["untrained_in"]) == sorted([EMBED, LM_HEAD])
    # healer fix never rewrites the eos row: the advice is to train it
    assert "--modules-to-save embed_tokens,lm_head" in finding.fix


def test_base_model_whose_eos_was_switched_to_an_untrained_eot_is_reported(llama3_healthy, tmp_path):
    eot = hf_tokenizer(llama3_healthy.path).convert_tokens_to_ids(EOT)
    model = copy_with_zero_rows(llama3_healthy.path, tmp_path / "m", {EMBED: [eot], LM_HEAD: [eot]})
    edit_json(model / "tokenizer_config.json", eos_token=EOT)
    edit_json(model / "config.json", eos_token_id=eot)
    assert hf_tokenizer(model).eos_token_id == eot
    ckpt = ModelDir(model)
    assert check_untrained(ckpt, Context()) == []
    (finding,) = check_untrained_stop_tokens(ckpt, Context())
    assert list(by_id(finding)) == [eot]
    assert {"eos", "config.eos_token_id", "template end of turn"} <= set(by_id(finding)[eot]["stops_as"])


def test_untrained_end_of_turn_in_generation_config_is_reported_with_the_fix_command(llama3_healthy, tmp_path):
    tok = hf_tokenizer(llama3_healthy.path)
    eot = tok.convert_tokens_to_ids(EOT)
    model = copy_with_zero_rows(llama3_healthy.path, tmp_path / "m", {EMBED: [eot], LM_HEAD: [eot]})
    edit_json(model / "generation_config.json", eos_token_id=[tok.eos_token_id, eot])
    (finding,) = check_untrained_stop_tokens(ModelDir(model), Context())
    assert list(by_id(finding)) == [eot]
    assert set(by_id(finding)[eot]["stops_as"]) == {"generation_config.eos_token_id", "template end of turn"}
    # not a protected row: embeddings.untrained reports it too, and healer fix repairs it
    assert eot in [d["id"] for d in check_untrained(ModelDir(model), Context())[0].details["template"]]
    assert finding.fix.startswith(f"healer fix {model}")


def test_end_of_turn_with_only_its_lm_head_row_zeroed_is_reported(llama3_healthy, tmp_path):
    eot = hf_tokenizer(llama3_healthy.path).convert_tokens_to_ids(EOT)
    model = copy_with_zero_rows(llama3_healthy.path, tmp_path / "m", {LM_HEAD: [eot]})
    ckpt = ModelDir(model)
    assert torch.count_nonzero(load_file(str(next(model.glob("*.safetensors"))))[EMBED][eot]) > 0
    (finding,) = check_untrained_stop_tokens(ckpt, Context())
    assert by_id(finding)[eot]["stops_as"] == ["template end of turn"]
    assert by_id(finding)[eot]["untrained_in"] == [LM_HEAD]
    # its embedding row is trained, so it is no untrained row healer fix would repair
    assert "--modules-to-save" in finding.fix


def test_tied_checkpoint_without_tokenizer_is_checked_on_the_embedding_by_config_ids(tmp_path):
    builders.save_tiny_model(tmp_path, "llama", 300, tie_word_embeddings=True, eos_token_id=2)
    (shard,) = tmp_path.glob("*.safetensors")
    tensors = load_file(str(shard))
    tensors[EMBED][2] = 0
    save_file(tensors, str(shard), metadata={"format": "pt"})
    naming_eos = [f"{name}.eos_token_id" for name in ("config", "generation_config")
                  if json.loads((tmp_path / f"{name}.json").read_text()).get("eos_token_id") == 2]
    (finding,) = check_untrained_stop_tokens(ModelDir(tmp_path), Context())
    assert finding.details["tokens"] == [{"id": 2, "token": None, "stops_as": naming_eos, "untrained_in": [EMBED]}]
