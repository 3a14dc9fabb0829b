"""Writing files so that a reader never sees half of one, written once.

Every output of the library goes through here: :func:`atomic_path` (a temporary name beside the
target, moved onto it with :func:`os.replace` only when the block succeeds, removed when it fails),
:func:`atomic_file` (the same, opened for writing) and :func:`staged_output` (the same for a whole
folder). The temporary names start with a dot, so a folder listing skips them.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from deepminer.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp", perms: int = 0o666) -> Iterator[Path]:
    """A fresh, empty temporary file beside ``path`` (created with ``perms`` less the umask, as
    :func:`open` would; its name ends in ``suffix``); the block writes it, and it is moved onto
    ``path`` only when the block succeeds. A failure (or Ctrl-C) removes it and leaves the old
    ``path`` in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perms))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, perms: int = 0o666) -> Iterator[IO[Any]]:
    """:func:`atomic_path` opened for writing (``mode`` ``"wb"`` or ``"w"``; text is UTF-8): readers
    never see a half-written file, a failure leaves the old one in place."""
    with atomic_path(path, perms=perms) as tmp:
        with (open(tmp, mode) if "b" in mode else open(tmp, mode, encoding="utf-8")) as fh:
            yield fh


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Write into a staging folder beside ``out`` and move it into place only on success, so an
    error or Ctrl-C never leaves a half-written output behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists")
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    os.replace(stage, out)
