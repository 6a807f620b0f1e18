"""Checking a bundle: ``evaluate`` (perplexity, top-1, KL against the float model) and ``inspect``."""
