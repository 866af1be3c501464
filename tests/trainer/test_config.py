"""TrainConfig: YAML keys = fields = CLI flags; flags override the file; bad settings are one-line errors."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.config import DEFAULT_TARGET_MODULES, ConfigError, TrainConfig, option_specs, resolve_config

REQUIRED = dict(model="m", data="d.jsonl", out="o")


def write(tmp_path, text: str):
    p = tmp_path / "train.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_yaml_sets_fields_and_flags_override_them(tmp_path):
    p = write(tmp_path, "model: m\ndata: d.jsonl\nout: o\nlr: 0.001\nmax_steps: 100\npacking: true\n"
                        "target_modules: [q_proj, v_proj]\n")
    cfg = resolve_config(p, max_steps=7, packing=False, lr=None)
    assert cfg.lr == 0.001  # an unset flag (None) leaves the file's value
    assert cfg.max_steps == 7 and cfg.packing is False
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.batch_size == TrainConfig.batch_size


def test_unknown_yaml_keys_are_one_line_error_naming_them(tmp_path):
    p = write(tmp_path, "model: m\nlearning_rate: 0.1\nlora_rank: 8\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert "unknown setting(s): learning_rate" in msg and "lora_rank (did you mean lora_r?)" in msg


@pytest.mark.parametrize(("text", "match"), [
    ("lr: fast\n", "lr must be a number"),
    ("packing: 1\n", "packing must be true or false"),
    ("batch_size: 2.5\n", "batch_size must be an integer"),
    ("lr_scheduler: step\n", "lr_scheduler must be one of linear, cosine"),
    ("batch_size: 0\n", "batch_size must be at least 1"),
    ("lora_dropout: 1.0\n", r"lora_dropout must be in \[0, 1\)"),
    ("- a\n- b\n", "expected a mapping"),
    ("lr: [\n", r"not valid YAML \(line 5\)"),  # the parser fails at the end of the file
])
def test_bad_values_are_one_line_errors(tmp_path, text, match):
    p = write(tmp_path, "model: m\ndata: d\nout: o\n" + text if not text.startswith("-") else text)
    with pytest.raises(ConfigError, match=match) as e:
        resolve_config(p)
    assert "\n" not in str(e.value)


def test_missing_required_settings_name_the_flags():
    with pytest.raises(ConfigError, match="missing setting.*data, out.*--data --out"):
        resolve_config(model="m")


def test_comma_separated_lists_from_flags():
    cfg = resolve_config(**REQUIRED, target_modules="q_proj, k_proj,v_proj", modules_to_save="embed_tokens")
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj"] and cfg.modules_to_save == ["embed_tokens"]
    assert resolve_config(**REQUIRED).target_modules == list(DEFAULT_TARGET_MODULES)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = resolve_config(**REQUIRED, lr=3e-4, packing=True, max_steps=12, lora_alpha=32)
    again = resolve_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_every_field_is_a_cli_option_of_trainer_run():
    import cli

    params = {p.name: p for p in cli.trainer.commands["run"].params}
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(fields) <= set(params)
    assert set(params) - set(fields) <= {"config_file", "resume_dir", "force", "preview", "as_json", "help"} \
        and "config_file" in params
    assert [s.name for s in option_specs()] == fields
    opts = {o for p in params.values() for o in (*p.opts, *p.secondary_opts)}
    for flag in ("--model", "--data", "--out", "--template", "--max-seq-len", "--batch-size", "--grad-accum",
                 "--lr", "--epochs", "--max-steps", "--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules",
                 "--packing", "--load-in-4bit", "--load-in-16bit", "--seed", "--no-fix-untrained", "--train-on-inputs",
                 "--max-bad-steps", "--use-rslora", "--warmup-steps", "--lr-scheduler", "--max-grad-norm", "--config"):
        assert flag in opts, flag


def test_unset_cli_switches_do_not_override_the_file(tmp_path):
    from click.testing import CliRunner

    import cli

    p = write(tmp_path, "model: m\ndata: d\nout: o\npacking: true\nload_in_4bit: false\n")
    seen = dict(cli.trainer.commands["run"].make_context("run", ["--config", str(p), "--no-fix-untrained"]).params)
    assert seen["packing"] is None and seen["load_in_4bit"] is None and seen["fix_untrained"] is False
    assert seen.pop("resume_dir") is None and seen.pop("force") is False
    assert seen.pop("preview") is None and seen.pop("as_json") is False
    cfg = resolve_config(seen.pop("config_file"), **seen)
    assert cfg.packing is True and cfg.load_in_4bit is False and cfg.fix_untrained is False
    assert CliRunner().invoke(cli.trainer, ["run", "--config", str(p), "--lr", "x"]).exit_code == 2
