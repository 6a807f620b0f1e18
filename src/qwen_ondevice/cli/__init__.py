"""The ``qwen-ondevice`` command: the parser (:mod:`~qwen_ondevice.cli.main`), shared argument
groups (:mod:`~qwen_ondevice.cli.args`) and one module per subcommand."""
