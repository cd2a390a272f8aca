"""Reward functions, their spec strings, nan-aware combination, and scoring with a real tiny reward model."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import copy_without_chat_template
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
def reward_model_dir(tiny_reward_model_dir):
    return tiny_reward_model_dir


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


@pytest.mark.parametrize("returned, message", [
    (0.5, "returned float (0.5) instead of a list of 2 values (one number or None per completion)"),
    (None, "returned None instead of a list of 2 values"),
    ("0.5", "returned str ('0.5') instead of a list of 2 values"),
    ({"a": 1}, "returned dict ({'a': 1}) instead of a list of 2 values"),
    ([1.0, 2.0, 3.0], "returned 3 values for 2 completions"),
    ([1.0, "high"], "returned a value that is neither a number nor None: completion 1 got str ('high')"),
    ([math.nan, 1.0], "returned nan for 1 of 2 completions; return a finite number, or None for a completion the "
                      "function does not score"),
    ([math.inf, -math.inf], "returned inf for 2 of 2 completions"),
    ([math.nan, math.inf], "returned nan for 1 and inf for 1 of 2 completions"),
])
def test_a_wrong_return_names_the_function_and_what_it_returned(returned, message):
    def my_reward(prompts, completions, **kw):
        return returned

    with pytest.raises(PrefalignError) as e:
        compute_rewards([my_reward], ["p", "p"], ["a", "b"], when="at step 3 (rollout 3 of epoch 1)")
    assert str(e.value).startswith(f"reward function my_reward at step 3 (rollout 3 of epoch 1): {message}")
    assert "\n" not in str(e.value)


def test_tuples_tensors_and_none_are_accepted():
    def as_tensor(prompts, completions, **kw):
        return torch.tensor([1.0, 2.0])

    def as_tuple(prompts, completions, **kw):
        return (None, 3)

    out = compute_rewards([as_tensor, as_tuple], ["p", "p"], ["a", "b"])
    assert out[0].tolist() == [1.0, 2.0] and math.isnan(out[1, 0].item()) and out[1, 1].item() == 3.0


def test_a_raising_function_keeps_its_traceback(tmp_path):
    from prefalign.errors import UserCodeError

    (tmp_path / "mine.py").write_text("def judge(prompts, completions, **kw):\n    return [1 / 0 for _ in completions]\n")
    fn = load_reward_function(f"{tmp_path / 'mine.py'}:judge")
    with pytest.raises(UserCodeError) as e:
        compute_rewards([fn], ["p"], ["a"], when="at step 2 (rollout 2 of epoch 1)")
    assert str(e.value) == "reward function judge at step 2 (rollout 2 of epoch 1): raised ZeroDivisionError: division by zero"
    assert isinstance(e.value.__cause__, ZeroDivisionError)  # the CLI prints its traceback, which points at mine.py
    (tmp_path / "broken.py").write_text("def judge(prompts, completions:\n    return []\n")
    with pytest.raises(UserCodeError) as e:
        load_reward_function(f"{tmp_path / 'broken.py'}:judge")
    assert str(e.value).startswith(f"{tmp_path / 'broken.py'}:judge: cannot load {tmp_path / 'broken.py'}: SyntaxError")
    assert isinstance(e.value.__cause__, SyntaxError)


def test_a_rollout_no_function_scores_is_an_error_with_counts():
    from prefalign.rollout.sampling import Sampled, reward_columns, score

    def never(prompts, completions, **kw):
        return [None] * len(completions)

    s = Sampled(None, torch.zeros(3, dtype=torch.bool), ["p"] * 3, ["a", "b", "c"], {"answer": [None] * 3})
    fns = [never, load_reward_function("exact_match")]
    table = reward_columns(fns, s)  # (F, N); the stage scores every process's rows gathered
    with pytest.raises(PrefalignError) as e:
        score(fns, None, table, "at step 1 (rollout 1 of epoch 1)", require_any=True)
    assert str(e.value) == ("rewards at step 1 (rollout 1 of epoch 1): no reward function scored any of the 3 "
                            "completions (never: 3 None, exact_match: 3 None); check that the functions apply to "
                            "this data (e.g. its 'answer' column)")
    rewards, _ = score(fns, None, table)  # evaluation: reported as nan, not refused
    assert torch.isnan(rewards).all()


def test_reward_model_scorer_refuses_a_causal_lm_and_names_the_flag(tiny_model_dir, tiny_tokenizer):
    """A causal LM has no trained score head: transformers would score with a random one."""
    with pytest.raises(PrefalignError) as e:
        RewardModelScorer(tiny_model_dir)
    assert str(e.value) == (f"--reward_model_name_or_path: {tiny_model_dir} is a Qwen2ForCausalLM checkpoint without a "
                            "trained score head; a reward model must be a sequence-classification model (e.g. the "
                            "output of `prefalign rm`)")
    import copy

    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with pytest.raises(PrefalignError, match=r"^--reward_model_name_or_path: the reward tokenizer has no pad token$"):
        RewardModelScorer(model, no_pad)


def test_reward_tokenizer_differences_are_said_once_and_a_missing_template_refused(
        tiny_reward_model_dir, tiny_tokenizer, tmp_path):
    import copy

    from prefalign.config import GRPOConfig
    from prefalign.rollout.rewards import load_reward_functions

    cfg = GRPOConfig(reward_model_name_or_path=str(tiny_reward_model_dir))
    said: list[str] = []
    fns = load_reward_functions(cfg, "cpu", tiny_tokenizer, conversational=True, report=said.append)
    assert len(fns) == 1 and said == []  # the same tokenizer and template: nothing to say
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    load_reward_functions(cfg, "cpu", other, conversational=True, report=said.append)
    assert said == [f"reward model {tiny_reward_model_dir}: its tokenizer (or chat template) differs from the "
                    "policy's; completions are decoded to text and re-tokenised with the reward model's own"]

    # the same reward model, its tokenizer saved without a chat template
    bare = copy_without_chat_template(tiny_reward_model_dir, tmp_path / "bare_rm")
    cfg = GRPOConfig(reward_model_name_or_path=str(bare))
    with pytest.raises(PrefalignError) as e:
        load_reward_functions(cfg, "cpu", tiny_tokenizer, conversational=True, report=said.append)
    assert str(e.value) == ("--reward_chat_template: the reward model's tokenizer has no chat template and the "
                            "prompts are conversational; pass the template it was trained with (a built-in name or "
                            "a .jinja file)")
    load_reward_functions(cfg, "cpu", tiny_tokenizer, conversational=False)  # text prompts need no template
    cfg.reward_chat_template = "chatml"
    (scorer,) = load_reward_functions(cfg, "cpu", tiny_tokenizer, conversational=True)
    assert scorer.texts([[{"role": "user", "content": "hi"}]], [ASSISTANT]) == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n 42\n<|im_end|>\n"]
