"""The subcommands: one module each, with `run_command(cfg)`, and the registry that names them.

The registry holds names only: `prefalign <command> --help` builds its parser from the command's config class
(torch-free, `prefalign.config`) and imports the command module, which pulls in the training stack, only to run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    module: str  # the module under prefalign.commands that defines run_command(cfg)
    config: str  # its config class, in prefalign.config
    help: str  # one line for `prefalign --help`
    positional: str | None = None  # a flag that may be given bare, e.g. `prefalign pipeline recipe.yaml`


COMMANDS: dict[str, Command] = {
    "demo": Command("demo", "DemoConfig", "The whole pipeline on a built-in task, with evaluation, plots and a report."),
    "train-tokenizer": Command("train_tokenizer", "TrainTokenizerConfig",
                               "Train a byte-level BPE tokenizer with a ChatML template."),
    "init-model": Command("init_model", "InitModelConfig", "Create a randomly initialised model from a config."),
    "pretrain": Command("pretrain", "PretrainConfig", "Causal-LM pretraining on raw text, packed into blocks."),
    "sft": Command("sft", "SFTConfig", "Supervised fine-tuning on conversations, prompt/completion or text."),
    "rm": Command("rm", "RMConfig", "Train a Bradley-Terry reward model on preference pairs."),
    "dpo": Command("dpo", "DPOConfig", "Direct preference optimisation (and its variants) on preference pairs."),
    "kto": Command("kto", "KTOConfig", "KTO on unpaired thumbs-up/down feedback (preference pairs are unpaired)."),
    "grpo": Command("grpo", "GRPOConfig", "Group relative policy optimisation with reward functions or models."),
    "rloo": Command("rloo", "RLOOConfig", "REINFORCE leave-one-out: GRPO's machinery with a leave-one-out baseline."),
    "ppo": Command("ppo", "PPOConfig", "PPO with a reward model, a value model and GAE."),
    "online-dpo": Command("online_dpo", "OnlineDPOConfig",
                          "Online DPO: pairs sampled from the current policy and judged by rewards, then DPO steps."),
    "distill": Command("distill", "DistillConfig", "On-policy distillation into a student from a teacher (GKD)."),
    "pipeline": Command("pipeline", "PipelineConfig", "Run a YAML list of stages, each stage's output feeding the next.",
                        positional="recipe"),
    "eval": Command("eval", "EvalConfig", "Reward accuracy and margins of a policy on held-out pairs; win rates."),
    "chat": Command("chat", "ChatConfig", "Chat with a model (or LoRA adapter) in the terminal, streamed."),
    "plot": Command("plot", "PlotConfig", "PNG plots of a run's metrics.jsonl.", positional="run_dir"),
    "data inspect": Command("data_inspect", "InspectConfig",
                            "Show how a row is rendered and tokenized, which tokens are scored, and length statistics."),
}


def config_class(name: str) -> type:
    """The config dataclass of command `name` (a cheap import: configs need no torch)."""
    return getattr(importlib.import_module("prefalign.config"), COMMANDS[name].config)


def runner(name: str) -> Callable[[Any], None]:
    """`run_command` of command `name` (imports the command and the training stack behind it)."""
    return importlib.import_module(f"prefalign.commands.{COMMANDS[name].module}").run_command
