"""Generation fidelity: what a bundle writes when it runs free, against what its float model writes.

Perplexity, top-1 agreement and KL score one token at a time with the float model's text as
context. In free-running generation one different token changes everything after it, and in code
one wrong token breaks the program; this module measures that directly:

- the same chat prompts (code tasks from ``data/code_tasks.json`` and questions over passages of the
  shipped WikiText-2 test text) are answered greedily, up to ``max_new_tokens``, by the float model
  (torch backend, float32) and by the bundle (its engine, as in ``generate``);
- per prompt: whether the two continuations are identical token for token, and how many tokens
  they share before the first difference;
- per code task: whether each model's program passes the task's unit tests (run only in a
  subprocess with limits, ``eval.code_tasks``), with Wilson intervals for both pass rates and the
  exact McNemar test of the paired difference (``eval.stats``).

Greedy decoding makes the measure deterministic; the float continuations are cached per prompt
(they do not depend on the bundle, nor on the other prompts of the set) under
``$QWEN_ONDEVICE_CACHE/fidelity/``.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen_ondevice.core.checkpoint import load_checkpoint
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.files import cache_dir
from qwen_ondevice.core.jsonio import write_json
from qwen_ondevice.core.progress import bar
from qwen_ondevice.core.texts import default_evaluation_text
from qwen_ondevice.eval.code_tasks import CodeTask, extract_program, load_code_tasks, run_programs, task_messages
from qwen_ondevice.eval.stats import mcnemar_exact, wilson_interval
from qwen_ondevice.runtime.generate import generate
from qwen_ondevice.runtime.open_model import open_runtime

DEFAULT_MAX_NEW_TOKENS = 256
#: Chat prompts built over passages of the shipped WikiText-2 test text (one per passage, in turn).
CHAT_TEMPLATES = (
    "Summarize the following passage in two sentences.\n\n{passage}",
    "What is the main topic of this passage? Answer in one short paragraph.\n\n{passage}",
    "Write three questions a reader can answer from this passage, each followed by its answer.\n\n{passage}",
    "Explain this passage in plain words to a ten-year-old.\n\n{passage}",
)
CHAT_PROMPTS = 40
#: Passage length in words (WikiText-2 paragraphs outside this range are skipped).
PASSAGE_WORDS = (60, 160)
#: Bumped when the decoding or the cache's format changes, so cached float continuations are redone.
CACHE_VERSION = 2


@dataclass(frozen=True)
class FidelityPrompt:
    """One prompt of the measure: ``kind`` 'code' (with its :class:`CodeTask`) or 'chat'."""

    id: str
    kind: str
    messages: list[dict]
    task: CodeTask | None = None


def _clean_wikitext(line: str) -> str:
    """WikiText's tokenized spacing (`` @-@ ``, `` , ``, `` ( x ) ``) back to plain text."""
    s = re.sub(r" @(.)@ ", r"\1", line.strip())
    s = re.sub(r" ([,.;:!?)\]'])", r"\1", s)
    s = re.sub(r"([(\[]) ", r"\1", s)
    return s.replace(" n't", "n't").replace(" 's", "'s")


def chat_passages(n: int, text: Path | None = None) -> list[str]:
    """The first ``n`` paragraphs of ``text`` (default: the shipped WikiText-2 test text) whose
    length is within :data:`PASSAGE_WORDS`, headings skipped, spacing cleaned.

    Raises:
        UserError: the text holds fewer than ``n`` such paragraphs.
    """
    out = []
    for line in (text or default_evaluation_text()).read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("=") or not PASSAGE_WORDS[0] <= len(line.split()) <= PASSAGE_WORDS[1]:
            continue
        out.append(_clean_wikitext(line))
        if len(out) == n:
            return out
    raise UserError(f"{text}: only {len(out)} paragraphs of {PASSAGE_WORDS[0]}-{PASSAGE_WORDS[1]} words, {n} needed")


