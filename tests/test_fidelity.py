"""Generation fidelity (eval/fidelity.py): the prompt set, the comparison arithmetic against hand
counts, code tasks scored from decoded replies, and a tiny fp32 bundle that writes exactly what its
float model writes."""

from __future__ import annotations

import pytest

from qwen_ondevice.eval.code_tasks import load_code_tasks
from qwen_ondevice.eval.fidelity import (CHAT_PROMPTS, FidelityPrompt, compare_continuations, fidelity_prompts,
                                         measure_fidelity, token_limits)


def test_prompt_set_interleaves_code_and_chat_over_shipped_text():
    prompts = fidelity_prompts()
    tasks = load_code_tasks()
    assert len(prompts) == len(tasks) + CHAT_PROMPTS
    assert [p.kind for p in prompts[:6]] == ["code", "chat"] * 3
    assert len({p.id for p in prompts}) == len(prompts)
    chats = [p.messages[-1]["content"] for p in prompts if p.kind == "chat"]
    assert all("@-@" not in c and " , " not in c for c in chats)
    assert len(set(chats)) == CHAT_PROMPTS
    assert fidelity_prompts(5) == prompts[:5]


def test_token_limits_stop_where_the_context_ends():
    assert token_limits([[1] * 10, [1] * 60, [1] * 64], 16, 64) == [16, 4, 0]


def _reply(tok, code: str) -> list[int]:
    return tok.encode("Here it is:\n```python\n" + code + "```\n")


def test_compare_counts_identical_prefixes_and_programs(demo_tokenizer):
    tasks = load_code_tasks(3)
    prompts = [FidelityPrompt(t.id, "code", [], t) for t in tasks] + [FidelityPrompt("chat/0", "chat", [])]
    good = [_reply(demo_tokenizer, t.prompt + t.solution) for t in tasks]
    wrong = _reply(demo_tokenizer, tasks[1].prompt + "    return None\n")
    reference = good + [[5, 6, 7, 8]]
    # task 0 identical; task 1 a wrong program; task 2 another right program; chat differs at index 2
    other = _reply(demo_tokenizer, tasks[2].prompt + tasks[2].solution + "    # unreachable\n")
    bundle = [good[0], wrong, other, [5, 6, 9]]
    r = compare_continuations(prompts, reference, bundle, demo_tokenizer, max_new_tokens=256)
    first_difference = lambda a, b: next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # noqa: E731
    prefixes = [len(good[0]), first_difference(good[1], wrong), first_difference(good[2], other), 2]
    assert [row["prefix"] for row in r.rows] == prefixes
    assert r.identical_share == 0.25
    assert r.prefix_mean == sum(prefixes) / 4
    assert r.per_kind["chat"] == {"prompts": 1, "identical_share": 0.0, "prefix_median": 2.0, "prefix_mean": 2.0}
    c = r.code
    assert (c["tasks"], c["float_passed"], c["bundle_passed"], c["only_float"], c["only_bundle"]) == (3, 3, 2, 1, 0)
    assert c["identical_programs"] == 1
    assert c["mcnemar_p"] == 1.0  # one discordant pair: 2 * P(X <= 0), X ~ Bin(1, 1/2)
    assert r.rows[1]["bundle_passed"] is False and r.rows[0]["bundle_passed"] is True


def test_fp32_bundle_writes_what_its_float_model_writes(tiny_factory, tmp_path, monkeypatch):
    """fp32 ONNX parts on ONNX Runtime compute what the float model computes: every greedy
    continuation identical, and the float continuations come from the cache the second time."""
    from qwen_ondevice.export.options import ExportOptions
    from qwen_ondevice.export.pipeline import export
    from qwen_ondevice.runtime.open_model import open_runtime

    monkeypatch.setenv("QWEN_ONDEVICE_CACHE", str(tmp_path / "cache"))
    ckpt = tiny_factory(layers=2)
    out = tmp_path / "b"
    export(ExportOptions(model=str(ckpt), precision="fp32", prompt_length=32, context_length=320, num_parts=2, eval_tokens=0), out)
    rt = open_runtime(str(out))
    first = measure_fidelity(rt.engine, rt.tokenizer, str(ckpt), prompts=4, max_new_tokens=12)
    assert first.prompts + first.skipped == 4 and first.prompts >= 2
    assert first.identical_share == 1.0
    assert first.prefix_mean == pytest.approx(sum(r["reference_tokens"] for r in first.rows) / first.prompts)
    assert first.code["only_float"] == first.code["only_bundle"] == 0
    assert len(list((tmp_path / "cache" / "fidelity").glob("*.json"))) == 1
    again = measure_fidelity(rt.engine, rt.tokenizer, str(ckpt), prompts=4, max_new_tokens=12)
    assert again.rows == first.rows


