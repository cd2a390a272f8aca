"""Configs of the on-policy stages: sampling, rewards, and GRPO / RLOO / PPO / online DPO on top of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefalign.config.common import DatasetArgs, PolicyArgs, PromptArgs, TrainArgs
from prefalign.config.preference import PreferenceLossArgs


@dataclass
class GenerationArgs:
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int | None = None
    """Keep only the k most likely tokens when sampling (default: no limit)."""
    mask_truncated_completions: bool = False
    """Completions that hit --max_completion_length without EOS add no loss (DAPO)."""
    use_vllm: bool = False
    """Generate with vLLM (GPU only; needs the vllm package)."""
    disable_dropout: bool = True
    """Switch dropout off in the policy, so that rollouts and updates see the same function."""


@dataclass
class RewardArgs:
    # a YAML string here is one spec: a regex may hold commas and spaces
    reward_funcs: list[str] = field(default_factory=list, metadata={"verbatim_items": True})
    """Reward functions: exact_match, exact_match:number, regex:PATTERN, length:N, module:function or
    file.py:function (called as fn(prompts=..., completions=..., **dataset_columns) -> list[float | None])."""
    reward_weights: list[float] | None = None
    """Weight of each reward (functions first, then the reward model); default 1 each."""
    reward_model_name_or_path: str | None = None
    """A sequence-classification reward model (e.g. from `prefalign rm`) scoring prompt + completion."""
    reward_chat_template: str | None = None
    """Chat template the reward model renders conversational prompts with: a built-in name or a .jinja file
    (default: the reward tokenizer's own; needed when it has none)."""


@dataclass
class GroupArgs:
    """What GRPO and RLOO share: groups of completions per prompt, reused for several clipped steps."""

    num_generations: int = 8
    """Completions sampled per prompt: the group whose rewards are compared."""
    epsilon: float = 0.2
    """Lower clipping bound of the importance ratio: 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clipping bound 1 + epsilon_high (DAPO's clip-higher; default: epsilon); cispo's cap on the ratio."""
    num_iterations: int = 1
    """Optimizer steps on each rollout (μ of the GRPO paper); > 1 computes old-policy log-probs."""
    share_prompt: bool = True
    """Run each group's prompt once in the training forwards (policy, old-policy and reference log-probs), its
    completions attending to it in one packed row (falls back to padded rows where unsupported)."""


@dataclass
class GRPOArgs:
    beta: float = 0.0
    """Weight of the per-token k3 KL to the reference in the loss; 0 loads no reference."""
    use_bias_correction_kl: bool = True
    """Multiply the k3 KL by the importance ratio (with its gradient), as TRL does by default."""
    loss_type: str = "dapo"
    """grpo (token mean per completion, then over completions), bnpo, dr_grpo (divide by max_completion_length),
    dapo (over every token of the step), luspo (token sum per completion), cispo (REINFORCE with the ratio capped at
    epsilon_high), sapo (soft gate instead of clipping) or vespo (REINFORCE scaled by a gamma weight of the ratio)."""
    scale_rewards: str = "group"
    """Divide advantages by the std of the group, of the whole batch, or none (Dr. GRPO)."""
    delta: float | None = None
    """Also cap the ratio at delta in the unclipped term (two-sided clipping); must be > 1 + epsilon_high."""
    importance_sampling_level: str = "token"
    """Importance ratio per token, or per sequence from the mean token log-ratio (GSPO)."""
    top_entropy_quantile: float = 1.0
    """Train only on the completion tokens in this top fraction of entropy (0.2 = the "80/20" paper)."""
    sapo_temperature_pos: float = 1.0
    """sapo: temperature of the soft gate for positive advantages."""
    sapo_temperature_neg: float = 1.05
    """sapo: temperature of the soft gate for negative advantages."""
    vespo_k_pos: float = 2.0
    """vespo: shape k of the gamma weight for non-negative advantages."""
    vespo_lambda_pos: float = 3.0
    """vespo: rate lambda of the gamma weight for non-negative advantages."""
    vespo_k_neg: float = 3.0
    """vespo: shape k of the gamma weight for negative advantages."""
    vespo_lambda_neg: float = 2.0
    """vespo: rate lambda of the gamma weight for negative advantages."""


@dataclass
class OnPolicyArgs(RewardArgs, GenerationArgs, TrainArgs, PromptArgs, DatasetArgs, PolicyArgs):
    """What every on-policy command shares: prompts, sampling, rewards and the training loop."""

    per_device_eval_batch_size: int = 8
    """Prompts per evaluation batch (one sampled completion each)."""
    max_prompt_length: int | None = 512
    """Longest prompt in tokens; longer prompts are cut per --truncation_mode."""
    max_completion_length: int | None = 512
    """Most tokens sampled per completion (TRL's default)."""
    truncation_mode: str = "keep_end"
    """How an over-long prompt is cut: keep_end keeps its end (the question), keep_start its start."""


@dataclass
class GRPOConfig(GRPOArgs, GroupArgs, OnPolicyArgs):
    """Configuration of `prefalign grpo`."""

    learning_rate: float = 1e-6
    """Peak learning rate of AdamW (TRL's GRPO default)."""
    per_device_train_batch_size: int = 8
    """Completions (prompts x generations) per micro-batch on each device."""


@dataclass
class RLOOArgs:
    beta: float = 0.05
    """Weight of the KL penalty (k1, summed over the completion) subtracted from each reward; 0 loads no reference."""
    normalize_advantages: bool = False
    """Standardise the leave-one-out advantages over the batch."""
    reward_clip_range: list[float] | None = None
    """Clip each reward to [low, high] (two numbers) before the KL penalty."""


@dataclass
class RLOOConfig(RLOOArgs, GroupArgs, OnPolicyArgs):
    """Configuration of `prefalign rloo`."""

    learning_rate: float = 1e-6
    """Peak learning rate of AdamW (TRL's RLOO default)."""
    per_device_train_batch_size: int = 8
    """Completions (prompts x generations) per micro-batch on each device."""
    num_generations: int = 2
    """Completions sampled per prompt (the leave-one-out group; TRL's RLOO default)."""


@dataclass
class PPOArgs:
    value_model_name_or_path: str | None = None
    """Value model, a sequence-classification checkpoint (default: initialised from the reward model)."""
    shared_value_head: bool = False
    """Use a linear value head on the policy's backbone instead of a separate value model."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty in the reward."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 (log-ratio) or k3 (always non-negative)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that reach --max_completion_length without EOS."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """Lambda of GAE (bias/variance trade-off of the advantage estimate)."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance over the rollout before GAE."""
    cliprange: float = 0.2
    """Clipping range of the policy ratio."""
    cliprange_value: float = 0.2
    """Clipping range of the value update around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    num_ppo_epochs: int = 4
    """Passes over each rollout."""
    num_mini_batches: int = 1
    """Mini-batches per pass over a rollout, one optimizer step each (a rollout is this many times B x A x
    processes prompts; TRL's experimental PPO takes one step per pass instead)."""


@dataclass
class PPOConfig(PPOArgs, OnPolicyArgs):
    """Configuration of `prefalign ppo`."""

    learning_rate: float = 3e-6
    """Peak learning rate of AdamW (TRL's PPO default)."""
    per_device_train_batch_size: int = 8
    """Prompts (one completion each) per micro-batch on each device."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are computed at the same temperature (TRL's PPO default)."""
    max_completion_length: int | None = 53
    """Most tokens sampled per completion (TRL's response_length)."""


@dataclass
class OnlineDPOArgs:
    num_generations: int = 2
    """Completions sampled per prompt; the best and the worst by score form its (chosen, rejected) pair (TRL: 2)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that reach --max_completion_length without EOS, before the pair is
    chosen (TRL's OnlineDPO option)."""
    share_prompt: bool = True
    """Run each pair's prompt once in the training forwards (policy and reference log-probs), its two completions
    attending to it in one packed row (falls back to padded rows where unsupported)."""


@dataclass
class OnlineDPOConfig(OnlineDPOArgs, PreferenceLossArgs, OnPolicyArgs):
    """Configuration of `prefalign online-dpo`."""

    learning_rate: float = 5e-7
    """Peak learning rate of AdamW (TRL's OnlineDPO default)."""
    per_device_train_batch_size: int = 8
    """Prompts per micro-batch on each device; each is sampled --num_generations times and gives one pair."""
    temperature: float = 0.9
    """Sampling temperature (TRL's OnlineDPO default); the DPO log-probs are the model's own (temperature 1)."""
    max_completion_length: int | None = 64
    """Most tokens sampled per completion (TRL's max_new_tokens)."""
