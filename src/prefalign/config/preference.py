"""Configs of the offline preference stages: DPO (and its variants), KTO on unpaired feedback, and the Bradley-Terry
reward model."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefalign.config.common import DataArgs, LoadArgs, LoraArgs, PolicyArgs, QuantArgs, TrainArgs


@dataclass
class PreferenceLossArgs:
    """The preference losses and how they read log-probs: what `stages.dpo.preference_objective` resolves (dpo and
    online-dpo)."""

    beta: float = 0.1
    """Strength of the KL constraint to the reference (temperature of the implicit reward)."""
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """One or more preference losses: sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
    aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, simpo, orpo, cpo."""
    loss_weights: list[float] | None = None
    """Weights of the losses in --loss_type (default: 1 each), as in MPO."""
    label_smoothing: float = 0.0
    """Probability that a label is flipped (conservative DPO, robust DPO)."""
    simpo_gamma: float = 0.5
    """Target reward margin of SimPO."""
    cpo_alpha: float = 1.0
    """Weight of the NLL term of CPO."""
    discopop_tau: float = 0.05
    """Temperature of the DiscoPOP log-ratio modulation."""
    rpo_alpha: float | None = None
    """Add rpo_alpha x NLL of the chosen answer (RPO)."""
    dpop_lambda: float | None = None
    """DPO-Positive (Smaug): subtract dpop_lambda x max(0, ref logp(chosen) - logp(chosen)) from the chosen
    log-ratio the loss reads, so that with sigmoid the loss is -log sigmoid(beta x (margin - penalty)) (paper Eq. 3)."""
    length_normalize: bool = False
    """Use the mean instead of the sum of completion-token log-probs (MiniMind's DPO)."""
    f_divergence_type: str = "reverse_kl"
    """Divergence of f-DPO: reverse_kl, forward_kl, js_divergence or alpha_divergence."""
    f_alpha_divergence_coef: float = 0.5
    """Alpha of the alpha divergence (TRL's default 0.5; 1.0 is the reverse KL, i.e. plain DPO)."""
    use_weighting: bool = False
    """Weight pairs by their policy probability (WPO)."""
    ld_alpha: float | None = None
    """LD-DPO: tokens past the shorter completion's length count with this weight."""


@dataclass
class DPOArgs(PreferenceLossArgs):
    disable_dropout: bool = True
    """Turn dropout off in the policy (and reference), as TRL does, so that before the first update policy and
    reference agree exactly and the implicit rewards are not noise."""
    precompute_ref_log_probs: bool = False
    """Compute reference log-probs in one pass before training and cache them on disk."""
    padding_free: bool = True
    """Pack pairs without padding into micro-batches (falls back to padding where unsupported)."""
    share_prompt: bool = True
    """Run each pair's prompt once for both completions (falls back where unsupported)."""
    max_tokens_per_batch: int | None = None
    """Pack micro-batches by this token budget instead of --per_device_train_batch_size pairs (a pair is never split).
    Default: none, so a micro-batch holds the same pairs as the padded path and the update is the same."""


@dataclass
class RefSyncArgs:
    """TR-DPO: move the reference towards the policy during training (TRL's SyncRefModelCallback)."""

    sync_ref_model: bool = False
    """Every --ref_model_sync_steps optimizer steps set reference = alpha x policy + (1 - alpha) x reference (TR-DPO).
    Needs a separate reference model (not with LoRA or precomputed reference log-probs)."""
    ref_model_mixup_alpha: float = 0.6
    """Alpha of the reference update (1 = copy the policy)."""
    ref_model_sync_steps: int = 512
    """Optimizer steps between two reference updates."""


@dataclass
class DPOConfig(DPOArgs, RefSyncArgs, TrainArgs, DataArgs, PolicyArgs):
    """Configuration of `prefalign dpo`."""

    learning_rate: float = 1e-6
    """Peak learning rate of AdamW (TRL's DPO default)."""


@dataclass
class UnpairedArgs:
    """The columns of unpaired (thumbs-up/down) feedback."""

    completion_column: str = "completion"
    """Column holding the completion of unpaired rows."""
    label_column: str = "label"
    """Column holding the label of unpaired rows: true/false, 1/0/-1, or up/down, thumbs_up/thumbs_down, good/bad, ...
    Rows without it that have the chosen/rejected columns are preference pairs, unpaired (chosen desirable)."""


@dataclass
class KTOArgs:
    loss_type: str = "kto"
    """kto (KTO), apo_zero_unpaired (APO-zero on unpaired data) or bco (BCO, with a running reward shift)."""
    beta: float = 0.1
    """Temperature of the implicit reward beta x (log pi - log pi_ref)."""
    desirable_weight: float = 1.0
    """Weight of the desirable (thumbs-up) examples' losses."""
    undesirable_weight: float = 1.0
    """Weight of the undesirable (thumbs-down) examples' losses."""
    disable_dropout: bool = True
    """Turn dropout off in the policy (and reference), as TRL does."""
    precompute_ref_log_probs: bool = False
    """Compute reference log-probs (of the completions and of the KL pairs) before training and cache them on disk."""
    padding_free: bool = True
    """Pack each micro-batch into one row without padding; the reference scores completion and KL completion with
    one pass over their shared prompt (falls back to padding where unsupported)."""
    train_sampling_strategy: str = "random"
    """Order of the training examples: random (shuffled every epoch, seeded) or sequential (file order, as TRL's
    KTOTrainer)."""


@dataclass
class KTOConfig(KTOArgs, RefSyncArgs, UnpairedArgs, TrainArgs, DataArgs, PolicyArgs):
    """Configuration of `prefalign kto`."""

    learning_rate: float = 1e-6
    """Peak learning rate of AdamW (TRL's KTO default)."""


@dataclass
class RMArgs:
    center_rewards_coefficient: float | None = None
    """Add this x (r_chosen + r_rejected)^2 to the loss, so that rewards stay centred on 0."""


@dataclass
class RMConfig(RMArgs, TrainArgs, DataArgs, QuantArgs, LoraArgs, LoadArgs):
    """Configuration of `prefalign rm` (no reference; LoRA or QLoRA on the body, the score head trained in full; no
    continued adapter for reward models yet)."""

    learning_rate: float = 1e-4
    """Peak learning rate of AdamW (TRL's RewardConfig default)."""
