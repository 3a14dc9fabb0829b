"""The one error type users see: a one-line reason, turned into a non-zero exit by the CLI and a
4xx JSON answer by the handler."""
from __future__ import annotations


class DeepMinerError(Exception):
    """Bad input or a problem the user can fix. ``str(err)`` is one line naming the file/field and
    the problem; ``status`` is the HTTP status the server answers with."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None):
        super().__init__(" ".join(str(message).split()))  # always one line
        if status is not None:
            self.status = status
        self.kind = kind or type(self).__name__


class InputError(DeepMinerError):
    """A file or request body that is missing, unreadable, or not what it claims to be."""


class TooLargeError(DeepMinerError):
    """An image over the configured pixel limit (decompression bomb guard)."""

    status = 413