def fidelity_prompts(limit: int | None = None) -> list[FidelityPrompt]:
    """The measure's prompts: every shipped code task and :data:`CHAT_PROMPTS` chat prompts,
    interleaved (code, chat, code, chat, ... then the remaining code tasks), so that the first
    ``limit`` hold both kinds. Deterministic."""
    code = [FidelityPrompt(t.id, "code", task_messages(t), t) for t in load_code_tasks()]
    chat = [FidelityPrompt(f"chat/{i:03d}", "chat",
                           [{"role": "user", "content": CHAT_TEMPLATES[i % len(CHAT_TEMPLATES)].format(passage=p)}])
            for i, p in enumerate(chat_passages(CHAT_PROMPTS))]
    mixed = [p for pair in zip(code, chat) for p in pair] + code[len(chat):] + chat[len(code):]
    return mixed[:limit] if limit is not None else mixed


def greedy_continuations(engine, tokenizer, prompt_ids: list[list[int]], limits: list[int],
                         desc: str, on_each=None) -> list[list[int]]:
    """Greedy token ids (stop token excluded) after each prompt, at most ``limits[i]`` new tokens
    for prompt ``i``: one list per prompt. ``on_each(out)`` is called with the list so far after
    each prompt."""
    out: list[list[int]] = []
    with bar(total=len(prompt_ids), desc=desc, unit="prompt") as progress:
        for ids, limit in zip(prompt_ids, limits, strict=True):
            out.append(generate(engine, tokenizer, ids, max_new_tokens=limit).token_ids)
            if on_each is not None:
                on_each(out)
            progress.update()
    return out


def token_limits(prompt_ids: list[list[int]], max_new_tokens: int, context_length: int) -> list[int]:
    """New tokens allowed after each prompt: ``max_new_tokens``, or what the context length leaves
    (the bundle stops there, so the float model is stopped there too); 0 for a prompt that does
    not fit (it is skipped)."""
    return [max(0, min(max_new_tokens, context_length - len(ids))) for ids in prompt_ids]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class FidelityReport:
    """Generation fidelity of a bundle against its float model (see the module docstring).

    prompts: how many (code and chat); identical_share: continuations identical token for token;
    prefix_median / prefix_mean: tokens shared before the first difference (the whole length when
    identical); per_kind: the same per kind; code: pass counts with 95% Wilson intervals, the
    discordant pairs and the exact McNemar p-value; rows: per prompt, for analysis.
    """

    prompts: int
    max_new_tokens: int
    skipped: int
    identical_share: float
    prefix_median: float
    prefix_mean: float
    per_kind: dict
    code: dict
    seconds: float
    rows: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self, rows: bool = True) -> dict:
        d = asdict(self)
        if not rows:
            d.pop("rows")
        return d

    def format(self) -> str:
        c = self.code
        lines = [f"generation fidelity over {self.prompts} prompts (greedy, up to {self.max_new_tokens} new tokens"
                 + (f"; {self.skipped} prompts longer than the context skipped" if self.skipped else "") + "): "
                 f"{100 * self.identical_share:.1f}% identical to the float model's continuations, "
                 f"first difference after {self.prefix_median:.0f} tokens (median; mean {self.prefix_mean:.1f})"]
        for kind, k in self.per_kind.items():
            lines.append(f"  {kind}: {k['prompts']} prompts, {100 * k['identical_share']:.1f}% identical, "
                         f"median {k['prefix_median']:.0f} / mean {k['prefix_mean']:.1f} tokens before the first difference")
        if c.get("tasks"):
            fl, bl = c["float_interval"], c["bundle_interval"]
            lines.append(f"  code tasks passed: float {c['float_passed']}/{c['tasks']} ({100 * fl[0]:.0f}-{100 * fl[1]:.0f}%), "
                         f"bundle {c['bundle_passed']}/{c['tasks']} ({100 * bl[0]:.0f}-{100 * bl[1]:.0f}%) [95% Wilson]; "
                         f"only float {c['only_float']}, only bundle {c['only_bundle']}, McNemar exact p = {c['mcnemar_p']:.3g}; "
                         f"identical programs {c['identical_programs']}")
        return "\n".join(lines)


