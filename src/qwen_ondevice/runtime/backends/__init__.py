"""The backends an :class:`~qwen_ondevice.runtime.engine.Engine` runs on: ``torch`` (the float reference),
``ort-cpu`` (a bundle's QDQ graphs on ONNX Runtime's CPU EP) and ``qnn-htp`` (its context binaries).

A new backend implements :class:`~qwen_ondevice.runtime.engine.Backend` and is chosen in
:func:`~qwen_ondevice.runtime.open_model.open_runtime`."""
