"""chat.generate_reply / chat_loop on the tiny random Qwen2 fixture, with real generation (no mocks)."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefalign.commands.chat import chat_loop
from prefalign.errors import PrefalignError
from prefalign.rollout.answers import generate_reply


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _greedy_ids(model, tokenizer, messages, n):
    """Reference: n steps of argmax decoding by hand, stopping after eos."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


def test_greedy_reply_matches_hand_decoding_and_stream(model, tiny_tokenizer):
    messages = [{"role": "user", "content": "what is two plus three"}]
    pieces: list[str] = []
    reply = generate_reply(model, tiny_tokenizer, messages, max_new_tokens=12, temperature=0.0, stream=pieces.append)
    expected = tiny_tokenizer.decode(_greedy_ids(model, tiny_tokenizer, messages, 12), skip_special_tokens=True)
    assert reply == expected
    assert reply  # a random model with 400 tokens emits something in 12 steps
    assert "".join(pieces) == reply
    assert len(pieces) >= 1


def test_stream_to_file_and_no_stream_agree(model, tiny_tokenizer):
    messages = [{"role": "user", "content": "hello"}]
    buf = io.StringIO()
    streamed = generate_reply(model, tiny_tokenizer, messages, max_new_tokens=8, temperature=0.0, stream=buf)
    plain = generate_reply(model, tiny_tokenizer, messages, max_new_tokens=8, temperature=0.0)
    assert buf.getvalue() == streamed == plain


def test_sampling_is_seeded(model, tiny_tokenizer):
    messages = [{"role": "user", "content": "hello"}]
    torch.manual_seed(3)
    a = generate_reply(model, tiny_tokenizer, messages, max_new_tokens=10, temperature=1.0, top_p=0.9)
    torch.manual_seed(3)
    b = generate_reply(model, tiny_tokenizer, messages, max_new_tokens=10, temperature=1.0, top_p=0.9)
    assert a == b


def test_bad_sampling_values(model, tiny_tokenizer):
    with pytest.raises(PrefalignError, match="temperature"):
        generate_reply(model, tiny_tokenizer, [{"role": "user", "content": "x"}], max_new_tokens=2, temperature=-1)
    with pytest.raises(PrefalignError, match="top_p"):
        generate_reply(model, tiny_tokenizer, [{"role": "user", "content": "x"}], max_new_tokens=2, top_p=0)


def test_chat_loop_history_reset_exit(model, tiny_tokenizer):
    inputs = iter(["hello", "the sky", "/reset", "cat", "/exit", "never read"])
    out = io.StringIO()
    history = chat_loop(model, tiny_tokenizer, input_fn=lambda _p: next(inputs), output=out, max_new_tokens=6)
    # after /reset only the "cat" exchange remains; "never read" is not consumed
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "cat"
    assert next(inputs) == "never read"
    assert "(conversation cleared)" in out.getvalue()
    # the reply in the history is the one greedy decoding gives for that one-turn conversation
    expected = generate_reply(model, tiny_tokenizer, history[:1], max_new_tokens=6)
    assert history[1]["content"] == expected
    assert expected in out.getvalue()


def test_chat_loop_history_grows_and_eof_ends(model, tiny_tokenizer):
    lines = ["hello", "yes please"]

    def input_fn(_prompt: str) -> str:
        if not lines:
            raise EOFError
        return lines.pop(0)

    history = chat_loop(
        model, tiny_tokenizer, input_fn=input_fn, output=io.StringIO(), system_prompt="be brief", max_new_tokens=5
    )
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    # the second reply saw the whole conversation: it equals a fresh greedy reply to the first four messages
    assert history[4]["content"] == generate_reply(model, tiny_tokenizer, history[:4], max_new_tokens=5)


def test_help_and_unknown_commands_are_not_sent_to_the_model(model, tiny_tokenizer):
    inputs = iter(["/help", "/hlep", "hello", "/exit"])
    out = io.StringIO()
    history = chat_loop(model, tiny_tokenizer, input_fn=lambda _p: next(inputs), output=out, max_new_tokens=4)
    assert [m["content"] for m in history if m["role"] == "user"] == ["hello"]
    text = out.getvalue()
    assert text.count("Commands: /help list these commands, /reset clear the conversation") == 3  # start, /help, /hlep
    assert "unknown command /hlep; Commands:" in text


def test_ctrl_c_stops_the_reply_not_the_session(model, tiny_tokenizer):
    """Ctrl-C arrives while the reply streams (here: raised from the stream on its first piece, where a real
    SIGINT lands inside model.generate); that turn is dropped and the next one is answered normally."""
    inputs = iter(["first", "second", "/exit"])
    armed: list[str] = []

    def input_fn(_prompt: str) -> str:
        line = next(inputs)
        if line == "first":
            armed.append(line)
        return line

    class Interrupting(io.StringIO):
        def write(self, text: str) -> int:
            if armed:  # the first thing written after "first" is read is a streamed piece of its reply
                armed.clear()
                raise KeyboardInterrupt
            return super().write(text)

    out = Interrupting()
    history = chat_loop(model, tiny_tokenizer, input_fn=input_fn, output=out, max_new_tokens=6)
    assert "(reply stopped; this turn is not kept)" in out.getvalue()
    assert [m["content"] for m in history if m["role"] == "user"] == ["second"]
    assert history[1]["content"] == generate_reply(model, tiny_tokenizer, history[:1], max_new_tokens=6)
