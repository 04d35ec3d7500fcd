"""Where a path lives: the one test for an object-store URI (`s3://`, `oci://`, `gs://`, ...)."""

from __future__ import annotations

from pathlib import PurePath


def is_remote(path: str | PurePath) -> bool:
    """Whether `path` is a URI with a scheme (an object store) rather than a local path."""
    return '://' in str(path)


def scheme(path: str | PurePath) -> str | None:
    """The URI's scheme (`s3`, `gs`, ...), or None for a local path."""
    return str(path).split('://', 1)[0] if is_remote(path) else None