def test_interrupted_float_run_goes_on_from_what_it_finished(tiny_factory, tmp_path, monkeypatch):
    """The float continuations are saved prompt by prompt: a run that dies after the first goes
    on with the other two only, and the result equals an uninterrupted run."""
    from qwen_ondevice.eval import fidelity
    from qwen_ondevice.runtime.open_model import open_runtime

    monkeypatch.setenv("QWEN_ONDEVICE_CACHE", str(tmp_path / "cache"))
    ckpt = str(tiny_factory(layers=2))
    tok = open_runtime(ckpt, "torch", context_length=512).tokenizer
    ids = [tok.apply_chat_template(p.messages) for p in fidelity_prompts(3)]
    limits = [6, 6, 6]
    whole = fidelity.reference_continuations(ckpt, ids, limits)
    for f in (tmp_path / "cache" / "fidelity").glob("*.json"):
        f.unlink()

    calls = []
    real = fidelity.greedy_continuations

    def dies_after_one(engine, tokenizer, prompt_ids, lims, desc, on_each=None):
        calls.append(len(prompt_ids))
        def first_only(out):
            on_each(out)
            raise KeyboardInterrupt
        return real(engine, tokenizer, prompt_ids, lims, desc, first_only)

    monkeypatch.setattr(fidelity, "greedy_continuations", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        fidelity.reference_continuations(ckpt, ids, limits)
    monkeypatch.setattr(fidelity, "greedy_continuations",
                        lambda e, t, p, lims, desc, on_each=None: calls.append(len(p)) or real(e, t, p, lims, desc, on_each))
    assert fidelity.reference_continuations(ckpt, ids, limits) == whole
    assert calls == [3, 2]


def test_float_continuations_are_reused_across_prompt_sets_and_shorter_limits(tiny_factory, tmp_path, monkeypatch):
    """A prompt's float continuation is cached by its own token ids: a later set that holds it (in
    another place, beside new prompts) or asks for fewer tokens runs the float model only for what
    the cache cannot answer, and each answer equals a run from an empty cache."""
    from qwen_ondevice.eval import fidelity
    from qwen_ondevice.runtime.open_model import open_runtime

    monkeypatch.setenv("QWEN_ONDEVICE_CACHE", str(tmp_path / "cache"))
    ckpt = str(tiny_factory(layers=2))
    tok = open_runtime(ckpt, "torch", context_length=512).tokenizer
    ids = [tok.apply_chat_template(p.messages) for p in fidelity_prompts(4)]
    first = fidelity.reference_continuations(ckpt, ids[:2], [10, 10])
    real, ran = fidelity.greedy_continuations, []
    monkeypatch.setattr(fidelity, "greedy_continuations",
                        lambda e, t, p, lims, desc, on_each=None: ran.append(p) or real(e, t, p, lims, desc, on_each))
    mixed = fidelity.reference_continuations(ckpt, [ids[3], ids[1], ids[0]], [10, 4, 12])
    assert ran == [[ids[3]] + ([ids[0]] if len(first[0]) == 10 else [])]  # ids[0] again only if it ran to its limit
    assert mixed[1] == first[1][:4]
    for f in (tmp_path / "cache" / "fidelity").glob("*.json"):
        f.unlink()
    monkeypatch.setattr(fidelity, "greedy_continuations", real)
    assert fidelity.reference_continuations(ckpt, [ids[3], ids[1], ids[0]], [10, 4, 12]) == mixed
