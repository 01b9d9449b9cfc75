"""The one base of every error a user can cause or cure: a bad space, preset, model, task, storage or choice.

Its message is one line that names the culprit, and the CLI prints it without a traceback. Any other exception is
a bug and keeps its traceback. Subclasses also derive from the built-in type callers caught before (ValueError,
ImportError, RuntimeError), so existing `except` clauses keep working.
"""


class DartTunerError(Exception):
    """A user-facing error; the message is one line naming the culprit."""
