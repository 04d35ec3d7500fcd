"""Where a run in a local `save_folder` starts: its last complete checkpoint, or from scratch.

Before the trainer is built, global rank 0 looks through the folder: whatever a kill left in
`.incomplete/` (see `saver.py`), and any checkpoint that does not read as complete (a
truncated `.pt`, a sharded folder missing a shard file or its `.metadata`, e.g. from a version
that wrote in place), is reported in one line each and moved into `save_folder/partial-<UTC time>/`,
never deleted. With `autoresume`, the newest complete checkpoint is the one to load, and `latest`
points at it again.

An object-store `save_folder` (`remote.py`) is listed instead: a checkpoint without its index
object was cut off and is reported, never resumed; the newest indexed one is downloaded into the
run's node-local working folder (by each node's local rank 0) and resumed from there. A folder
that cannot be listed (wrong key, missing bucket, unreachable endpoint) is one line naming it.
"""

from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path

from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist, reproducibility

from dbrx_train.checkpoints.remote import RemoteCheckpoints
from dbrx_train.checkpoints.saver import LATEST, STAGING, checkpoints, point_latest
from dbrx_train.errors import UserError
from dbrx_train.object_store import RemoteFolder
from dbrx_train.uri import is_remote

log = logging.getLogger(__name__)


def check_save_folder(save_folder: str | None, run_name: str) -> None:
    """An object-store save_folder that cannot be listed (wrong key, missing bucket, unreachable
    endpoint) is one line naming it, before the slow start-up; local or no save_folder: nothing."""
    if save_folder is not None and is_remote(save_folder):
        RemoteFolder(format_name_with_dist(save_folder, run_name)).check_access('save_folder')


def resume_checkpoint(save_folder: str, run_name: str, autoresume: bool,
                      remote: RemoteCheckpoints | None = None) -> str | None:
    """Moves partial checkpoints aside, and with `autoresume` returns the newest complete one (or
    None: start from scratch). Rank 0 decides; every rank gets its answer. With `remote`,
    `save_folder` is the local working folder the chosen checkpoint is downloaded into."""
    found: list = [None]
    if dist.get_global_rank() == 0:
        try:
            found[0] = (_remote_choice(remote, autoresume) if remote is not None
                        else _sweep(Path(format_name_with_dist(save_folder, run_name)), autoresume))
        except UserError as e:
            found[0] = e
    dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], UserError):
        raise found[0]
    if remote is None or found[0] is None:
        return found[0]
    local = Path(format_name_with_dist(save_folder, run_name))
    if dist.get_local_rank() == 0:
        local.mkdir(parents=True, exist_ok=True)
        path = remote.download_checkpoint(found[0], local)
        problem = incomplete(path)
        if problem is not None:
            raise UserError(f'{remote.uri}/{found[0].name}: downloaded, but {problem}')
    dist.barrier()
    return str(local / found[0].name)


def _remote_choice(remote: RemoteCheckpoints, autoresume: bool):
    remote.check_access('save_folder')
    if not autoresume:
        return None
    complete, partial = remote.checkpoints()
    for name in partial:
        log.warning('checkpoint %s/%s is incomplete: not resumed', remote.uri, name)
    if not complete:
        log.log(logging.WARNING if partial else logging.INFO,
                'autoresume: no complete checkpoint in %s: starting from scratch', remote.uri)
        return None
    newest = complete[-1]
    log.log(logging.WARNING if partial else logging.INFO, 'autoresume: resuming from %s/%s (batch %d)',
            remote.uri, newest.name, newest.batch)
    return newest


