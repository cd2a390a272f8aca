"""Our GRPO and RLOO objectives against TRL 1.16's own code on identical tensors: values, gradients and metrics.

TRL computes these inside trainer methods (`GRPOTrainer._compute_loss`, `RLOOTrainer._compute_loss`,
`RLOOTrainer._generate_and_score_completions`), so each is called unbound with a `SimpleNamespace` standing in
for the trainer: the real TRL config (so every default is TRL's), a real `Accelerator`, and the attributes the
trainer's `__init__` derives from the config. The model forward is replaced by a function returning the per-token
log-probs we choose (a leaf tensor, so d loss / d log-prob is read back); generation and reward functions are
replaced by the completions and rewards we choose. TRL's log-probs at padding are 0, as ours are.

One process, gradient accumulation 1, steps_per_generation 1: the conditions under which TRL's per-micro-batch
values are our per-step values (docs: README, "Where we differ from TRL").
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict, deque
from types import MethodType, SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from accelerate import Accelerator  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.rloo_trainer import RLOOTrainer  # noqa: E402

from prefalign.config import DPOArgs, GRPOConfig, RLOOConfig  # noqa: E402
from prefalign.losses.grpo import grpo_loss, rloo_loss  # noqa: E402
from prefalign.rollout.generate import completion_mask_from_eos, mask_truncated_completions  # noqa: E402
from prefalign.rollout.rewards import combine_rewards  # noqa: E402
from prefalign.rollout.sampling import CompletionGroups, completion_metrics  # noqa: E402
from prefalign.stages.grpo import policy_loss_params  # noqa: E402
from prefalign.stages.rloo import RLOO  # noqa: E402
from prefalign.stages.rollout import ScoredRollout  # noqa: E402

ATOL = 1e-6


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trl"))


def trl_config(cls, out_dir, **overrides):
    return cls(output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
               num_generations=2, **overrides)


class StubForward:
    """Stands in for `_get_per_token_logps_and_entropies`: preset (log-probs, entropies) per model object."""

    def __init__(self) -> None:
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
                 **_):
        logps, entropies = self.outputs[id(model)]
        return logps, (entropies if compute_entropy else None), None


def new_state():
    return {"_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
            "model": SimpleNamespace(training=True, is_gradient_checkpointing=False),
            # after building the config: TrainingArguments resets the accelerate state an older Accelerator reads
            "accelerator": Accelerator(cpu=True), "_get_per_token_logps_and_entropies": StubForward(),
            "current_gradient_accumulation_steps": 1, "aux_loss_enabled": False}


def last_metrics(ns) -> dict[str, float]:
    return {k: v[-1] for k, v in ns._metrics["train"].items()}


# ------------------------------------------------------------------------------------------ GRPO's loss


def trl_grpo_loss(args, logps, entropies, mask, advantages, old=None, ref=None):
    """(loss, d loss / d logps, metrics) of GRPOTrainer._compute_loss."""
    ns = SimpleNamespace(
        args=args, loss_type=args.loss_type, beta=args.beta, importance_sampling_level=args.importance_sampling_level,
        off_policy_mask_threshold=args.off_policy_mask_threshold, top_entropy_quantile=args.top_entropy_quantile,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        use_vllm=False, vllm_importance_sampling_correction=False, max_completion_length=args.max_completion_length,
        entropy_coef=0.0, use_adaptive_entropy=False, _entropy_bonus_enabled=False, **new_state(),
    )
    ns.get_high_entropy_mask = MethodType(GRPOTrainer.get_high_entropy_mask, ns)
    ns.get_off_policy_mask, ns.get_gamma_weights = GRPOTrainer.get_off_policy_mask, GRPOTrainer.get_gamma_weights
    leaf = logps.clone().requires_grad_(True)
    ns._get_per_token_logps_and_entropies.outputs[id(ns.model)] = (leaf, entropies)
    b, t = mask.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(ns, ns.model, inputs)
    loss.backward()
    return loss.detach(), leaf.grad, last_metrics(ns)


def our_grpo_loss(cfg: GRPOConfig, logps, entropies, mask, advantages, old=None, ref=None):
    leaf = logps.clone().requires_grad_(True)
    loss, metrics = grpo_loss(
        leaf, advantages, mask, loss_type=cfg.loss_type, params=policy_loss_params(cfg), old_per_token_logps=old,
        ref_per_token_logps=ref, entropies=entropies, beta=cfg.beta, use_bias_correction_kl=cfg.use_bias_correction_kl,
        importance_sampling_level=cfg.importance_sampling_level, top_entropy_quantile=cfg.top_entropy_quantile,
        max_completion_length=cfg.max_completion_length,
    )
    loss.backward()
    return loss.detach(), leaf.grad, {k: float(v) for k, v in metrics.items()}


def policy_tensors(seed: int, empty_row: bool = True):
    """6 completions of 0..5 tokens (T = 5); log-probs 0 at padding, as TRL's; mixed-sign advantages."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 1, 4, 0 if empty_row else 2, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    logps = -torch.rand(6, 5, generator=gen) * 2 * mask
    old = (logps + 0.35 * torch.randn(6, 5, generator=gen)) * mask
    ref = (logps + 0.3 * torch.randn(6, 5, generator=gen)) * mask
    entropies = torch.rand(6, 5, generator=gen) * 3
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, 0.0])
    return logps, entropies, mask, advantages, old, ref


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]
VARIANTS = {  # (off-policy, overrides)
    "on-policy": (False, {}),
    "on-policy, beta (bias-corrected KL)": (False, {"beta": 0.04}),
    "off-policy, beta (bias-corrected KL)": (True, {"beta": 0.04}),
    "off-policy, beta, no bias correction": (True, {"beta": 0.04, "use_bias_correction_kl": False}),
    "off-policy, GSPO sequence ratio, beta": (True, {"beta": 0.04, "importance_sampling_level": "sequence"}),
    "off-policy, top-entropy 0.5, beta": (True, {"beta": 0.02, "top_entropy_quantile": 0.5}),
}
SPECIAL = [  # loss_type-specific options
    ("dapo", {"epsilon_high": 0.28, "delta": 1.5, "beta": 0.04}),
    ("grpo", {"epsilon": 0.1, "epsilon_high": 0.3}),
    ("cispo", {"epsilon_high": 5.0, "beta": 0.04}),
    ("cispo", {"epsilon_high": 1.1}),
    ("sapo", {"sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0, "beta": 0.04}),
    ("vespo", {"vespo_k_pos": 1.0, "vespo_lambda_pos": 1.5, "vespo_k_neg": 4.0, "vespo_lambda_neg": 0.5}),
    ("luspo", {"importance_sampling_level": "sequence", "epsilon": 0.05}),
]


def _compare(out_dir, loss_type, off_policy, overrides, seed=0, empty_row=True):
    logps, entropies, mask, adv, old, ref = policy_tensors(seed, empty_row)
    old = old if off_policy else None
    ref = ref if overrides.get("beta") else None
    args = trl_config(trl.GRPOConfig, out_dir, loss_type=loss_type, **overrides)
    theirs = trl_grpo_loss(args, logps, entropies, mask, adv, old, ref)
    ours = our_grpo_loss(GRPOConfig(loss_type=loss_type, **overrides), logps, entropies, mask, adv, old, ref)
    assert ours[0].item() == pytest.approx(theirs[0].item(), abs=ATOL), "loss"
    torch.testing.assert_close(ours[1], theirs[1], atol=ATOL, rtol=1e-5, msg="d loss / d logps")
    assert set(ours[2]) == set(theirs[2]), "metric names"
    for name, value in theirs[2].items():
        assert ours[2][name] == pytest.approx(value, abs=ATOL), name
    return theirs


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_types_equal_trl(out_dir, loss_type, variant):
    off_policy, overrides = VARIANTS[variant]
    _compare(out_dir, loss_type, off_policy, overrides, seed=LOSS_TYPES.index(loss_type))


@pytest.mark.parametrize(("loss_type", "overrides"), SPECIAL)
def test_grpo_loss_options_equal_trl(out_dir, loss_type, overrides):
    theirs = _compare(out_dir, loss_type, True, overrides, seed=7, empty_row=False)
    if "clip_ratio/region_mean" in theirs[2]:  # the case really exercises clipping
        assert theirs[2]["clip_ratio/region_mean"] > 0


def test_bias_correction_changes_the_kl_gradient_even_on_policy(out_dir):
    """TRL's default: on-policy the corrected KL has the same value but its gradient gains k3 per token (the
    ratio is 1 with gradient 1); without the flag our old gradient is TRL's use_bias_correction_kl=False."""
    logps, entropies, mask, adv, _, ref = policy_tensors(3)
    on = our_grpo_loss(GRPOConfig(beta=0.1), logps, entropies, mask, adv, None, ref)
    off = our_grpo_loss(GRPOConfig(beta=0.1, use_bias_correction_kl=False), logps, entropies, mask, adv, None, ref)
    assert on[0].item() == pytest.approx(off[0].item())
    k3 = torch.exp(ref - logps) - (ref - logps) - 1
    torch.testing.assert_close(on[1] - off[1], 0.1 * k3 * mask / mask.sum(), atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------ RLOO


def rloo_state(args):
    return SimpleNamespace(
        args=args, ref_model=SimpleNamespace(training=False, is_gradient_checkpointing=False), beta=args.beta,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        num_generations=args.num_generations, num_generations_eval=args.num_generations,
        normalize_advantages=args.normalize_advantages, mask_truncated_completions=args.mask_truncated_completions,
        reward_clip_range=args.reward_clip_range, pad_to_multiple_of=None, log_multimodal=False,
        _logs={"images": deque(), "prompt": deque(), "completion": deque(), "rewards": defaultdict(deque),
               "advantages": deque(), "extra": defaultdict(deque)},
        _pending_extra_logs=defaultdict(list), _pending_metrics=defaultdict(list), **new_state())


@pytest.mark.parametrize("off_policy", [False, True])
def test_rloo_loss_equals_trl(out_dir, off_policy):
    logps, entropies, mask, adv, old, _ = policy_tensors(11)
    args = trl_config(trl.RLOOConfig, out_dir, epsilon_high=0.25)
    ns = rloo_state(args)
    leaf = logps.clone().requires_grad_(True)
    ns._get_per_token_logps_and_entropies.outputs[id(ns.model)] = (leaf, entropies)
    old_seq = ((old if off_policy else logps) * mask).sum(-1)
    b, t = mask.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "old_logps": old_seq, "advantages": adv}
    theirs = RLOOTrainer._compute_loss(ns, ns.model, inputs)
    theirs.backward()
    ours_leaf = logps.clone().requires_grad_(True)
    ours, metrics = rloo_loss(ours_leaf, adv, mask, old_seq if off_policy else None, epsilon=0.2, epsilon_high=0.25,
                              entropies=entropies)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=ATOL)
    torch.testing.assert_close(ours_leaf.grad, leaf.grad, atol=ATOL, rtol=1e-5)
    trl_metrics = last_metrics(ns)
    assert set(metrics) == set(trl_metrics)
    for name, value in trl_metrics.items():
        assert float(metrics[name]) == pytest.approx(value, abs=ATOL), name
    if off_policy:
        assert trl_metrics["clip_ratio/region_mean"] > 0


EOS, PAD = 1, 0
# 3 prompts x 2: rows 1 and 4 are truncated (no EOS within the limit of 5 tokens)
COMPLETIONS = [[7, 8, 9, EOS], [7, 8, 9, 9, 9], [5, EOS], [6, 6, 6, EOS], [4, 4, 4, 4, 4], [3, EOS]]
NAN = math.nan
REWARDS = torch.tensor([[1.0, 0.5], [0.0, NAN], [1.0, 1.0], [NAN, NAN], [0.2, 0.1], [0.7, 0.3]])  # (N, F)


def trl_rloo_score(args, completions, old, ref):
    """RLOOTrainer._generate_and_score_completions with generation, tokenisation and rewards stubbed."""
    ns = rloo_state(args)
    ns.eos_token_ids, ns._tokenizer = [EOS], SimpleNamespace(pad_token_id=PAD)
    ns.state = SimpleNamespace(num_input_tokens_seen=0)
    ns.reward_func_names, ns.reward_weights = ["f0", "f1"], torch.ones(2)
    ns._tokenize_prompts = lambda prompts: ([[5, 6]] * len(completions), None, {})
    ns._generate_single_turn = lambda prompt_ids, images, fields: completions
    ns.processing_class = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens=True: ["c"] * len(ids))
    ns._generate = MethodType(RLOOTrainer._generate, ns)
    ns._calculate_rewards = lambda inputs, prompts, texts, ids: REWARDS.clone()
    width = max(map(len, completions))
    ns._get_per_token_logps_and_entropies.outputs[id(ns.model)] = (old[:, :width], None)
    ns._get_per_token_logps_and_entropies.outputs[id(ns.ref_model)] = (ref[:, :width], None)
    out = RLOOTrainer._generate_and_score_completions(ns, [{"prompt": f"p{i}"} for i in range(len(completions))])
    return out, last_metrics(ns)


