"""``serve``: the OpenAI-compatible HTTP server: protocol models, the engine's worker thread, the app."""
