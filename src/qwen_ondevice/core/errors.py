"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UserError(ValueError):
    """Bad input from the user: a missing file, a wrong architecture, a prompt over the context.

    The message says what was wrong and what to do about it; the CLI prints it as one line
    (``error: <message>``) and exits with status 2, without a traceback.
    """
