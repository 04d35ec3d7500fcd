"""A default pretraining corpus that exists on every machine: Python's own standard library.

Two streams, one MDS directory each: `text`, the prose of the standard library's module, class
and function docstrings (read from the source with `ast`, nothing imported), and `code`, its
`.py` files. Files are read in sorted order, so a given Python always yields the same corpus.
"""

from __future__ import annotations

import ast
import logging
import os
import platform
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from dbrx_train.data.text_to_mds import convert_to_mds, read_prep_info

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 2_000_000  # per stream: a few seconds of tokenizing
# Test suites hold deliberately broken or odd files; installed packages are not the stdlib.
_SKIPPED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__', 'test', 'tests', 'idle_test'})
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files, sorted."""
    root = Path(sysconfig.get_path('stdlib')) if root is None else root
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED_DIRS]  # never descend into them
        files += [Path(folder) / name for name in names if name.endswith('.py')]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _sources(files: list[Path]) -> Iterator[tuple[Path, str]]:
    for path in files:
        try:
            yield path, path.read_bytes().decode('utf-8')
        except (OSError, UnicodeDecodeError):
            continue  # an unreadable file is simply not part of the corpus


def _module_name(path: Path) -> str:
    """`email.mime` for <stdlib>/email/mime/__init__.py; a file elsewhere is named by its stem."""
    root = Path(sysconfig.get_path('stdlib'))
    parts = path.with_suffix('').relative_to(root).parts if path.is_relative_to(root) else (path.stem,)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' and len(parts) > 1 else parts)


def stdlib_code(files: list[Path] | None = None) -> Iterator[str]:
    """One document per standard library source file."""
    for _, source in _sources(stdlib_files() if files is None else files):
        yield source


def stdlib_docstrings(files: list[Path] | None = None) -> Iterator[str]:
    """One document per module: its docstrings in source order, each under its qualified name."""
    for path, source in _sources(stdlib_files() if files is None else files):
        try:
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError):
            continue
        sections = [f'{name}\n\n{doc}' for name, doc in _docstrings(tree, _module_name(path))]
        if sections:
            yield '\n\n\n'.join(sections) + '\n'


def _docstrings(node: ast.AST, name: str) -> Iterator[tuple[str, str]]:
    doc = ast.get_docstring(node, clean=True) if isinstance(node, _DOCUMENTED) else None
    if doc:
        yield name, doc
    for child in getattr(node, 'body', ()):
        if isinstance(child, _DOCUMENTED):
            yield from _docstrings(child, f'{name}.{child.name}')


EMBEDDED_STREAMS: dict[str, Callable[[], Iterator[str]]] = {'text': stdlib_docstrings, 'code': stdlib_code}


def make_embedded_corpus(
    out: str | Path,
    seq_len: int = 256,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Writes `out/text` and `out/code`; a stream already built with these settings is kept."""
    out = Path(out)
    info = {'corpus': 'python-stdlib', 'python': platform.python_version(), 'max_tokens': max_tokens}
    written = {}
    for stream, documents in EMBEDDED_STREAMS.items():
        target = out / stream
        wanted = {**info, 'stream': stream, 'seq_len': seq_len}
        existing = read_prep_info(target)
        if not overwrite and existing is not None and all(existing.get(k) == v for k, v in wanted.items()):
            log.info('embedded corpus stream %r is up to date at %s', stream, target)
        else:
            # A stream we built with other settings is ours to replace; anything else needs `overwrite`.
            stale = existing is not None and existing.get('corpus') == info['corpus']
            convert_to_mds(
                documents(), target, seq_len=seq_len, workers=workers, max_tokens=max_tokens,
                overwrite=overwrite or stale, info=wanted, desc=f'embedded {stream}',
            )
        written[stream] = target
    return written
