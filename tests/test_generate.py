"""Stop strings, stop tokens and finish reasons of the generation loop.

The loop is driven by a scripted engine (its logits pick a fixed token sequence) and the real
demo tokenizer, so every expected text is computed independently with the tokenizer's batch
decode and ``str.find``."""

from __future__ import annotations

import random

import numpy as np
import pytest

from qwen_ondevice.core.checkpoint import load_checkpoint
from qwen_ondevice.runtime.backends.torch_backend import TorchBackend
from qwen_ondevice.runtime.engine import Engine
from qwen_ondevice.runtime.generate import StopStringFilter, generate, stream_generate
from qwen_ondevice.runtime.sampling import SamplingParams

V = 151936
IM_END, ENDOFTEXT = 151645, 151643


# --- StopStringFilter ---------------------------------------------------------------------------

def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, len(text) // 2))))
    bounds = [0] + cuts + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def run_filter(stops, pieces):
    """Push pieces until stopped; returns (emitted pieces, stopped, the flushed rest)."""
    f = StopStringFilter(stops)
    out = []
    for p in pieces:
        text, stopped = f.push(p)
        out.append(text)
        if stopped:
            return out, True, ""
    return out, False, f.flush()


@pytest.mark.parametrize(
    "text,stop",
    [
        ("The answer is 4.\nUser: and 5?", "\nUser:"),
        ("aaab aab ab", "aab"),  # the stop's prefix repeats inside itself
        ("call f(x) END done END", "END"),
        ("<<<>><<>>>", "<>>"),
        ("stop at the very end STOP", "STOP"),
        ("STOP at the very start", "STOP"),
        ("中文句子。停止词在这里，之后不要输出", "停止"),
    ],
)
def test_stop_string_cut_exactly_never_leaks(text, stop):
    expect = text[: text.find(stop)]
    rng = random.Random(hash((text, stop)) & 0xFFFF)
    for _ in range(200):
        pieces = random_pieces(text, rng)
        out, stopped, rest = run_filter([stop], pieces)
        assert stopped and rest == ""
        assert "".join(out) == expect, pieces
        # at every moment what was emitted is a prefix of the final answer (nothing to take back)
        for k in range(len(out)):
            assert expect.startswith("".join(out[: k + 1]))


def test_partial_stop_prefixes_are_released():
    text = "a </e b </en c </end"  # never completes "</end>"
    rng = random.Random(0)
    for _ in range(200):
        out, stopped, rest = run_filter(["</end>"], random_pieces(text, rng))
        assert not stopped
        assert "".join(out) + rest == text
    # a held prefix is released as soon as it can no longer start the stop string
    f = StopStringFilter(["</end>"])
    assert f.push("x </e") == ("x ", False)
    assert f.push("n") == ("", False)
    assert f.push("!") == ("</en!", False)


def test_several_stop_strings():
    rng = random.Random(1)
    text = "alpha beta gamma ### delta"
    for _ in range(100):
        out, stopped, _ = run_filter(["###", "zeta", "omega"], random_pieces(text, rng))
        assert stopped and "".join(out) == "alpha beta gamma "
    assert run_filter([], ["no ", "stops"]) == (["no ", "stops"], False, "")
    assert run_filter([""], ["empty ", "stop"]) == (["empty ", "stop"], False, "")


# --- stream_generate with a scripted engine -----------------------------------------------------

class ScriptedEngine:
    """Stands in for Engine: the logits after each call make ``script[i]`` the argmax."""

    def __init__(self, script: list[int], context_length: int = 4096):
        self.script = list(script)
        self.context_length = context_length
        self.fed: list[int] = []
        self.i = 0

    def _logits(self):
        x = np.zeros(V, np.float32)
        x[self.script[self.i]] = 10.0
        self.i += 1
        return x

    def prefill(self, prompt):
        self.fed = list(prompt)
        return self._logits()

    def feed(self, tokens):
        self.fed += tokens
        return self._logits()


PROMPT = [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]


def run(tokenizer, script, **kw):
    engine = ScriptedEngine(script, kw.pop("context_length", 4096))
    chunks = list(stream_generate(engine, tokenizer, PROMPT, SamplingParams(), **kw))
    for c in chunks[:-1]:
        assert c.finish_reason is None
    assert chunks[-1].finish_reason is not None
    for c in chunks:
        assert "\ufffd" not in c.text
    return chunks, engine


def tokens_of(chunks):
    return [c.token for c in chunks if c.token is not None]


@pytest.mark.parametrize("stop_id", [IM_END, ENDOFTEXT])
def test_stop_token_ends_the_turn_and_is_not_emitted(demo_tokenizer, hf_tokenizer, stop_id):
    answer = hf_tokenizer.encode("2 plus 2 is 4 🙂", add_special_tokens=False)
    chunks, engine = run(demo_tokenizer, answer + [stop_id, 100, 101], max_new_tokens=50)
    assert tokens_of(chunks) == answer
    assert "".join(c.text for c in chunks) == "2 plus 2 is 4 🙂"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token is None
    assert chunks[-1].generation_tokens == len(answer)
    assert engine.fed == PROMPT + answer  # the stop token is never fed back


