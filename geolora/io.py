"""Atomic file writes: a file is written next to its target, flushed, fsynced and renamed over it.

``os.replace`` is atomic on POSIX and Windows, so a process killed while writing leaves the previous file or the new
one, never a half-written one.  Every file geolora writes (adapter weights and config, exported LoRA adapters, the
command line's reports, benchmark results) goes through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder; on a clean exit it is fsynced and renamed over ``path``, on an
    exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_with(path: str | os.PathLike, mode: str, write: Callable[[IO], Any]) -> None:
    with atomic_write(path) as tmp, open(tmp, mode) as f:
        write(f)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _write_with(path, "wb", lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _write_with(path, "w", lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2, **kwargs: Any) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically; ``kwargs`` go to :func:`json.dumps`."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def atomic_save_safetensors(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` written atomically."""
    from safetensors.torch import save_file

    with atomic_write(filename) as tmp:
        save_file(tensors, tmp, metadata=metadata)
