"""`prefalign <command> [flags]`: each command maps its flags onto a typed config and calls one run function.

A PrefalignError (bad input, bad flag, missing model) is printed as one line on stderr with exit code 2;
Ctrl-C exits with 130 after the loop has saved a resumable checkpoint.
"""

from __future__ import annotations

import importlib
import os
import sys

from prefalign.errors import PrefalignError

# name -> (module, one-line help). Each module defines CONFIG (a dataclass) and run_command(cfg). Modules are
# imported only for the command being run, so `prefalign --help` stays instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("prefalign.demo.pipeline", "The whole pipeline on a built-in task, with evaluation, plots and a report."),
    "train-tokenizer": ("prefalign.tokenizer_command", "Train a byte-level BPE tokenizer with a ChatML template."),
    "init-model": ("prefalign.model.init_command", "Create a randomly initialised model from a config."),
    "pretrain": ("prefalign.train.pretrain", "Causal-LM pretraining on raw text, packed into blocks."),
    "sft": ("prefalign.train.sft", "Supervised fine-tuning on conversations, prompt/completion or text."),
    "rm": ("prefalign.train.rm", "Train a Bradley-Terry reward model on preference pairs."),
    "dpo": ("prefalign.train.dpo", "Direct preference optimisation (and its variants) on preference pairs."),
    "grpo": ("prefalign.train.grpo", "Group relative policy optimisation with reward functions or models."),
    "rloo": ("prefalign.train.rloo", "REINFORCE leave-one-out: GRPO's machinery with a leave-one-out baseline."),
    "ppo": ("prefalign.train.ppo", "PPO with a reward model, a value model and GAE."),
    "pipeline": ("prefalign.pipeline", "Run a YAML list of stages, each stage's output feeding the next."),
    "eval": ("prefalign.evaluate", "Reward accuracy and margins of a policy on held-out pairs; win rates."),
    "chat": ("prefalign.chat_command", "Chat with a model (or LoRA adapter) in the terminal, streamed."),
    "plot": ("prefalign.plots", "PNG plots of a run's metrics.jsonl."),
    "data inspect": ("prefalign.data.inspect_command",
                     "Show how a row is rendered and tokenized, which tokens are scored, and length statistics."),
}


def _usage() -> str:
    lines = ["usage: prefalign <command> [flags]   (prefalign <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<18} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    for width in (2, 1):
        name = " ".join(argv[:width])
        if name in COMMANDS:
            return name, argv[width:]
    return None, argv


def _quiet_libraries() -> None:
    """Our own errors are one line each; library chatter (datasets' failed-load log, weight-loading bars) is not."""
    import datasets
    import transformers

    # datasets logs a failed JSON parse at ERROR level before raising; our own error names the file and line.
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from prefalign.argparsing import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = _split_command(argv)
    if name is None:
        print(f"prefalign: error: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, text = COMMANDS[name]
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            raise PrefalignError("this command is not available in this version") from None
        positional = getattr(module, "POSITIONAL", None)  # e.g. `prefalign pipeline recipe.yaml`
        if positional and rest and not rest[0].startswith("-"):
            rest = [f"--{positional}", rest[0], *rest[1:]]
        cfg = parse_config(module.CONFIG, rest, prog=f"prefalign {name}", description=text)
        _quiet_libraries()
        module.run_command(cfg)
    except PrefalignError as e:
        print(f"prefalign {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefalign: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
