"""`prefalign eval` on the tiny Qwen2 fixture: implicit-reward metrics against a naive hand computation, the
reference recorded by a run, win rates from a judge file, samples, JSON output and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import run_cli, write_jsonl
from prefalign.cli import main
from prefalign.commands.eval import evaluate, win_rate
from prefalign.config import EvalConfig
from prefalign.errors import PrefalignError
from prefalign.rollout.answers import generate_reply
from prefalign.train.metrics import read_metrics

PAIRS = [("1 + 2 =", " 3", " 4"), ("the sky is", " blue", " red"), ("hello", " world", " cat dog")]
BETA = 0.1


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_model_dir):
    """The fixture model with noise added to every weight, saved with a prefalign_config.json naming the fixture
    as the model it started from (what a DPO run writes), so the reference defaults to the fixture."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("policy")
    model.save_pretrained(d)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(d)
    (d / "prefalign_config.json").write_text(json.dumps({"model_name_or_path": str(tiny_model_dir)}))
    return d


@pytest.fixture(scope="module")
def model_tokenizer(tiny_model_dir):
    """The tokenizer as loaded from a model directory. Saved next to a qwen2 config it loads as Qwen2Tokenizer,
    whose pre-tokenizer splits " 3" differently from the fixture's own object, so expectations use this one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])


def _naive_logp(model, tokenizer, prompt, completion):
    """Sum of log p(completion tokens | prompt) from one full forward: prompt and completion are tokenized
    separately (as the pair tokenizer does for text pairs) and EOS closes the completion."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)  # (T-1, V): position t predicts t+1
    return sum(float(logps[len(p_ids) - 1 + k, t]) for k, t in enumerate(c_ids))