def our_rloo_score(cfg: RLOOConfig, completions, old, ref):
    width = max(map(len, completions))
    ids = torch.tensor([c + [PAD] * (width - len(c)) for c in completions])
    mask, is_truncated = completion_mask_from_eos(ids, [EOS])
    groups = CompletionGroups([[5, 6]] * (len(completions) // 2), 2, ids, mask, PAD)
    rewards, metrics = combine_rewards(REWARDS.T, None, ["f0", "f1"])
    loss_mask = mask_truncated_completions(mask, is_truncated) if cfg.mask_truncated_completions else mask
    passes = {"sampling_logps": old[:, :width] * mask, "ref_logps": ref[:, :width] * mask}
    kept, rloo_metrics = RLOO(cfg, None, None).prepare(ScoredRollout(groups, is_truncated, loss_mask, rewards, passes))
    metrics.update(rloo_metrics)
    metrics.update(completion_metrics(mask, is_truncated))
    return kept, metrics


RLOO_SCORING = {
    "defaults (beta 0.05)": {},
    "beta 0": {"beta": 0.0},
    "reward_clip_range": {"reward_clip_range": [-0.3, 0.6]},
    "normalize_advantages": {"normalize_advantages": True},
    "mask_truncated_completions": {"mask_truncated_completions": True, "beta": 0.5},
}


@pytest.mark.parametrize("case", list(RLOO_SCORING))
def test_rloo_rewards_advantages_and_metrics_equal_trl(out_dir, case):
    overrides = RLOO_SCORING[case]
    gen = torch.Generator().manual_seed(5)
    old = -torch.rand(6, 5, generator=gen) * 2
    ref = old + 0.3 * torch.randn(6, 5, generator=gen)
    trl_args = {**overrides, "reward_clip_range": tuple(overrides["reward_clip_range"])} if "reward_clip_range" in overrides else overrides
    theirs, trl_metrics = trl_rloo_score(trl_config(trl.RLOOConfig, out_dir, **trl_args), COMPLETIONS, old, ref)
    kept, metrics = our_rloo_score(RLOOConfig(num_generations=2, **overrides), COMPLETIONS, old, ref)
    torch.testing.assert_close(kept["advantages"], theirs["advantages"], atol=ATOL, rtol=1e-5)
    skip = {"num_tokens"}  # cumulative token count: the loop's, not the rollout's
    for name, value in trl_metrics.items():
        if name in skip:
            continue
        assert name in metrics, name
        if math.isnan(value):
            assert math.isnan(metrics[name]), name
        else:
            assert metrics[name] == pytest.approx(value, abs=ATOL), name


def test_terminated_length_metrics_are_zero_when_nothing_terminated(out_dir):
    truncated = [[4, 4, 4], [5, 5, 5], [6, 6, 6], [7, 7, 7]]
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 3, generator=gen)
    _, trl_metrics = trl_rloo_score(trl_config(trl.RLOOConfig, out_dir, beta=0.0), truncated, old, old)
    _, metrics = our_rloo_score(RLOOConfig(num_generations=2, beta=0.0), truncated, old, old)
    for kind in ("mean", "min", "max"):
        name = f"completions/{kind}_terminated_length"
        assert metrics[name] == trl_metrics[name] == 0.0


# ------------------------------------------------------------------------------------------ defaults


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize(("ours", "theirs", "names"), [
    (GRPOConfig, trl.GRPOConfig, ["beta", "loss_type", "scale_rewards", "epsilon", "epsilon_high", "delta",
                                  "importance_sampling_level", "num_iterations", "top_entropy_quantile",
                                  "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg",
                                  "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
                                  "learning_rate", "num_generations", "temperature", "top_p",
                                  "mask_truncated_completions", "max_completion_length"]),
    (RLOOConfig, trl.RLOOConfig, ["beta", "epsilon", "epsilon_high", "num_iterations", "normalize_advantages",
                                  "reward_clip_range", "learning_rate", "num_generations", "temperature",
                                  "mask_truncated_completions", "max_completion_length"]),
    (DPOArgs, trl.DPOConfig, ["f_alpha_divergence_coef", "f_divergence_type", "beta"]),
])
def test_defaults_are_trls(ours, theirs, names):
    mine, trls = _defaults(ours), _defaults(theirs)
    for name in names:
        assert mine[name] == trls[name], name


def test_rloo_lists_only_the_flags_it_reads():
    fields = {f.name for f in dataclasses.fields(RLOOConfig)}
    assert not fields & {"loss_type", "scale_rewards", "delta", "importance_sampling_level", "top_entropy_quantile",
                         "use_bias_correction_kl", "sapo_temperature_pos", "vespo_k_pos"}
    assert {"reward_clip_range", "normalize_advantages", "epsilon", "epsilon_high", "num_iterations"} <= fields
