"""Running a model: opening a MODEL (bundle, checkpoint, GGUF, demo), the engine (KV cache,
prefill, decode), the backends (torch, ort-cpu, qnn-htp), sampling and the streaming
generation loop. Imports nothing from :mod:`qwen_ondevice.export` or
:mod:`qwen_ondevice.quantize`, and needs no torch to run a bundle."""
