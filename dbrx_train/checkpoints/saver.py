"""Checkpoints in a local `save_folder` that are complete or absent, even under `kill -9`.

Composer 0.32 writes a checkpoint straight under its final name (`ep0-ba6-rank0.pt`, or the
sharded folder `ep0-ba6/`) and then moves `latest-rank0.pt` by removing and re-creating it, so a
kill mid-write leaves a partial checkpoint under the final name, and one between the two steps
leaves no `latest` at all. `AtomicCheckpointSaver` writes into `save_folder/.incomplete/` first,
then (after every rank finished writing) fsyncs and renames it into place, then swaps `latest` in
one `os.replace`, and only then lets `save_num_checkpoints_to_keep` delete older checkpoints.
Anything still in `.incomplete/` on the next start was cut off mid-write (see `autoresume.py`).

An object-store save folder (`remote.py`) gets the same order: every rank writes its files into a
node-local working folder and uploads them, then (after every rank finished uploading) rank 0
uploads the checkpoint's index, and only then are older checkpoints deleted, index first.
Uploads run in the training process itself: no uploader process is left behind by a kill.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.loggers import Logger
from composer.utils import checkpoint, dist, format_name_with_dist

from dbrx_train.checkpoints.remote import INDEX, RemoteCheckpoints
from dbrx_train.uri import is_remote

log = logging.getLogger(__name__)

STAGING = '.incomplete'  # in save_folder: what is being written; on start, what a kill cut off
LATEST = 'latest-rank{rank}.pt'
PAUSE_ENV = 'DBRX_TEST_CHECKPOINT_PAUSE'  # tests only: 'STAGE@BATCH,FLAG_FILE' (see pause_for_test)
# Composer's names: `ep{epoch}-ba{batch}-rank0.pt` (full) and `ep{epoch}-ba{batch}/` (sharded).
_NAME = re.compile(r'ep(\d+)-ba(\d+)(-rank0\.pt)?')


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    batch: int

    @property
    def sharded(self) -> bool:
        return self.path.is_dir()


def checkpoints(folder: Path) -> list[Checkpoint]:
    """The checkpoints in `folder` by Composer's names, oldest first."""
    found = []
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and not path.is_symlink() and path.is_file() == bool(match[3]):
            found.append(Checkpoint(path, int(match[2])))
    return sorted(found, key=lambda c: c.batch)


