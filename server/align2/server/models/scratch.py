"""Scratch folders that model builds write into before they are renamed into place.

A build removes its folder when it ends, however it ends; :func:`remove_unfinished` is for
the one exit that skips that (``os._exit`` when ``align2 serve`` is stopped while a model
is built: the build's thread cannot be interrupted), so that no half-written folder of
gigabytes stays in the cache.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Iterator

_unfinished: set[pathlib.Path] = set()
_lock = threading.Lock()


@contextlib.contextmanager
def folder(name: str, parent: pathlib.Path) -> Iterator[pathlib.Path]:
    """A new hidden folder ``.NAME.xxxx`` in ``parent``, removed at the end (when the build
    did not rename it into place)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    with _lock:
        _unfinished.add(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with _lock:
            _unfinished.discard(path)


def remove_unfinished() -> int:
    """Remove the scratch folders of builds still running; how many there were."""
    with _lock:
        paths = list(_unfinished)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return len(paths)
