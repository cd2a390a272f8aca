"""The KTO stage against TRL 1.16's KTOTrainer, step by step, on a tiny model; its pairing of a run; its checks.

TRL runs 3 steps with `train_sampling_strategy="sequential"` (its KTO default), per-device batch 2, the reference an
explicit noise-perturbed copy of the policy, fp32 on CPU, λ_D = 1.3 and λ_U = 0.7; prefalign runs the same rows with
`--train_sampling_strategy sequential` and that reference saved to disk. Every step's logged values agree: the data
preparation (tokens, EOS, the +1-rolled KL completions), the loss, z and the metrics, and, from step 2 on, the
optimizer (AdamW, clipping at 1, linear schedule) that produced the weights.
"""

from __future__ import annotations

import pytest
import torch

from helpers import write_jsonl
from prefalign.config import KTOConfig
from prefalign.errors import PrefalignError
from prefalign.stages.kto import KTOStage, kl_partners, resolve_kto_config, train_kto
from prefalign.train.metrics import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROWS = {"prompt": ["what is the sky", "hello world", "two plus two", "the cat", "red green", "yes no"],
        "completion": [" blue", " hello there", " four", " a dog sure", " blue sky", " no"],
        "label": [True, True, True, False, True, False]}
COMPARED = ("loss", "kl", "entropy", "num_tokens", "grad_norm", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


def _trl_run(model_dir, ref, tmp_path, loss_type) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer

    logged: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs))

    args = TRLKTOConfig(output_dir=str(tmp_path / f"trl_{loss_type}"), per_device_train_batch_size=2, max_steps=3,
                        learning_rate=1e-3, logging_steps=1, report_to="none", bf16=False, use_cpu=True,
                        gradient_checkpointing=False, max_length=64, loss_type=loss_type, beta=0.1,
                        desirable_weight=1.3, undesirable_weight=0.7, disable_tqdm=True, save_strategy="no", seed=0)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_dict(ROWS),
               processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Record()]).train()
    return [r for r in logged if "loss" in r]


@pytest.mark.parametrize(("loss_type", "padding_free"), [("kto", True), ("apo_zero_unpaired", False)])
def test_step_by_step_equal_to_trl_kto_trainer(tiny_model_dir, tmp_path, monkeypatch, loss_type, padding_free):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ref.save_pretrained(tmp_path / "ref")
    trl_steps = _trl_run(tiny_model_dir, ref, tmp_path, loss_type)
    data = write_jsonl(tmp_path / "d.jsonl", [dict(zip(ROWS, v)) for v in zip(*ROWS.values())])
    train_kto(KTOConfig(model_name_or_path=str(tiny_model_dir), ref_model_name_or_path=str(tmp_path / "ref"),
                        dataset_name=str(data), output_dir=str(tmp_path / "ours"), per_device_train_batch_size=2,
                        max_steps=3, learning_rate=1e-3, logging_steps=1, max_length=64, loss_type=loss_type,
                        beta=0.1, desirable_weight=1.3, undesirable_weight=0.7, train_sampling_strategy="sequential",
                        padding_free=padding_free, disable_tqdm=True))
    ours = read_metrics(tmp_path / "ours" / "metrics.jsonl")
    assert len(ours) == len(trl_steps) == 3
    for step, (theirs, mine) in enumerate(zip(trl_steps, ours), start=1):
        # step 1 has two desirable rows: neither logs rejected metrics or margins
        assert {k for k in COMPARED if k in theirs} == {k for k in COMPARED if k in mine}, step
        for key in COMPARED:
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=2e-5, abs=1e-6), (step, key)
    if loss_type == "kto":
        assert ours[0]["kl"] == pytest.approx(0.5386190414428711, rel=1e-6)  # the spec's recorded TRL value


def test_the_kl_pairs_of_a_run_follow_its_steps():
    """Pairs are rolled over each optimizer step's whole batch (B x A x processes), in the step's order."""
    cfg = KTOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, seed=3)
    stage = KTOStage(cfg, None, [object()] * 6, None, 0, None, None, None)  # pairing reads the example count only
    groups = stage.train_groups(0)
    first = [i for g in groups[:2] for i in g]
    pairs = set(stage.run_pairs(num_processes=1))
    assert set(kl_partners(first).items()) <= pairs
    # 6 examples in steps of 4: two steps an epoch, so step 3 is epoch 1's first: its pairs are there too
    epoch1 = stage.train_groups(1)
    assert set(kl_partners([i for g in epoch1[:2] for i in g]).items()) <= pairs
    assert {(i, i) for i in range(6)} <= pairs


@pytest.mark.parametrize(("cfg", "flag"), [
    ({"loss_type": "kto_pair"}, "--loss_type"),
    ({"beta": 0.0}, "--beta"),
    ({"desirable_weight": -1.0}, "--desirable_weight"),
    ({"train_sampling_strategy": "group_by_length"}, "--train_sampling_strategy"),
    ({"sync_ref_model": True, "use_peft": True}, "--sync_ref_model"),
    ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "--sync_ref_model"),
    ({"sync_ref_model": True, "ref_model_mixup_alpha": 0.0}, "--ref_model_mixup_alpha"),
    ({"truncation_mode": "middle"}, "--truncation_mode"),
])
def test_config_checks_name_the_flag(cfg, flag):
    with pytest.raises(PrefalignError) as e:
        resolve_kto_config(KTOConfig(model_name_or_path="m", dataset_name="d", output_dir="o", **cfg))
    assert e.value.where == flag
