"""Reward functions, their spec strings, nan-aware combination, and scoring with a real tiny reward model."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.rollout.rewards import (
    RewardModelScorer,
    combine_rewards,
    compute_rewards,
    last_number,
    load_reward_function,
    reward_function_name,
)

ASSISTANT = [{"role": "assistant", "content": " 42\n"}]


def test_exact_match_whitespace_and_conversational():
    fn = load_reward_function("exact_match")
    got = fn(prompts=["q"] * 4, completions=[" 42 \n", "4 2", ASSISTANT, "x"], answer=["42", "42", "42", None])
    assert got == [1.0, 0.0, 1.0, None]
    assert reward_function_name(fn) == "exact_match"
    with pytest.raises(PrefalignError, match="'answer' column"):
        fn(prompts=["q"], completions=["42"], solution=["42"])


def test_exact_match_final_number():
    fn = load_reward_function("exact_match:number")
    completions = ["So the total is 1,234.", "It is 12 then 7", "no digits here", "-3.50", "x"]
    answers = ["#### 1234", "7", "5", "-3.5", "unknown"]
    assert fn(prompts=[""] * 5, completions=completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, None]
    assert last_number("a 1 b 2.5 c") == 2.5 and last_number("none") is None


def test_regex_format_and_length():
    fmt = load_reward_function(r"regex:^<think>.*</think>\s*<answer>.*</answer>$")
    comps = ["<think>a\nb</think> <answer>4</answer>", "<answer>4</answer>", [{"role": "assistant", "content": "<think></think><answer></answer>"}]]
    assert fmt(prompts=[""] * 3, completions=comps) == [1.0, 0.0, 1.0]
    assert reward_function_name(fmt) == "regex_format"
    # -|len - 10| / 10 for 5, 10 and 20 characters
    length = load_reward_function("length:10")
    assert length(prompts=[""] * 3, completions=["abcde", "a" * 10, "b" * 20]) == [-0.5, 0.0, -1.0]
    with pytest.raises(PrefalignError, match="invalid regular expression"):
        load_reward_function("regex:(")
    with pytest.raises(PrefalignError, match="integer"):
        load_reward_function("length:ten")


def test_load_user_functions(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions, **kw):\n    return [float(c.isupper()) for c in completions]\nNOT_FN = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_function("my_rewards:shout")
    assert fn(prompts=["", ""], completions=["HI", "hi"]) == [1.0, 0.0]
    by_file = load_reward_function(f"{tmp_path / 'my_rewards.py'}:shout")
    assert by_file(prompts=[""], completions=["OK"]) == [1.0]
    cases = {
        "no_such_module_xyz:fn": "cannot import module 'no_such_module_xyz'",
        "my_rewards:missing": "has no attribute 'missing'",
        "my_rewards:NOT_FN": "is not callable",
        f"{tmp_path / 'absent.py'}:fn": "does not exist",
        "justaname": "not a reward function spec",
    }
    for spec, message in cases.items():
        with pytest.raises(PrefalignError, match=message) as info:
            load_reward_function(spec)
        assert "\n" not in str(info.value) and str(info.value).startswith(spec)


def test_combine_rewards_nansum_and_metrics():
    """f0 = [1, None, 0.5], f1 = [2, 3, None], weights [1, 0.5]: [1 + 1, 0 + 1.5, 0.5 + 0] = [2, 1.5, 0.5].
    Means skip None: f0 (1 + 0.5)/2 = 0.75, f1 (2 + 3)/2 = 2.5. A column of Nones is unscorable: nan."""
    rewards, m = combine_rewards([[1, None, 0.5, None], [2, 3, None, None]], [1.0, 0.5], ["f0", "f1"])
    assert rewards[:3].tolist() == [2.0, 1.5, 0.5] and math.isnan(rewards[3].item())
    assert m["rewards/f0/mean"] == 0.75 and m["rewards/f1/mean"] == 2.5
    assert m["rewards/f1/std"] == pytest.approx(math.sqrt(0.5))
    with pytest.raises(PrefalignError, match="reward_weights"):
        combine_rewards([[1.0]], [1.0, 2.0])


def test_compute_rewards_checks_returns():
    fns = [load_reward_function("exact_match"), load_reward_function("length:2")]
    out = compute_rewards(fns, ["p", "p"], ["ab", "x"], {"answer": ["ab", None]})
    assert out.shape == (2, 2)
    assert out[0, 0].item() == 1.0 and math.isnan(out[0, 1].item()) and out[1].tolist() == [0.0, -0.5]

    def short(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(PrefalignError, match="reward function short: returned 1 values for 2 completions"):
        compute_rewards([short], ["p", "p"], ["a", "b"])


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(config)
    d = tmp_path_factory.mktemp("rm")
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def test_reward_model_scorer_matches_unpadded_forward(reward_model_dir, tiny_tokenizer):
    """Batched, right-padded scores equal each pair scored alone (logit 0 at its last token), on the ids the reward
    model was trained on: `prefalign rm` tokenizes a text prompt and completion apart and ends the completion in
    EOS (data.tokenize.encode_pairs), so scoring `prompt + completion` as one string would read another token."""
    from prefalign.data.tokenize import encode_pairs
    from prefalign.data.types import Pair

    scorer = RewardModelScorer(reward_model_dir, tiny_tokenizer, batch_size=3)
    prompts = ["what is two plus two", "hello", "the sky is"]
    completions = [" four", " world and the cat and the dog", " blue"]
    scores = scorer(prompts=prompts, completions=completions)
    model = scorer.model
    for p, c, s, ids in zip(prompts, completions, scores, scorer.token_ids(prompts, completions)):
        trained = encode_pairs([Pair(prompt=p, chosen=c, rejected=c)], tiny_tokenizer)[0]
        assert ids == trained.prompt_ids + trained.chosen_ids and ids[-1] == tiny_tokenizer.eos_token_id
        assert s == pytest.approx(model(input_ids=torch.tensor([ids])).logits[0, 0].item(), abs=1e-5)
    assert len(set(scores)) == 3


def test_reward_model_scorer_conversational_template(reward_model_dir, tiny_tokenizer):
    scorer = RewardModelScorer(reward_model_dir, tiny_tokenizer)
    prompt = [{"role": "user", "content": "hello"}]
    completion = [{"role": "assistant", "content": "hi"}]
    assert scorer.texts([prompt], [completion]) == [
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    ]
    # a head of zeros scores everything 0: the score really is the head's output
    scorer.model.score.weight.data.zero_()
    assert scorer(prompts=[prompt, prompt], completions=[completion, [{"role": "assistant", "content": "no"}]]) == [0.0, 0.0]
    with pytest.raises(PrefalignError, match="does not exist"):
        RewardModelScorer(reward_model_dir / "nope", tiny_tokenizer)