class AtomicCheckpointSaver(CheckpointSaver):
    """Composer's `CheckpointSaver` for a local folder, with every checkpoint written beside its
    final name and renamed into place once complete.

    Overrides `CheckpointSaver._save_checkpoint`, a private method (written against Composer
    0.32.1), because Composer has no hook between "every rank wrote its files" and "move latest";
    the writing itself stays Composer's public `checkpoint.save_checkpoint`, so full `.pt` files
    and sharded (DCP) folders are exactly what Composer writes and loads.
    """

    def __init__(self, folder: str, save_interval: str, num_checkpoints_to_keep: int, overwrite: bool,
                 remote: RemoteCheckpoints | None = None):
        """`folder` is local; with `remote`, it is the working folder checkpoints are uploaded from."""
        if is_remote(folder):
            raise ValueError(f'{folder} is not a local folder')
        self.remote = remote
        super().__init__(folder=folder, latest_filename=LATEST, remote_file_name=None,
                         latest_remote_file_name=None, save_interval=save_interval,
                         num_checkpoints_to_keep=num_checkpoints_to_keep, overwrite=overwrite)

    def fit_start(self, state: State, logger: Logger) -> None:
        super().fit_start(state, logger)
        if self.remote is not None:
            self.saved_checkpoints = self._remote_saved(state)
        elif dist.get_global_rank() == 0:
            # Composer forgets on restart what earlier attempts saved; count those up to the resumed
            # batch as saved by this run, so save_num_checkpoints_to_keep keeps meaning "the last N".
            sharded = state.fsdp_sharded_state_dict_enabled
            earlier = [c for c in checkpoints(Path(format_name_with_dist(self.folder, state.run_name)))
                       if c.batch <= int(state.timestamp.batch) and c.sharded == sharded]
            # The entry Composer's rotation expects: the file, or a file inside the sharded folder.
            self.saved_checkpoints = [str(c.path / '.metadata' if sharded else c.path) for c in earlier]

    def _save_checkpoint(self, state: State, logger: Logger) -> None:
        self.last_checkpoint_batch = state.timestamp.batch
        pattern = self.filename.format(state, keep_placeholders=True)
        final = checkpoint.get_save_filename(state, pattern)
        # Before writing, as Composer does, so the checkpoint lists itself among the saved ones.
        self.all_saved_checkpoints_to_timestamp[final] = state.timestamp
        staging_pattern = os.path.join(os.path.dirname(pattern), STAGING, os.path.basename(pattern))
        staged = checkpoint.save_checkpoint(state, filename=staging_pattern, weights_only=self.weights_only,
                                            ignore_keys=self.ignore_keys)
        # Every rank has written (and, for sharded folders, fsynced) its file, and has checked after
        # Composer's own barrier that it is there: only now may the folder move.
        dist.barrier()
        pause_for_test('staged', state)
        sharded = state.fsdp_sharded_state_dict_enabled
        # A sharded checkpoint is the folder every rank wrote its file into; rank 0 moves it.
        whole = (lambda file: Path(file).parent) if sharded else Path
        if self.remote is not None:
            self._upload(state, staged, whole(final).name, sharded)
            return
        if staged is not None and (not sharded or dist.get_global_rank() == 0):
            _commit(whole(staged), whole(final), overwrite=self.overwrite)
        dist.barrier()  # no rank goes on (or moves latest) before the checkpoint is in place
        pause_for_test('committed', state)
        if staged is None:  # this rank wrote nothing (ranks > 0 of a full checkpoint)
            return
        if self.num_checkpoints_to_keep != 0 and (dist.get_global_rank() == 0 or not sharded):
            point_latest(Path(self.latest_filename.format(state)), whole(final))
        self.saved_checkpoints.append(final)
        if self.num_checkpoints_to_keep >= 0:  # only now may older checkpoints go
            self._rotate_checkpoints(sharding_enabled=sharded)


    # ------------------------------------------------------------ object-store save folders

    def _remote_saved(self, state: State) -> list[str]:
        """Like `fit_start` locally: the checkpoints earlier attempts uploaded, up to the resumed batch."""
        if dist.get_local_rank() == 0:  # what a killed attempt left in the working folder is not uploaded
            shutil.rmtree(Path(format_name_with_dist(self.folder, state.run_name)) / STAGING, ignore_errors=True)
        dist.barrier()
        names = [None]
        if dist.get_global_rank() == 0:
            complete, _ = self.remote.checkpoints()
            names[0] = [c.name for c in complete if c.batch <= int(state.timestamp.batch)
                        and c.sharded == state.fsdp_sharded_state_dict_enabled]
        dist.broadcast_object_list(names, src=0)
        return names[0]

    def _upload(self, state: State, staged: str | None, name: str, sharded: bool) -> None:
        rank = dist.get_global_rank()
        if rank == 0:
            self.remote.delete(name + INDEX)  # re-saved under the same name: incomplete until re-indexed
        dist.barrier()
        mine = []  # this rank's files, relative to the remote folder
        if staged is not None:
            staged = Path(staged)
            files = [staged] if not sharded else sorted(staged.parent.glob(f'__{rank}_*.distcp'))
            if sharded and rank == 0:
                files.append(staged.parent / '.metadata')
            for file in files:
                relative = f'{name}/{file.name}' if sharded else name
                self.remote.upload(file, relative)
                mine.append(relative)
        uploaded = dist.all_gather_object(mine)  # also: every rank has finished uploading
        pause_for_test('uploaded', state)
        if rank == 0:
            self.remote.write_index(name, [f for files in uploaded for f in files])
        dist.barrier()
        pause_for_test('committed', state)
        if staged is not None:  # the bucket holds it now
            if sharded:
                for file in staged.parent.glob(f'__{rank}_*.distcp'):
                    file.unlink()
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(staged.parent)
            else:
                staged.unlink()
        elif sharded:
            dist.barrier()
        self.saved_checkpoints.append(name)
        if rank == 0 and self.num_checkpoints_to_keep > 0:  # only now may older checkpoints go
            while len(self.saved_checkpoints) > self.num_checkpoints_to_keep:
                self.remote.delete_checkpoint(self.saved_checkpoints.pop(0))


def _commit(staged: Path, final: Path, overwrite: bool) -> None:
    if final.is_dir():  # os.replace only replaces files and empty folders
        if not overwrite:
            raise FileExistsError(f'{final} exists; set save_overwrite to replace it')
        shutil.rmtree(final)
    if staged.is_file():  # Composer's full-checkpoint writer does not fsync; DCP's does
        _fsync(staged)
    os.replace(staged, final)
    _fsync(final.parent)  # the rename itself


def point_latest(link: Path, target: Path) -> None:
    """Points `link` at `target` in one step: a new link beside it, renamed over the old one."""
    temp = link.parent / STAGING / link.name
    temp.parent.mkdir(exist_ok=True)
    temp.unlink(missing_ok=True)
    temp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(temp, link)
    _fsync(link.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pause_for_test(stage: str, state: State) -> None:
    """Tests only: with DBRX_TEST_CHECKPOINT_PAUSE=STAGE@BATCH,FLAG_FILE, global rank 0 creates
    FLAG_FILE at that stage of that batch's checkpoint and waits there to be killed, so a test's
    `kill -9` lands at a known point of the write ('staged': written, not yet in place;
    'uploaded': every file in the object store, its index not yet; 'committed': in place, `latest`
    not yet moved, or indexed, older checkpoints not yet deleted)."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted or dist.get_global_rank() != 0:
        return
    point, flag = wanted.split(',', 1)
    if point != f'{stage}@{int(state.timestamp.batch)}':
        return
    Path(flag).touch()
    while True:
        time.sleep(1)
