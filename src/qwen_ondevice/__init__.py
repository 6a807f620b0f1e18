"""qwen-ondevice: Qwen2 checkpoints to Snapdragon NPU bundles, and a host runtime for them."""
__version__ = "0.1.0"
