"""The Genie files of a compiled bundle: ``genie_config.json`` and ``htp_backend_ext_config.json``.

Qualcomm's Genie (``genie-t2t-run -c genie_config.json``) reads a *dialog* JSON: context size,
vocabulary, bos/eos/eot tokens, sampler, tokenizer path, and an engine (QnnHtp backend with
``kv-dim``, ``pos-id-dim``, ``rope-theta``; the context binaries in order). The HTP backend
extension file names the device (soc_model, dsp_arch) and turns weight sharing on.

Every value comes from the manifest (model config, context length, the ``qnn`` section) or from
the tokenizer and generation config the bundle carries, never typed a second time. Genie rejects
unknown keys, so the files hold exactly the keys of its schema.

Genie itself runs on this host through :mod:`qwen_ondevice.qnn.genie_run`, and ``verify --genie``
(:mod:`qwen_ondevice.qnn.genie_verify`) checks a bundle with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen_ondevice.core.config import ModelConfig
from qwen_ondevice.core.jsonio import write_json

GENIE_CONFIG = "genie_config.json"
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
    from qwen_ondevice.core.tokenizer import Tokenizer

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


def write_genie_files(root: Path, manifest: dict) -> None:
    """Write both Genie files into the bundle root from ``manifest`` (a dict with the manifest's
    ``model.config``, ``context_length`` and ``qnn`` sections)."""
    cfg = ModelConfig.from_dict({**manifest["model"]["config"], "model_type": "qwen2"})
    doc = genie_config(manifest, token_ids(root, cfg), _generation_config(root))
    for name, obj in ((GENIE_CONFIG, doc), (HTP_EXT_CONFIG, htp_backend_ext_config(manifest["qnn"]))):
        write_json(root / name, obj, indent=2, newline=True)
