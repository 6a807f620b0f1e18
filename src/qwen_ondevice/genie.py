"""The Genie files of a compiled bundle: ``genie_config.json`` and ``htp_backend_ext_config.json``.

Qualcomm's Genie (``genie-t2t-run -c genie_config.json``) reads a *dialog* JSON: context size,
vocabulary, bos/eos/eot tokens, sampler, tokenizer path, and an engine (QnnHtp backend with
``kv-dim``, ``pos-id-dim``, ``rope-theta``; the context binaries in order). The HTP backend
extension file names the device (soc_model, dsp_arch) and turns weight sharing on.

Every value comes from the manifest (model config, context length, the ``qnn`` section) or from
the tokenizer and generation config the bundle carries, never typed a second time. Genie rejects
unknown keys, so the files hold exactly the keys of its schema.

:func:`probe_genie` (the stretch of issue 5) loads the config with the ``libGenie.so`` that the
``onnxruntime-qnn`` wheel carries, in a child process that cannot take the caller down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .config import ModelConfig

GENIE_CONFIG = "genie_config.json"
HTP_EXT_CONFIG = "htp_backend_ext_config.json"
END_OF_TURN = "<|im_end|>"  # Qwen2's chat end-of-turn token


def token_ids(root: Path, cfg: ModelConfig) -> dict:
    """bos, the stop (eos) ids and the end-of-turn id, as the host runtime sees them
    (:class:`qwen_ondevice.tokenizer.Tokenizer`: generation_config, config and tokenizer)."""
    from .tokenizer import Tokenizer

    gen = _generation_config(root)
    tok = Tokenizer.from_folder(root, cfg, gen)
    bos = gen.get("bos_token_id", cfg.bos_token_id)
    if bos is None:
        bos = tok.hf.bos_token_id
    vocab = tok.hf.get_vocab()
    eot = vocab.get(END_OF_TURN, tok.stop_ids[0] if tok.stop_ids else None)
    return {"bos": int(bos) if bos is not None else None, "eos": list(tok.stop_ids), "eot": eot}


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
    context = {"version": 1, "size": int(manifest["context_length"]), "n-vocab": int(c["vocab_size"])}
    if ids["bos"] is not None:
        context["bos-token"] = ids["bos"]
    context["eos-token"] = ids["eos"]
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
        tmp = root / (name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, root / name)


# ---------------------------------------------------------------------------------------------
# Genie on the host (experiment): libGenie.so from the onnxruntime-qnn wheel, in a child process


def genie_library() -> Path | None:
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    lib = Path(onnxruntime_qnn.__file__).parent / "libGenie.so"
    return lib if lib.exists() else None


def probe_genie(root: Path, prompt: str | None = None, timeout: float = 600.0, config: dict | None = None) -> dict:
    """Load the bundle's genie_config.json (or ``config``) with libGenie in a child process.

    Returns ``{"config_status": int | None, "dialog_status": ..., "answer": ..., "exit": int,
    "log": str}``: ``config_status`` is GenieDialogConfig_createFromJson's status (0 = accepted);
    with ``prompt``, the dialog is created and queried (both may fail, or crash the child: then
    ``exit`` is the signal and the log tail tells how far it got).
    """
    lib = genie_library()
    if lib is None:
        return {"config_status": None, "exit": None, "log": "libGenie.so not found (onnxruntime-qnn missing)"}
    text = json.dumps(config) if config is not None else (root / GENIE_CONFIG).read_text()
    env = dict(os.environ)
    libdirs = [str(lib.parent), str(lib.parent.parent / "onnxruntime_qnn.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    env["ADSP_LIBRARY_PATH"] = str(lib.parent)
    spec = json.dumps({"lib": str(lib), "config": text, "prompt": prompt})
    try:
        proc = subprocess.run([sys.executable, "-c", _GENIE_CHILD], input=spec.encode(), cwd=str(root), env=env,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"config_status": None, "exit": "timeout", "log": ((e.stderr or b"") + (e.stdout or b"")).decode(errors="replace")[-4000:]}
    result = {"exit": proc.returncode, "log": (proc.stderr + proc.stdout).decode(errors="replace")[-4000:]}
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("GENIE_RESULT "):
            result.update(json.loads(line[len("GENIE_RESULT "):]))
    return result


#: The child: ctypes calls into libGenie (GenieDialogConfig_createFromJson, GenieDialog_create,
#: GenieDialog_query). Prints one ``GENIE_RESULT {json}`` line per step so a crash later still
#: leaves the earlier results.
_GENIE_CHILD = r"""
import ctypes, json, sys
spec = json.loads(sys.stdin.read())
lib = ctypes.CDLL(spec["lib"], mode=ctypes.RTLD_GLOBAL)
res = {}
def report(**kw):
    res.update(kw)
    print("GENIE_RESULT " + json.dumps(res), flush=True)
cfg = ctypes.c_void_p()
lib.GenieDialogConfig_createFromJson.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
st = lib.GenieDialogConfig_createFromJson(spec["config"].encode(), ctypes.byref(cfg))
report(config_status=int(st))
if st == 0 and spec.get("prompt"):
    dialog = ctypes.c_void_p()
    lib.GenieDialog_create.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    st = lib.GenieDialog_create(cfg, ctypes.byref(dialog))
    report(dialog_status=int(st))
    if st == 0:
        pieces = []
        CB = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p)
        def on_text(text, sentence_code, user):
            if text:
                pieces.append(text.decode("utf-8", "replace"))
        cb = CB(on_text)
        lib.GenieDialog_query.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, CB, ctypes.c_void_p]
        st = lib.GenieDialog_query(dialog, spec["prompt"].encode(), 0, cb, None)
        report(query_status=int(st), answer="".join(pieces))
"""
