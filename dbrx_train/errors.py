"""User-facing errors, and the one place command-line tools turn them into one clear line."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, TypeVar


class UserError(Exception):
    """Bad input from the user (a YAML, a data file, a checkpoint, a request): reported as one line."""


class ConfigError(UserError):
    """A configuration value is unknown, mistyped or impossible. `key` is its dotted path."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f'{key}: {problem}' if key else problem)


class CheckpointError(UserError):
    """A checkpoint directory is missing files or holds tensors of the wrong name or shape."""


def check_local_path(key: str, name_or_path: str, what: str) -> Path:
    """`name_or_path` as an existing local path, or a `ConfigError`; a Hugging Face hub name (`org/name`,
    nothing there locally) gets one line saying the hub is unreachable and what to pass instead."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if not name_or_path.startswith(('.', '/', '~')) and name_or_path.count('/') == 1:
        raise ConfigError(key, f'{name_or_path!r} is a Hugging Face hub name and the hub is not reachable from here: '
                               f'download the {what} where it is (huggingface-cli download {name_or_path} '
                               f'{"--repo-type dataset " if what == "dataset" else ""}--local-dir DIR) and pass DIR')
    raise ConfigError(key, f'{what} not found: {path}')


F = TypeVar('F', bound=Callable[..., object])


def cli_entry(main: F) -> F:
    """Wraps a command-line `main` so a `UserError` ends the process with `error: ...` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f'error: {e}', file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