def _summary(rows: list[dict]) -> dict:
    prefixes = [r["prefix"] for r in rows]
    return {"prompts": len(rows), "identical_share": sum(r["identical"] for r in rows) / max(len(rows), 1),
            "prefix_median": float(statistics.median(prefixes)) if prefixes else 0.0,
            "prefix_mean": float(statistics.fmean(prefixes)) if prefixes else 0.0}


def compare_continuations(prompts: list[FidelityPrompt], reference: list[list[int]], bundle: list[list[int]],
                          tokenizer, max_new_tokens: int, seconds: float = 0.0, skipped: int = 0,
                          timeout_s: float = 10.0) -> FidelityReport:
    """Compare the float model's and the bundle's continuations (token id lists, one per prompt)
    and score the code tasks' programs in subprocesses (``timeout_s`` each)."""
    rows = []
    for p, r, b in zip(prompts, reference, bundle, strict=True):
        rows.append({"id": p.id, "kind": p.kind, "reference_tokens": len(r), "bundle_tokens": len(b),
                     "identical": r == b, "prefix": _common_prefix(r, b)})
    code = [(i, p) for i, p in enumerate(prompts) if p.kind == "code"]
    code_report: dict = {"tasks": len(code)}
    if code:
        progs_f = [extract_program(p.task, tokenizer.decode(reference[i])) for i, p in code]
        progs_b = [extract_program(p.task, tokenizer.decode(bundle[i])) for i, p in code]
        tasks = [p.task for _, p in code]
        res = run_programs(tasks + tasks, progs_f + progs_b, timeout_s=timeout_s)
        pass_f = [ok for ok, _ in res[: len(code)]]
        pass_b = [ok for ok, _ in res[len(code):]]
        for (i, _), pf, pb, (_, why) in zip(code, pass_f, pass_b, res[len(code):]):
            rows[i].update(reference_passed=pf, bundle_passed=pb, bundle_reason=why)
        only_f = sum(f and not b for f, b in zip(pass_f, pass_b))
        only_b = sum(b and not f for f, b in zip(pass_f, pass_b))
        n = len(code)
        code_report.update(float_passed=sum(pass_f), bundle_passed=sum(pass_b),
                           float_interval=list(wilson_interval(sum(pass_f), n)),
                           bundle_interval=list(wilson_interval(sum(pass_b), n)),
                           only_float=only_f, only_bundle=only_b, mcnemar_p=mcnemar_exact(only_f, only_b),
                           identical_programs=sum(a == b for a, b in zip(progs_f, progs_b)))
    total = _summary(rows)
    kinds = {k: _summary([r for r in rows if r["kind"] == k]) for k in ("code", "chat") if any(r["kind"] == k for r in rows)}
    return FidelityReport(total["prompts"], max_new_tokens, skipped, total["identical_share"], total["prefix_median"],
                          total["prefix_mean"], kinds, code_report, round(seconds, 1), rows)


def _model_key(model_path: Path) -> str:
    """Cache key of a float model: the checkpoint's files (name, size, mtime), its path and
    :data:`CACHE_VERSION`."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_path.iterdir()
                   if f.is_file() and f.suffix in (".safetensors", ".json"))
    blob = json.dumps([CACHE_VERSION, str(model_path.resolve()), files]).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _prompt_key(ids: list[int]) -> str:
    """Cache key of one prompt: its token ids."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:24]


def _cached(entry: dict | None, limit: int) -> list[int] | None:
    """The greedy continuation of at most ``limit`` tokens that a cache ``entry`` ({"limit",
    "tokens"}) answers, or None. Greedy decoding is prefix-consistent: a continuation run to a
    larger limit, cut at ``limit``, is the continuation run to ``limit``, and one that stopped
    before its limit (a stop token) is complete."""
    if entry is None:
        return None
    tokens, ran_to = entry["tokens"], entry["limit"]
    if limit <= ran_to or len(tokens) < ran_to:
        return tokens[:limit]
    return None