def _sweep(folder: Path, autoresume: bool) -> str | None:
    if not folder.is_dir():
        return None
    aside = _aside_folder(folder)
    moved = 0
    staging = folder / STAGING
    for leftover in sorted(staging.iterdir()) if staging.is_dir() else ():
        _move_aside(folder, leftover, aside, 'was being written when the run stopped')
        moved += 1
    complete = []
    for candidate in checkpoints(folder):
        problem = incomplete(candidate.path)
        if problem is None:
            complete.append(candidate)
        else:
            _move_aside(folder, candidate.path, aside, problem)
            moved += 1
    if not autoresume:
        return None
    latest = folder / LATEST.format(rank=0)
    if not complete:
        if latest.is_symlink():
            latest.unlink()  # a pointer to a checkpoint that was moved aside
        log.log(logging.WARNING if moved else logging.INFO,
                'autoresume: no complete checkpoint in %s: starting from scratch', folder)
        return None
    newest = complete[-1]
    if latest.resolve() != newest.path.resolve():
        point_latest(latest, newest.path)
    log.log(logging.WARNING if moved else logging.INFO, 'autoresume: resuming from %s (batch %d)',
            newest.path, newest.batch)
    return str(newest.path)


def incomplete(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be complete (naming the file), or None. Reads only the
    `.pt` file's zip index and the sharded folder's `.metadata`, so it is quick for any size."""
    if path.is_file():  # torch.save writes a zip whose index is at the very end
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return f'{path.name} is truncated or corrupt ({e})'
        if not any(name.endswith('data.pkl') for name in names):
            return f'{path.name} holds no torch.save data'
        return None
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / '.metadata').is_file():
        return f'{path.name}/.metadata is missing (written last, once every shard is)'
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # an unreadable pickle raises whatever it raises
        return f'{path.name}/.metadata is unreadable ({type(e).__name__}: {e})'
    needed: dict[str, int] = {}  # shard file -> bytes it must hold at least
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f'{path.name}/{name} is missing'
        if shard.stat().st_size < size:
            return f'{path.name}/{name} is truncated ({shard.stat().st_size} of {size} bytes)'
    return None


def _aside_folder(folder: Path) -> Path:
    """`partial-<UTC time>`, made unique (created when something is moved there)."""
    base = aside = folder / time.strftime('partial-%Y%m%dT%H%M%SZ', time.gmtime())
    n = 1
    while aside.exists():
        n += 1
        aside = base.with_name(f'{base.name}-{n}')
    return aside


def _move_aside(folder: Path, path: Path, aside: Path, problem: str) -> None:
    """Moves `path` to the same relative path under `aside`, and says so in one line."""
    relative = path.relative_to(folder)
    (aside / relative).parent.mkdir(parents=True, exist_ok=True)
    path.rename(aside / relative)
    log.warning('checkpoint %s: %s; moved to %s', relative, problem, aside / relative)


def finished_at(state: State) -> str | None:
    """'12ba' when the loaded checkpoint already reached max_duration, else None."""
    elapsed = state.timestamp.get(state.max_duration.unit)
    if elapsed < state.max_duration:
        return None
    return f'{elapsed.value}{elapsed.unit.value}'


def restore_rng(trainer: Trainer) -> None:
    """Puts back the RNG state the loaded checkpoint saved, when Composer would not.

    Composer restores it only at an epoch's first batch or while it spins the loader forward to
    the resumed batch; a loader that resumes itself (`dataset_resumption`, as ours do) mid-epoch
    never gets it, so anything random in training (router jitter) would differ from an
    uninterrupted run after a resume. Restored once the first batch is fetched, as Composer's
    spinning does: the DataLoader's iterator draws its seed from the RNG before that. Uses the
    Trainer's private `_rng_state` (Composer 0.32.1).
    """
    if (trainer._rng_state is not None and trainer.state.dataset_resumption.get('train')
            and int(trainer.state.timestamp.batch_in_epoch) > 0):
        trainer.state.callbacks.append(_RestoreRngAtFirstBatch(trainer._rng_state))
        trainer._rng_state = None


class _RestoreRngAtFirstBatch(Callback):
    def __init__(self, rng_state: list[dict]):
        self.rng_state: list[dict] | None = rng_state

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.rng_state is not None:
            reproducibility.load_rng_state(self.rng_state)
            self.rng_state = None