def test_stop_string_across_tokens(demo_tokenizer, hf_tokenizer):
    text = "The answer is 4.\nUser: what about 5?"
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    stop = "\nUser:"
    # the stop string spans several tokens
    pieces = [hf_tokenizer.decode([t]) for t in ids]
    assert not any(stop in p for p in pieces)
    chunks, _ = run(demo_tokenizer, ids + [IM_END], max_new_tokens=100, stop=[stop])
    out = "".join(c.text for c in chunks)
    assert out == text[: text.find(stop)] == "The answer is 4."
    assert chunks[-1].finish_reason == "stop"
    # every piece emitted before the end is final: the running text is a prefix of the answer
    running = ""
    for c in chunks:
        running += c.text
        assert out.startswith(running)


def test_length_finish_and_held_text_flushed(demo_tokenizer, hf_tokenizer):
    ids = hf_tokenizer.encode("one two three four five six seven", add_special_tokens=False)
    chunks, _ = run(demo_tokenizer, ids + [IM_END], max_new_tokens=4)
    assert tokens_of(chunks) == ids[:4]
    assert chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == hf_tokenizer.decode(ids[:4])

    # the text ends with the start of a stop string that never completes: it is released at the end
    ids = hf_tokenizer.encode("value: END", add_special_tokens=False)
    chunks, _ = run(demo_tokenizer, ids + [IM_END], max_new_tokens=len(ids), stop=["END!"])
    assert "".join(c.text for c in chunks) == "value: END"
    assert chunks[-1].finish_reason == "length"
    # and the same when a stop token ends it
    chunks, _ = run(demo_tokenizer, ids + [IM_END], max_new_tokens=100, stop=["END!"])
    assert "".join(c.text for c in chunks) == "value: END"
    assert chunks[-1].finish_reason == "stop"


def test_context_end_finishes_with_length(demo_tokenizer, hf_tokenizer):
    ids = hf_tokenizer.encode(" and so on" * 10, add_special_tokens=False)
    chunks, engine = run(demo_tokenizer, ids, max_new_tokens=100, context_length=len(PROMPT) + 5)
    assert len(tokens_of(chunks)) == 5
    assert chunks[-1].finish_reason == "length"
    assert len(engine.fed) <= engine.context_length


def test_generate_concatenates_the_stream(demo_tokenizer, hf_tokenizer):
    ids = hf_tokenizer.encode("Hello 世界", add_special_tokens=False)
    engine = ScriptedEngine(ids + [IM_END])
    res = generate(engine, demo_tokenizer, PROMPT, SamplingParams(), max_new_tokens=20)
    assert res.token_ids == ids and res.text == "Hello 世界" and res.finish_reason == "stop"
    assert res.prompt_ids == PROMPT


def test_real_engine_runs_to_the_context_end(tiny_factory, text_ids):
    """On a real engine the context end is a 'length' finish, not an error, at any AR."""
    ckpt = load_checkpoint(tiny_factory())
    tok = ckpt.load_tokenizer()
    for ar in (4, 8):
        engine = Engine(TorchBackend(ckpt, context_length=32), prompt_length=ar)
        res = generate(engine, tok, text_ids[:20], SamplingParams(), max_new_tokens=100)
        assert res.finish_reason == "length"
        assert len(res.token_ids) == 12  # 20 + 12 = CL


def test_chat_command_multi_turn_and_reset(tiny_path, monkeypatch, capsys):
    """``qwen-ondevice chat`` with piped input: each reply is transformers' greedy continuation of
    the whole conversation so far (the tokenizer's own template), and ``/reset`` starts over."""
    import io

    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from qwen_ondevice.cli.main import main

    hf_tok = AutoTokenizer.from_pretrained(tiny_path)
    model = Qwen2ForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    stop_ids = [hf_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    def reply(messages):
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
        return hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    first = [{"role": "user", "content": "Hello there"}]
    r1 = reply(first)
    r2 = reply(first + [{"role": "assistant", "content": r1}, {"role": "user", "content": "And then?"}])
    r3 = reply([{"role": "user", "content": "Something else"}])

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd then?\n\n/reset\nSomething else\n/exit\nnever read\n"))
    capsys.readouterr()
    assert main(["chat", str(tiny_path), "--max-new-tokens", "6", "--context-length", "256"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{r1}\n{r2}\n{r3}\n"
    assert "(history cleared)" in err
    assert r1 and r2 and r3 and len({r1, r2, r3}) > 1  # the replies carry text, and the history changes them
