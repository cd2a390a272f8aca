"""Flags and YAML map onto the typed configs; help comes from attribute docstrings; bad values are one-line errors."""

from __future__ import annotations

import pytest

from prefalign.argparsing import build_parser, parse_config
from prefalign.config import DPOConfig, field_help
from prefalign.errors import PrefalignError


def test_help_text_comes_from_attribute_docstrings():
    helps = field_help(DPOConfig)
    assert helps["beta"].startswith("Strength of the KL constraint")
    # DPOConfig overrides learning_rate's default and its docstring wins over TrainArgs'.
    assert "TRL's DPO default" in helps["learning_rate"]
    text = build_parser(DPOConfig, "prefalign dpo").format_help()
    assert "--per_device_train_batch_size" in text and "Micro-batches accumulated" in text


def test_flags_types_and_booleans():
    cfg = parse_config(DPOConfig, ["--beta", "0.2", "--max_steps", "7", "--use_peft", "--bf16", "false",
                                   "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5"], "dpo")
    assert cfg.beta == 0.2 and cfg.max_steps == 7
    assert cfg.use_peft is True and cfg.bf16 is False
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]
    assert cfg.learning_rate == 1e-6  # DPO's own default


def test_yaml_then_command_line_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("beta: 0.3\nmax_steps: 5\nloss_type: [ipo]\nuse_peft: true\n")
    cfg = parse_config(DPOConfig, ["--config", str(y), "--max_steps", "9"], "dpo")
    assert (cfg.beta, cfg.max_steps, cfg.loss_type, cfg.use_peft) == (0.3, 9, ["ipo"], True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beta", "abc"], "--beta: expected a number, got 'abc'"),
        (["--max_steps", "1.5"], "--max_steps: expected an integer"),
        (["--use_peft", "maybe"], "--use_peft: expected true or false"),
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    ],
)
def test_bad_values_are_one_line_errors(argv, message):
    with pytest.raises(PrefalignError) as e:
        parse_config(DPOConfig, argv, "prefalign dpo")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_yaml_errors_name_file_and_key(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("betta: 0.1\n")
    with pytest.raises(PrefalignError, match=r"bad.yaml key 'betta': unknown option"):
        parse_config(DPOConfig, ["--config", str(y)], "dpo")
    y.write_text("beta: [1, 2\n")
    with pytest.raises(PrefalignError, match=r"bad.yaml:\d+: invalid YAML"):
        parse_config(DPOConfig, ["--config", str(y)], "dpo")
    y.write_text("beta: high\n")
    with pytest.raises(PrefalignError, match="key 'beta': expected a number"):
        parse_config(DPOConfig, ["--config", str(y)], "dpo")


def test_flag_prefixes_are_not_abbreviations():
    """argparse would take --learning_rat for --learning_rate; a typo must never set another flag."""
    with pytest.raises(PrefalignError) as e:
        parse_config(DPOConfig, ["--learning_rat", "1e-3"], "prefalign dpo")
    assert str(e.value) == "unrecognized arguments: --learning_rat 1e-3"
    assert parse_config(DPOConfig, ["--learning_rate", "1e-3"], "dpo").learning_rate == 1e-3


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_numbers_must_be_finite(value, tmp_path):
    with pytest.raises(PrefalignError) as e:
        parse_config(DPOConfig, [f"--learning_rate={value}"], "prefalign dpo")
    assert str(e.value) == f"--learning_rate: expected a finite number, got '{value}'"
    y = tmp_path / "run.yaml"
    y.write_text("beta: .nan\n")  # YAML's own spelling of nan
    with pytest.raises(PrefalignError, match=r"run.yaml key 'beta': expected a finite number, got nan"):
        parse_config(DPOConfig, ["--config", str(y)], "dpo")


def test_yaml_with_a_repeated_key_is_refused(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("beta: 0.1\nmax_steps: 3\nbeta: 0.5\n")
    with pytest.raises(PrefalignError) as e:
        parse_config(DPOConfig, ["--config", str(y)], "dpo")
    assert str(e.value) == f"{y}:3: invalid YAML (duplicate key 'beta' (first on line 1))"


@pytest.mark.parametrize("yaml_value", ["[sigmoid, ipo]", "sigmoid, ipo", "sigmoid ipo", "'sigmoid,ipo'",
                                        "' sigmoid ,  ipo '"])
def test_list_flags_take_a_yaml_list_or_a_comma_or_space_separated_string(tmp_path, yaml_value):
    y = tmp_path / "run.yaml"
    y.write_text(f"loss_type: {yaml_value}\nloss_weights: 1.0, 0.5\n")
    cfg = parse_config(DPOConfig, ["--config", str(y)], "dpo")
    assert cfg.loss_type == ["sigmoid", "ipo"] and cfg.loss_weights == [1.0, 0.5]
    assert parse_config(DPOConfig, ["--loss_type", "sigmoid,ipo"], "dpo").loss_type == ["sigmoid", "ipo"]


def test_reward_function_specs_are_never_split(tmp_path):
    """A regex may hold commas and spaces: a YAML string is one spec, a list is taken item by item."""
    from prefalign.config import GRPOConfig

    y = tmp_path / "run.yaml"
    y.write_text("reward_funcs: 'regex:^a, b c$'\n")
    assert parse_config(GRPOConfig, ["--config", str(y)], "grpo").reward_funcs == ["regex:^a, b c$"]
    y.write_text("reward_funcs: ['regex:x, y', length:3]\n")
    assert parse_config(GRPOConfig, ["--config", str(y)], "grpo").reward_funcs == ["regex:x, y", "length:3"]
    argv = ["--reward_funcs", "regex:a b", "length:3"]
    assert parse_config(GRPOConfig, argv, "grpo").reward_funcs == ["regex:a b", "length:3"]
