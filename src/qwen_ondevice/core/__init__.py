"""What every stage shares: the model configuration, checkpoint loading, the demo model, the tokenizer,
the float reference (modeling), RoPE tables, the parts' boundary names, the bundle format and its manifest,
the activation encodings, and small utilities (errors, progress, atomic JSON, ONNX initializers).

Nothing here imports another subpackage."""