def test_pair_metrics_match_hand_computation(policy_dir, pairs_file, tiny_model_dir, model_tokenizer):
    result = evaluate(EvalConfig(model_name_or_path=str(policy_dir), dataset_name=str(pairs_file), beta=BETA,
                                 per_device_eval_batch_size=2))  # 2 + 1 pairs: batching must not matter
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    chosen, rejected = [], []
    for prompt, c, r in PAIRS:
        chosen.append(BETA * (_naive_logp(policy, model_tokenizer, prompt, c) - _naive_logp(ref, model_tokenizer, prompt, c)))
        rejected.append(BETA * (_naive_logp(policy, model_tokenizer, prompt, r) - _naive_logp(ref, model_tokenizer, prompt, r)))
    m = result["metrics"]
    assert result["num_pairs"] == 3
    assert m["eval_rewards/chosen"] == pytest.approx(sum(chosen) / 3, abs=1e-5)
    assert m["eval_rewards/rejected"] == pytest.approx(sum(rejected) / 3, abs=1e-5)
    assert m["eval_rewards/margins"] == pytest.approx((sum(chosen) - sum(rejected)) / 3, abs=1e-5)
    assert m["eval_rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 3)
    assert m["eval_rewards/margins"] != 0.0  # the noise made policy and reference differ


def test_policy_against_itself_has_zero_rewards(pairs_file, tiny_model_dir):
    m = evaluate(EvalConfig(model_name_or_path=str(tiny_model_dir), ref_model_name_or_path=str(tiny_model_dir),
                            dataset_name=str(pairs_file)))["metrics"]
    assert m["eval_rewards/margins"] == 0.0 and m["eval_rewards/accuracies"] == 0.0  # strict: ties are not wins


def test_win_rate_with_judge_file(tmp_path, policy_dir, pairs_file, tiny_model_dir, model_tokenizer):
    judge = tmp_path / "judge.py"
    judge.write_text("def longer(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    out_json = tmp_path / "out" / "eval.json"
    argv = ["eval", "--model_name_or_path", str(policy_dir), "--dataset_name", str(pairs_file), "--judge",
            f"{judge}:longer", "--num_samples", "2", "--per_device_eval_batch_size", "1", "--max_new_tokens", "6", "--output_json", str(out_json)]
    assert main(argv) == 0
    result = json.loads(out_json.read_text())
    # batch size 1: no padding, so the random model's near-tied logits cannot flip between the two computations;
    # expected: one unbatched greedy reply per prompt from each model, scored by length by hand
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ours = [generate_reply(policy, model_tokenizer, [{"role": "user", "content": p}], max_new_tokens=6) for p, _, _ in PAIRS]
    theirs = [generate_reply(ref, model_tokenizer, [{"role": "user", "content": p}], max_new_tokens=6) for p, _, _ in PAIRS]
    wins = sum(1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0 for a, b in zip(ours, theirs))
    assert result["metrics"]["win_rate"] == pytest.approx(wins / 3)
    assert result["samples"] == [{"prompt": PAIRS[i][0], "policy": ours[i], "reference": theirs[i]} for i in range(2)]


def test_win_rate_by_hand():
    assert win_rate([1.0, 0.0, 2.0, float("nan")], [0.0, 0.0, 3.0, 1.0]) == pytest.approx((1 + 0.5 + 0) / 3)


def test_errors(tmp_path, pairs_file, tiny_model_dir, capsys):
    with pytest.raises(PrefalignError, match="--ref_model_name_or_path"):
        evaluate(EvalConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(pairs_file)))  # nothing recorded
    with pytest.raises(PrefalignError, match="choose one of --judge"):
        evaluate(EvalConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(pairs_file), judge="a:b",
                            reward_model_name_or_path="x"))
    assert main(["eval", "--model_name_or_path", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err.strip() == "prefalign eval: error: --dataset_name: is required"


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir, pairs_file):
    """A LoRA adapter trained on the fixture model (a short LoRA DPO run stands in for an SFT adapter)."""
    out = tmp_path_factory.mktemp("adapter") / "sft"
    assert run_cli("dpo", tiny_model_dir, pairs_file, out, "--max_steps", 3, "--use_peft", "--lora_r", 4,
                   "--learning_rate", 5e-2, "--per_device_train_batch_size", 3) == 0
    return out


def test_eval_of_a_continued_adapter_uses_the_reference_the_run_used(sft_adapter, tiny_model_dir, pairs_file,
                                                                     tmp_path, capsys):
    """DPO from an SFT adapter compares with that adapter frozen: eval must too (the base with the adapter disabled
    gives other numbers), and say which reference it used."""
    dpo = tmp_path / "dpo"
    assert run_cli("dpo", tiny_model_dir, pairs_file, dpo, "--max_steps", 2, "--peft_adapter_path", sft_adapter,
                   "--learning_rate", 5e-2, "--per_device_train_batch_size", 3, "--eval_dataset_name", pairs_file) == 0
    logged = [r for r in read_metrics(dpo / "metrics.jsonl") if "eval_rewards/margins" in r][-1]
    assert json.loads((dpo / "prefalign_run.json").read_text())["reference"] == {
        "model": str(tiny_model_dir), "adapter": str(sft_adapter)}
    capsys.readouterr()
    assert main(["eval", "--model_name_or_path", str(dpo), "--dataset_name", str(pairs_file)]) == 0
    said = capsys.readouterr().out
    assert said.splitlines()[0] == (f"reference: the adapter {sft_adapter} on {tiny_model_dir} "
                                    f"(recorded in {dpo / 'prefalign_run.json'})")
    result = evaluate(EvalConfig(model_name_or_path=str(dpo), dataset_name=str(pairs_file)))
    for key in ("eval_rewards/margins", "eval_rewards/chosen", "eval_loss"):
        assert result["metrics"][key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
    assert abs(logged["eval_rewards/margins"]) > 1e-4  # not trivially equal: the policy moved from the reference


def test_an_adapter_on_another_base_is_refused_unless_asked(sft_adapter, tiny_llama_dir, pairs_file, tmp_path,
                                                            capsys):
    out = tmp_path / "other-base"
    assert run_cli("dpo", tiny_llama_dir, pairs_file, out, "--max_steps", 1, "--peft_adapter_path", sft_adapter) == 2
    recorded = json.loads((sft_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert capsys.readouterr().err.strip() == (
        f"prefalign dpo: error: --peft_adapter_path {sft_adapter}: was trained on {recorded} (its adapter_config.json), "
        f"not --model_name_or_path {tiny_llama_dir}; pass --ignore_adapter_base to load it on this base anyway")
    assert not out.exists()
    assert run_cli("dpo", tiny_llama_dir, pairs_file, out, "--max_steps", 1, "--peft_adapter_path", sft_adapter,
                   "--ignore_adapter_base") == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama_dir)


def test_runs_of_older_versions_imply_their_reference(tmp_path):
    from prefalign.commands.eval import recorded_reference

    run = tmp_path / "run"
    run.mkdir()
    (run / "prefalign_config.json").write_text(json.dumps({"model_name_or_path": "base", "peft_adapter_path": "sft",
                                                           "use_peft": False}))
    assert recorded_reference(str(run)) == ({"model": "base", "adapter": "sft"}, run / "prefalign_config.json")
    (run / "prefalign_config.json").write_text(json.dumps({"model_name_or_path": "base", "ref_model_name_or_path": "r"}))
    assert recorded_reference(str(run))[0] == {"model": "r"}
