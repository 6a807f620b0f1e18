"""w4a16 / w8a16 quantization of the float part graphs: calibration, key equalization and
centering, smoothing, weight quantization (MSE clipping, GPTQ, LPBQ scales) and the QDQ rewrite.
The activation encodings and the KV-cache policy live in :mod:`qwen_ondevice.core.encodings`."""
