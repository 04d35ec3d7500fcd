"""Folders in object stores (`s3://`, `gs://`, `oci://`, Azure) through Composer's object stores, with
credentials from the standard environment (`AWS_*`, `S3_ENDPOINT_URL`, ...)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dbrx_train.errors import UserError
from dbrx_train.uri import is_remote

log = logging.getLogger(__name__)


CHECKED_SCHEMES = ('s3', 'gs', 'oci', 'azure')  # what Composer's object stores reach (hf:// is Streaming's own)


class RemoteFolder:
    """The objects under one URI `scheme://bucket/prefix`, by names relative to it."""

    def __init__(self, uri: str):
        # On use: importing Composer takes seconds, which a data-prep command writing locally should not pay.
        from composer.utils import maybe_create_object_store_from_uri, parse_uri

        self.uri = uri.rstrip('/')
        _, _, prefix = parse_uri(self.uri)
        self.prefix = prefix.strip('/')
        try:
            self.store = maybe_create_object_store_from_uri(self.uri)
        except Exception as e:  # unknown scheme, missing credentials or client library
            raise UserError(f'{self.uri}: cannot open this object store ({type(e).__name__}: '
                            f'{" ".join(str(e).split())})') from None
        if self.store is None:
            raise ValueError(f'{uri} is not an object-store URI')

    def key(self, name: str) -> str:
        return f'{self.prefix}/{name}' if self.prefix else name

    def names(self) -> list[str]:
        """Every object under the folder, relative to it."""
        return self.names_under('')

    def names_under(self, prefix: str) -> list[str]:
        """The objects whose names (relative to the folder) start with `prefix`."""
        start = len(self.key(''))
        return sorted(key[start:] for key in self.store.list_objects(self.key(prefix)))

    def check_access(self, what: str) -> None:
        """A one-line `UserError` naming the URI when the folder cannot be listed (wrong key,
        missing bucket, unreachable endpoint): before training, never an hour in."""
        self._listed(self.key(''), what)

    def check_file(self, name: str, what: str) -> None:
        """`check_access`, and a one-line `UserError` when object `name` is missing."""
        if self.key(name) not in self._listed(self.key(name), what):
            raise UserError(f'{what} {self.uri}: no {name} there')

    def _listed(self, key_prefix: str, what: str) -> list[str]:
        try:
            return self.store.list_objects(key_prefix)
        except Exception as e:  # botocore and the other clients raise many types
            reason = ' '.join(str(e).split()) or type(e).__name__
            raise UserError(f'{what} {self.uri}: cannot list it ({type(e).__name__}: {reason})') from None

    def upload(self, file: Path, name: str) -> None:
        self.store.upload_object(self.key(name), str(file))

    def download(self, name: str, file: Path) -> None:
        self.store.download_object(self.key(name), str(file), overwrite=True)

    def delete(self, name: str) -> None:
        """Deletes one object (absent is fine). Composer's object stores cannot delete, so this
        uses each backend's client; a backend it does not know keeps the object and says so."""
        key = self.key(name)
        client, bucket = getattr(self.store, 'client', None), getattr(self.store, 'bucket', None)
        if client is not None and hasattr(client, 'delete_object') and isinstance(bucket, str):  # S3
            client.delete_object(Bucket=bucket, Key=key)
        elif hasattr(bucket, 'blob'):  # Google Cloud Storage
            blob = bucket.blob(key)
            if blob.exists():
                blob.delete()
        else:
            log.warning('cannot delete %s on this object store; kept', self.store.get_uri(key))


def node_local_folder(kind: str, uri: str, *more: str) -> Path:
    """A folder in this node's temporary directory for `uri` (and `more`): the same for the same
    endpoint, URI and `more`, in every process of the node."""
    key = '\0'.join([os.environ.get('S3_ENDPOINT_URL', ''), uri.rstrip('/'), *more])
    return Path(tempfile.gettempdir()) / f'dbrx_train-{kind}' / hashlib.sha1(key.encode()).hexdigest()[:16]


def download_cache(uri: str) -> Path:
    """The node-local folder downloads of `uri` go to."""
    return node_local_folder('downloads', uri)


_copied: dict[str, Path] = {}  # uri -> its local copy, made by this process


def local_copy(uri: str) -> Path:
    """A local copy of the object or folder at `uri` (every object under it), in
    `download_cache(uri)`; downloaded once per process (a later process downloads again: the objects
    may have changed). Local paths are returned as they are."""
    if not is_remote(uri):
        return Path(uri)
    if uri in _copied:
        return _copied[uri]
    cache = download_cache(uri)
    name = uri.rstrip('/').rsplit('/', 1)[-1]
    target = cache / name
    folder = RemoteFolder(uri)
    parent = RemoteFolder(uri.rstrip('/').rsplit('/', 1)[0])
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    if name in parent.names_under(name):  # one object
        parent.download(name, target)
    else:
        names = folder.names()
        if not names:
            raise UserError(f'{uri}: nothing there')
        for relative in names:
            folder.download(relative, target / relative)
    _copied[uri] = target
    return target


@contextlib.contextmanager
def local_output(uri: str, overwrite: bool = False) -> Iterator[Path]:
    """Where to write a directory meant for `uri`: `uri` itself when it is local; otherwise a
    temporary directory whose files are uploaded under `uri` once the block succeeds (objects
    already there are refused unless `overwrite`)."""
    if not is_remote(uri):
        yield Path(uri)
        return
    folder = RemoteFolder(uri)
    folder.check_access('output')
    if folder.names() and not overwrite:
        raise UserError(f'{uri} already holds objects (pass overwrite to replace them)')
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / uri.rstrip('/').rsplit('/', 1)[-1]
        yield out
        for file in sorted(p for p in out.rglob('*') if p.is_file()):
            folder.upload(file, str(file.relative_to(out)))
