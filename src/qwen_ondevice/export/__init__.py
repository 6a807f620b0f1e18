"""``export``: checkpoint -> bundle folder. Options and resumable state, the pipeline of stages, the
part plan and its memory/disk estimate, the float ONNX graphs of the parts, and report.json."""
