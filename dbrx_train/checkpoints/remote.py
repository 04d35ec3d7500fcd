"""A `save_folder` in an object store (`s3://`, `gs://`, `oci://`, Azure), through Composer's object stores.

A checkpoint there is its objects under Composer's names (`ep0-ba6-rank0.pt`, or `ep0-ba6/.metadata`
and `ep0-ba6/__{rank}_0.distcp`) plus an index object, `ep0-ba6.index.json`, listing them, uploaded
last, once every rank has uploaded its files. A checkpoint without its index was cut off (or is
being deleted: the index goes first) and is never resumed; saving under a name deletes its index
before anything is uploaded. An object upload itself is all-or-nothing.

Each rank writes and uploads its own files from a node-local working folder (`local_folder`), the
same one for every rank of a node and every attempt of a run, so a restarted run downloads into
where its predecessor wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dbrx_train.object_store import RemoteFolder, download_cache, local_copy, node_local_folder

INDEX = '.index.json'
LATEST_NAME = 'latest-rank0.pt'  # what Composer's readers look for in a save_folder (saver.LATEST)
CONFIG_NAME = 'config.yaml'  # the model config train.py puts beside the checkpoints (native.CONFIG_FILE)
INDEX_FORMAT = 'dbrx_train.remote_checkpoint/1'
_INDEX_NAME = re.compile(r'ep(\d+)-ba(\d+)(-rank0\.pt)?' + re.escape(INDEX))


@dataclass(frozen=True)
class RemoteCheckpoint:
    name: str  # 'ep0-ba6-rank0.pt' or 'ep0-ba6'
    batch: int
    sharded: bool


class RemoteCheckpoints(RemoteFolder):
    """An object-store `save_folder`: its checkpoints, complete or cut off."""

    def checkpoints(self) -> tuple[list[RemoteCheckpoint], list[str]]:
        """The complete checkpoints, oldest first, and the names of the ones whose upload was cut off."""
        names = self.names()
        present = set(names)
        complete, partial = [], []
        for name in names:
            match = _INDEX_NAME.fullmatch(name)
            if match is None:
                continue
            checkpoint = RemoteCheckpoint(name[:-len(INDEX)], int(match[2]), sharded=not match[3])
            missing = [f for f in self._index_files(name) if f not in present]
            if missing:
                partial.append(f'{checkpoint.name} (missing {missing[0]})')
            else:
                complete.append(checkpoint)
        indexed = {c.name for c in complete} | {p.split(' ')[0] for p in partial}
        for name in {n.split('/')[0] for n in names if not n.endswith(INDEX)}:
            if re.fullmatch(r'ep\d+-ba\d+(-rank0\.pt)?', name) and name not in indexed:
                partial.append(f'{name} (no {name}{INDEX}: its upload was cut off)')
        return sorted(complete, key=lambda c: c.batch), sorted(partial)

    def _index_files(self, index_name: str) -> list[str]:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / 'index.json'
            self.download(index_name, local)
            try:
                index = json.loads(local.read_text())
                assert index['format'] == INDEX_FORMAT
                return list(index['files'])
            except (ValueError, KeyError, TypeError, AssertionError):
                return [f'{index_name} (unreadable)']

    def write_index(self, name: str, files: list[str]) -> None:
        """Uploads `name`'s index, listing `files` (names relative to the folder): it is complete."""
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / 'index.json'
            local.write_text(json.dumps({'format': INDEX_FORMAT, 'files': sorted(files)}, indent=1))
            self.upload(local, name + INDEX)

    def delete_checkpoint(self, name: str) -> None:
        """The index first: a checkpoint half deleted reads as incomplete, never as complete."""
        files = [n for n in self.names() if n == name or n.startswith(name + '/')]
        self.delete(name + INDEX)
        for file in files:
            self.delete(file)

    def download_checkpoint(self, checkpoint: RemoteCheckpoint, local: Path) -> Path:
        """Downloads into `local/<name>` (replacing what is there) and returns that path."""
        target = local / checkpoint.name
        if target.is_dir():
            shutil.rmtree(target)  # e.g. another world size's shard files
        for name in self._index_files(checkpoint.name + INDEX):
            self.download(name, local / name)
        return target


def local_folder(uri: str, run_name: str) -> Path:
    """The node-local working folder of a run saving to `uri`: the same for every rank and every
    attempt, distinct for another endpoint or run."""
    return node_local_folder('checkpoints', uri, run_name)


def local_saved_model(uri: str) -> Path:
    """A local copy of the model saved at `uri`, for the readers of `formats.py`: for a `save_folder`
    of checkpoints, its model config and newest complete checkpoint (`latest` pointing at it,
    downloaded again when a newer one is there); otherwise every object under `uri`."""
    folder = RemoteCheckpoints(uri)
    complete, _ = folder.checkpoints()
    if not complete:
        return local_copy(uri)
    local = download_cache(uri)
    newest = complete[-1]
    latest = local / LATEST_NAME
    if not (latest.is_symlink() and os.readlink(latest) == newest.name and (local / newest.name).exists()):
        local.mkdir(parents=True, exist_ok=True)
        folder.download(CONFIG_NAME, local / CONFIG_NAME)
        folder.download_checkpoint(newest, local)
        latest.unlink(missing_ok=True)
        latest.symlink_to(newest.name)
    return local
