"""The Genie files of a compiled bundle: ``genie_config.json`` and ``htp_backend_ext_config.json``.

Qualcomm's Genie (``genie-t2t-run -c genie_config.json``) reads a *dialog* JSON: context size,
vocabulary, bos/eos/eot tokens, sampler, tokenizer path, and an engine (QnnHtp backend with
``kv-dim``, ``pos-id-dim``, ``rope-theta``; the context binaries in order). The HTP backend
extension file names the device (soc_model, dsp_arch) and turns weight sharing on.

A bundle with a verify graph (``export --verify-tokens K``) also gets ``genie_config_lade.json``:
Genie's lookahead dialog (``lade``) over the same engine, with ngram 2, the one setting that kept
Genie 1.21's output equal to plain greedy decoding in our simulator runs (its warm-up KV is never
rolled back at larger n-grams), window + gcap = the verify graph's AR (lade needs
AR >= (ngram - 1)(window + gcap)). Genie's draft-model dialog (``spd``) is not written by the
export: it is not lossless in Genie 1.21 (after a rejected draft token the kept cache slot holds
the rejected token's K/V, so the text departs from plain greedy decoding). Given a draft bundle,
:func:`write_spd_config` (``qwen-ondevice genie-spd``) writes it as ``genie_config_spd.json`` for
those who want Genie's own speculative decoding anyway: two engines with the roles ``target`` and
``draft``, ``"spd": {"version": 1, "draft-len": k}`` with k + 1 at most the target's verify AR.

Every value comes from the manifest (model config, context length, the ``qnn`` section) or from
the tokenizer and generation config the bundle carries, never typed a second time. Genie rejects
unknown keys, so the files hold exactly the keys of its schema.

Genie itself runs on this host through :mod:`qwen_ondevice.qnn.genie_run`, and ``verify --genie``
(:mod:`qwen_ondevice.eval.genie_verify`) checks a bundle with it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from qwen_ondevice.core.bundle import MANIFEST
from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.errors import UserError
from qwen_ondevice.core.files import sha256_file
from qwen_ondevice.core.jsonio import write_json
from qwen_ondevice.core.tokenizer import Tokenizer

GENIE_CONFIG = "genie_config.json"
GENIE_LADE_CONFIG = "genie_config_lade.json"
GENIE_SPD_CONFIG = "genie_config_spd.json"
#: Genie lookahead n-gram size: 2 is the setting measured lossless in Genie 1.21 (module docstring).
LADE_NGRAM = 2
HTP_EXT_CONFIG = "htp_backend_ext_config.json"
END_OF_TURN = "<|im_end|>"  # Qwen2's chat end-of-turn token


def token_ids(root: Path, cfg: ModelConfig) -> dict:
    """bos, the stop (eos) ids and the end-of-turn id for Genie, from the tokenizer and
    generation config the bundle carries (:class:`qwen_ondevice.core.tokenizer.Tokenizer`).

    Genie prepends ``bos-token`` to every query unless it is -1, and tokenizes the query text
    without special tokens. So ``bos`` is the tokenizer's BOS only where the tokenizer itself adds
    it in front of text (Llama-2 style); otherwise -1: Qwen2's chat template starts with
    ``<|im_start|>`` and nothing before it (AI Hub's Qwen2-7B config also gives -1).
    """
    gen = _generation_config(root)
    tok = Tokenizer.from_folder(root, cfg, gen)
    plain, special = tok.encode("x"), tok.encode("x", add_special_tokens=True)
    added = special[: len(special) - len(plain)] if special[len(special) - len(plain):] == plain else []
    bos = tok.token_id((tok.special_tokens or {}).get("bos_token"))
    eot = tok.token_id(END_OF_TURN)
    if eot is None:
        eot = tok.stop_ids[0] if tok.stop_ids else None
    return {"bos": int(bos) if bos is not None and added == [bos] else -1, "eos": list(tok.stop_ids), "eot": eot}


def _generation_config(root: Path) -> dict:
    p = root / "generation_config.json"
    return json.loads(p.read_text()) if p.exists() else {}


def sampler_defaults(gen: dict) -> dict:
    """Genie sampler from ``generation_config.json`` (transformers' defaults where absent:
    greedy unless ``do_sample``, temperature 1.0, top-k 50, top-p 1.0)."""
    s = {
        "version": 1,
        "greedy": not bool(gen.get("do_sample", False)),
        "temp": float(gen.get("temperature", 1.0)),
        "top-k": int(gen.get("top_k", 50)),
        "top-p": float(gen.get("top_p", 1.0)),
    }
    rp = gen.get("repetition_penalty")
    if rp is not None and float(rp) != 1.0:
        s["token-penalty"] = {"version": 1, "repetition-penalty": float(rp)}
    return s


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def genie_config(manifest: dict, ids: dict, gen: dict) -> dict:
    """The dialog JSON for ``manifest`` (needs ``model.config``, ``context_length``, ``qnn``)."""
    c = manifest["model"]["config"]
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    qnn = manifest["qnn"]
    context = {"version": 1, "size": int(manifest["context_length"]), "n-vocab": int(c["vocab_size"]),
               "bos-token": int(ids["bos"]), "eos-token": ids["eos"]}
    if ids["eot"] is not None:
        context["eot-token"] = ids["eot"]
    return {
        "dialog": {
            "version": 1,
            "type": "basic",
            "context": context,
            "sampler": sampler_defaults(gen),
            "tokenizer": {"version": 1, "path": "tokenizer.json"},
            "engine": {
                "version": 1,
                "n-threads": 3,
                "backend": {
                    "version": 1,
                    "type": "QnnHtp",
                    "QnnHtp": {
                        "version": 1,
                        "spill-fill-bufsize": 0,
                        "use-mmap": True,
                        "mmap-budget": 0,
                        "poll": True,
                        "cpu-mask": "0xe0",
                        "kv-dim": head_dim,
                        "pos-id-dim": head_dim // 2,
                        "rope-theta": _number(c["rope_theta"]),
                        "allow-async-init": False,
                    },
                    "extensions": HTP_EXT_CONFIG,
                },
                "model": {
                    "version": 1,
                    "type": "binary",
                    "binary": {"version": 1, "ctx-bins": [p["bin"] for p in qnn["parts"]]},
                },
            },
        }
    }


def htp_backend_ext_config(qnn: dict) -> dict:
    """The HTP backend extension config: the device, shared-buffer memory, weight sharing on."""
    return {
        "devices": [{"soc_model": int(qnn["soc_model"]), "dsp_arch": qnn["dsp_arch"],
                     "cores": [{"core_id": 0, "perf_profile": "burst", "rpc_control_latency": 100}]}],
        "memory": {"mem_type": "shared_buffer"},
        "context": {"weight_sharing_enabled": bool(qnn.get("weight_sharing", True))},
    }


def verify_graph_ar(qnn: dict) -> int | None:
    """The AR of the parts' verify graph (between AR-1 and the prompt processor), or None."""
    ars = sorted(int(a) for a in qnn["parts"][0]["graphs"])
    return next((a for a in ars if 1 < a < ars[-1]), None)


def lade_config(doc: dict, verify_ar: int) -> dict:
    """Genie's lookahead dialog over the basic dialog ``doc``: ngram :data:`LADE_NGRAM`, window
    and gcap splitting ``verify_ar`` (window the larger half, gcap at least 1).

    Raises:
        ValueError: ``verify_ar`` < 2 (lookahead needs a window and a guess).
    """
    if verify_ar < 2:
        raise ValueError(f"lookahead needs a graph of AR >= 2, got AR-{verify_ar}")
    window = (verify_ar + 1) // 2
    d = json.loads(json.dumps(doc))
    d["dialog"]["type"] = "lade"
    d["dialog"]["lade"] = {"version": 1, "window": window, "ngram": LADE_NGRAM, "gcap": verify_ar - window}
    return d


def write_genie_files(root: Path, manifest: dict) -> None:
    """Write the Genie files into the bundle root from ``manifest`` (a dict with the manifest's
    ``model.config``, ``context_length`` and ``qnn`` sections): the basic dialog, the HTP
    extension config and, with a verify graph, the lookahead dialog."""
    cfg = ModelConfig.from_dict({**manifest["model"]["config"], "model_type": "qwen2"})
    doc = genie_config(manifest, token_ids(root, cfg), _generation_config(root))
    files = [(GENIE_CONFIG, doc), (HTP_EXT_CONFIG, htp_backend_ext_config(manifest["qnn"]))]
    verify_ar = verify_graph_ar(manifest["qnn"])
    if verify_ar is not None:
        files.append((GENIE_LADE_CONFIG, lade_config(doc, verify_ar)))
    for name, obj in files:
        write_json(root / name, obj, indent=2, newline=True)


def spd_config(doc: dict, draft_doc: dict, draft_len: int, draft_dir: str) -> dict:
    """Genie's draft-model dialog (``spd``) over the target's basic dialog ``doc`` and the draft's
    ``draft_doc``: the target's context, sampler and tokenizer; the two engines with ``role``
    ``target`` and ``draft``; the draft's ``ctx-bins`` and backend extensions prefixed with
    ``draft_dir`` (the draft bundle's folder as Genie will resolve it: relative to the working
    directory, which is the target bundle for ``genie-t2t-run``); ``draft-n-vocab`` where the
    vocabularies differ. The schema is libGenie's (Genie 1.21): ``engine`` a list of exactly one
    target and one draft, ``spd`` only ``version`` and ``draft-len``.

    Raises:
        ValueError: ``draft_len`` < 1.
    """
    if draft_len < 1:
        raise ValueError(f"spd needs draft-len >= 1, got {draft_len}")
    d = copy.deepcopy(doc)
    target = d["dialog"]["engine"]
    draft = copy.deepcopy(draft_doc["dialog"]["engine"])
    binary = draft["model"]["binary"]
    binary["ctx-bins"] = [f"{draft_dir}/{b}" for b in binary["ctx-bins"]]
    if "extensions" in draft["backend"]:
        draft["backend"]["extensions"] = f"{draft_dir}/{draft['backend']['extensions']}"
    d["dialog"]["type"] = "spd"
    d["dialog"]["spd"] = {"version": 1, "draft-len": int(draft_len)}
    d["dialog"]["engine"] = [{"role": "target", **target}, {"role": "draft", **draft}]
    draft_vocab = draft_doc["dialog"]["context"]["n-vocab"]
    if draft_vocab != d["dialog"]["context"]["n-vocab"]:
        d["dialog"]["context"]["draft-n-vocab"] = draft_vocab
    return d


def write_spd_config(root: Path, draft_root: Path, draft_len: int | None = None) -> Path:
    """Write ``genie_config_spd.json`` into the compiled bundle ``root`` with the compiled bundle
    ``draft_root`` as Genie's draft (:func:`spd_config`); returns its path. ``draft_len`` defaults
    to what the target's verify graph takes (its AR - 1). Not lossless in Genie 1.21 (module
    docstring).

    Raises:
        UserError: either bundle has no Genie config (not compiled), the target has no verify graph
            (``export --verify-tokens K``) or one too small for ``draft_len``, the two context
            lengths differ (Genie's dialog has one), or their tokenizers differ (Genie tokenizes
            once, for both).
    """
    root, draft_root = Path(root), Path(draft_root)
    docs = {}
    for name, folder in (("bundle", root), ("draft", draft_root)):
        f = folder / GENIE_CONFIG
        if not f.is_file():
            raise UserError(f"{folder}: no {GENIE_CONFIG}; the {name} must be a compiled bundle (export with a --chipset)")
        docs[name] = json.loads(f.read_text())
    manifest = json.loads((root / MANIFEST).read_text())
    verify_ar = verify_graph_ar(manifest["qnn"])
    if verify_ar is None:
        raise UserError(f"{root} has no verify graph; Genie's spd needs a target graph of AR >= draft-len + 1: "
                        "export it with --verify-tokens K")
    draft_len = verify_ar - 1 if draft_len is None else draft_len
    if not 1 <= draft_len <= verify_ar - 1:
        raise UserError(f"--draft-len {draft_len}: the verify graph of {root} is AR-{verify_ar}, so 1 to {verify_ar - 1}")
    sizes = [docs[k]["dialog"]["context"]["size"] for k in ("bundle", "draft")]
    if sizes[0] != sizes[1]:
        raise UserError(f"context lengths differ: {root} CL {sizes[0]}, draft {draft_root} CL {sizes[1]}; "
                        "Genie's spd dialog has one context: export the draft with --context-length "
                        f"{sizes[0]}")
    tokenizers = [folder / "tokenizer.json" for folder in (root, draft_root)]
    if sha256_file(tokenizers[0]) != sha256_file(tokenizers[1]):
        raise UserError(f"{tokenizers[1]} differs from {tokenizers[0]}: the draft must use the target's tokenizer")
    draft_dir = Path(os.path.relpath(draft_root.resolve(), root.resolve())).as_posix()
    out = root / GENIE_SPD_CONFIG
    write_json(out, spd_config(docs["bundle"], docs["draft"], draft_len, draft_dir), indent=2, newline=True)
    return out