def _read_cache(path: Path) -> dict:
    return json.loads(path.read_text())["continuations"] if path.is_file() else {}


def reference_continuations(model: str, prompt_ids: list[list[int]], limits: list[int]) -> list[list[int]]:
    """The float model's greedy continuations (torch backend, float32; :func:`greedy_continuations`),
    one list of token ids per prompt, at most ``limits[i]`` tokens for prompt ``i``.

    Cached per prompt, whatever set it was run in (``$QWEN_ONDEVICE_CACHE/fidelity/<model key>.json``,
    keyed by the prompt's token ids, with the limit each was run to): the float model runs only for
    the prompts the cache cannot answer (:func:`_cached`), and each continuation is saved as soon
    as it is done, so an interrupted run goes on from there. The torch backend attends over the
    filled cache slots only, so a continuation does not depend on the other prompts of the set.

    Raises:
        UserError: MODEL cannot be loaded (see ``core.checkpoint.load_checkpoint``).
    """
    ckpt = load_checkpoint(model)
    path = cache_dir() / "fidelity" / f"{_model_key(ckpt.path)}.json"
    keys = [_prompt_key(ids) for ids in prompt_ids]
    cache = _read_cache(path)
    out = [_cached(cache.get(k), n) for k, n in zip(keys, limits, strict=True)]
    todo = [i for i, got in enumerate(out) if got is None]
    if not todo:
        return out
    context = max(len(prompt_ids[i]) + limits[i] for i in todo) + 1
    rt = open_runtime(str(ckpt.path), "torch", context_length=min(ckpt.config.max_position_embeddings, max(context, 256)))
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(done: list[list[int]]) -> None:  # the newest continuation, merged with what another run saved
        i = todo[len(done) - 1]
        merged = _read_cache(path)
        merged[keys[i]] = {"limit": limits[i], "tokens": done[-1]}
        write_json(path, {"model": model, "continuations": merged})

    got = greedy_continuations(rt.engine, rt.tokenizer, [prompt_ids[i] for i in todo], [limits[i] for i in todo],
                               "[fidelity] float", on_each=save)
    for i, tokens in zip(todo, got):
        out[i] = tokens
    return out


def measure_fidelity(engine, tokenizer, reference_model: str, prompts: int | None = None,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> FidelityReport:
    """Generation fidelity of a bundle's ``engine`` against ``reference_model`` (its float source)
    over the first ``prompts`` of :func:`fidelity_prompts` (all when None); prompts that leave no
    room in the bundle's context are skipped and counted.

    A report of 0 prompts (all skipped) is returned when none fits the context.

    Raises:
        UserError: ``prompts`` or ``max_new_tokens`` below 1, or a reference that cannot be loaded.
    """
    if prompts is not None and prompts < 1:
        raise UserError(f"--fidelity-prompts must be at least 1, got {prompts}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    chosen = fidelity_prompts(prompts)
    ids = [tokenizer.apply_chat_template(p.messages) for p in chosen]
    limits = token_limits(ids, max_new_tokens, engine.context_length)
    keep = [i for i, n in enumerate(limits) if n > 0]
    if not keep:
        return compare_continuations([], [], [], tokenizer, max_new_tokens, 0.0, len(chosen))
    skipped = len(chosen) - len(keep)
    chosen, ids, limits = [chosen[i] for i in keep], [ids[i] for i in keep], [limits[i] for i in keep]
    t0 = time.perf_counter()
    ref = reference_continuations(reference_model, ids, limits)
    got = greedy_continuations(engine, tokenizer, ids, limits, "[fidelity] bundle")
    return compare_continuations(chosen, ref, got, tokenizer, max_new_tokens, time.perf_counter() - t0, skipped)
