"""The one user-facing error type.

Anything a user can fix (a bad config value, a missing dataset root, a corrupt image)
raises :class:`TlbenchError`. ``cli.py`` catches it, prints the message as one
paragraph and exits with code 2; only ``--debug`` / ``HYDRA_FULL_ERROR=1`` shows a
traceback.
"""


class TlbenchError(Exception):
    """A mistake the user can fix: the message says what was wrong and what would be right."""


def choices(names) -> str:
    """Format valid choices for an error message."""
    return ", ".join(repr(n) for n in sorted(names))
