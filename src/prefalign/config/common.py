"""The groups every training command shares: the model, the data, the training loop.

Configs are flat, as TRL's are, so that `--beta` and `beta:` mean the same thing everywhere. Each command's
config is a dataclass composed from these groups plus its own knobs (`config.preference`, `config.causal_lm`,
`config.rollout`, `config.tools`). The attribute docstrings are the only source of help text (`config.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelSource:
    """Which model (and tokenizer) a command reads."""

    model_name_or_path: str | None = None
    """Policy to train: a local directory in Hugging Face format, a hub id, or a GGUF checkpoint (a .gguf file, or a
    directory holding exactly one; its weights are dequantized to --dtype)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer to use (default: the policy's own); a .gguf file works too."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint to run. Off by default: only enable it for checkpoints you trust."""


@dataclass
class LoadArgs(ModelSource):
    """How a model's weights are loaded."""

    attn_implementation: str | None = None
    """Attention kernel passed to transformers: eager, sdpa, flash_attention_2, ... (default: transformers' choice)."""
    dtype: str = "float32"
    """Dtype the weights are loaded in: float32, bfloat16, float16 or auto. Use --bf16/--fp16 for mixed precision."""


@dataclass
class LoraArgs:
    """A fresh LoRA adapter instead of full weights."""

    use_peft: bool = False
    """Train a LoRA adapter instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] | None = None
    """Modules that get adapters (default: every linear layer except the LM head)."""
    merge_adapter: bool = False
    """With --use_peft: also save the adapter merged into full weights (output_dir/merged); with --load_in_4bit into
    a float32 copy of the base dequantized from its 4-bit weights."""


@dataclass
class QuantArgs:
    """QLoRA: a 4-bit base under a LoRA adapter."""

    load_in_4bit: bool = False
    """QLoRA: load the base model 4-bit quantized with bitsandbytes and train a LoRA adapter on it (CPU with
    bitsandbytes >= 0.49, or a CUDA GPU; computes in float32 on CPU, bfloat16 on GPU)."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type of --load_in_4bit: nf4 or fp4."""
    use_bnb_nested_quant: bool = False
    """Double quantization with --load_in_4bit: the quantization constants are quantized too (saves ~0.4 bit per
    weight)."""


@dataclass
class ModelArgs(QuantArgs, LoraArgs, LoadArgs):
    """The causal LM a training command trains: how it is loaded and adapted."""

    peft_adapter_path: str | None = None
    """Continue from an existing LoRA adapter (e.g. an SFT adapter): it is loaded as the trainable policy adapter and,
    frozen, as the reference adapter, in one base model."""
    ignore_adapter_base: bool = False
    """Load --peft_adapter_path onto --model_name_or_path even though its adapter_config.json names another base
    model (refused otherwise); the output records the base really used."""
    freeze_vision_tower: bool = True
    """Vision-language models: keep the vision encoder's weights fixed, so LoRA adapts the language model only and full
    fine-tuning leaves the encoder as it was; false trains it too."""


@dataclass
class ReferenceArgs:
    """The reference a policy is held close to (DPO and the on-policy stages)."""

    ref_model_name_or_path: str | None = None
    """Reference model, in any form --model_name_or_path takes (default: a frozen copy of the initial policy; with
    --use_peft, the base with the adapter disabled)."""


@dataclass
class PolicyArgs(ReferenceArgs, ModelArgs):
    """A policy trained against a reference."""


@dataclass
class DatasetSource:
    """One dataset: a local file or directory, or a hub id."""

    dataset_name: str | None = None
    """Training data: a .jsonl/.json/.parquet/.csv file, a directory of them, or a hub dataset id."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset."""
    dataset_split: str = "train"
    """Split of --dataset_name to train on."""


@dataclass
class RowFilter:
    skip_invalid_rows: bool = False
    """Skip malformed rows (and report how many) instead of stopping at the first one."""


@dataclass
class DatasetArgs(RowFilter, DatasetSource):
    """Where a training command's rows come from: training and evaluation data."""

    eval_dataset_name: str | None = None
    """Evaluation data, in any form --dataset_name accepts."""
    eval_dataset_config: str | None = None
    """Configuration name of the evaluation hub dataset."""
    eval_dataset_split: str = "test"
    """Split of --eval_dataset_name to evaluate on."""
    eval_split_ratio: float = 0.0
    """Hold out this fraction of the training rows for evaluation (when no --eval_dataset_name is given)."""


@dataclass
class PromptArgs:
    """How prompts are read and rendered."""

    prompt_column: str = "prompt"
    """Column holding the prompt."""
    prompt_template: str | None = None
    """Format string applied to string prompts: {prompt} is the prompt, any other {name} the row's column of that
    name. Newlines must be real: in a shell $'Question: {prompt}\\n\\nAnswer: ' (in double quotes \\n stays a
    backslash and an n), in YAML "Question: {prompt}\\n\\nAnswer: "."""
    system_prompt: str | None = None
    """System message added to conversations that have none."""
    chat_template: str | None = None
    """Chat template: a built-in name (chatml, llama3, mistral, gemma, phi3, deepseek, plain) or a .jinja file
    (default: the tokenizer's own)."""


@dataclass
class PairArgs:
    """The two answers of a preference pair."""

    chosen_column: str = "chosen"
    """Column holding the preferred answer (or the whole preferred conversation)."""
    rejected_column: str = "rejected"
    """Column holding the dispreferred answer (or the whole dispreferred conversation)."""


@dataclass
class LengthArgs:
    """The length limits of prompt + completion sequences (see data.tokenize.Truncation)."""

    max_length: int | None = 1024
    """Longest prompt + completion in tokens; longer pairs are truncated."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens; longer prompts are truncated per --truncation_mode."""
    max_completion_length: int | None = None
    """Longest completion in tokens; longer completions lose their end."""
    truncation_mode: str = "keep_end"
    """How an over-long prompt is cut: keep_end keeps its end (drops the oldest context), keep_start its start."""


@dataclass
class PairData(LengthArgs, PairArgs, PromptArgs, DatasetSource):
    """One file of preference pairs as it is read and tokenized: prompt, the two answers and the length limits."""


@dataclass
class DataArgs(PairData, DatasetArgs):
    """Preference data of a training command: PairData plus evaluation data and invalid rows."""


@dataclass
class TrainArgs:
    output_dir: str | None = None
    """Where the model, metrics.jsonl and checkpoints go."""
    overwrite_output_dir: bool = False
    """Replace an earlier run in output_dir: what it wrote is moved aside when training starts and deleted after this
    run's first save."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    per_device_train_batch_size: int = 8
    """Examples (pairs, for preference stages) per micro-batch on each device."""
    per_device_eval_batch_size: int = 8
    """Examples per evaluation batch on each device."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""
    num_train_epochs: float = 1.0
    """Passes over the training data (ignored when --max_steps > 0)."""
    max_steps: int = -1
    """Total optimizer steps; overrides --num_train_epochs when positive."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule: linear, cosine, constant, constant_with_warmup or cosine_with_min_lr (MiniMind's
    cosine that ends at --min_lr_rate x the peak)."""
    min_lr_rate: float = 0.1
    """Final learning rate of cosine_with_min_lr, as a fraction of the peak."""
    warmup_steps: int = 0
    """Linear warmup steps (takes precedence over --warmup_ratio)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    optim: str = "adamw_torch_fused"
    """The optimizer: adamw_torch_fused (AdamW as one fused kernel over all parameters, transformers' default) or
    adamw_torch (the same update in torch's per-tensor loop; 5x slower on CPU for a 20M-parameter model)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    logging_steps: int = 10
    """Log metrics every this many optimizer steps."""
    save_steps: int = 500
    """Save a resumable checkpoint every this many steps (0 disables)."""
    save_total_limit: int | None = None
    """Keep only the newest this many checkpoints; unset or 0 keeps them all (as in transformers)."""
    eval_steps: int | None = None
    """Evaluate every this many steps (default: only at the end, when there is evaluation data)."""
    seed: int = 42
    """Random seed for initialisation, shuffling and dropout; the same seed repeats a run exactly."""
    bf16: bool = False
    """Mixed precision with bfloat16 autocast."""
    fp16: bool = False
    """Mixed precision with float16 autocast and loss scaling (GPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    deepspeed: str | None = None
    """Train with DeepSpeed ZeRO: a DeepSpeed config JSON file, or zero2, zero3, zero3_offload (prefalign's presets).
    Launch the processes with torchrun or accelerate launch; an accelerate config with distributed_type DEEPSPEED
    works without this flag."""
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Where metrics also go besides metrics.jsonl: none, tensorboard, wandb."""
    resume_from_checkpoint: str | None = None
    """Continue from a checkpoint directory, or "latest" for the newest complete one in output_dir."""
    ignore_data_skip: bool = False
    """When resuming with other data, batch size, seed or length settings than the checkpoint's (refused otherwise):
    keep its weights, optimizer and step, and start the data from its beginning."""
    disable_tqdm: bool = False
    """Hide the progress bar."""
