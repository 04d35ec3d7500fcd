"""Processes that die with the process that started them.

A run killed with -9 (an OOM killer, a preempted node, a test) cannot clean up: whatever it started
must end by itself, or it stays on a node that is reused (DataLoader workers hold about 1 GB each;
orphaned ranks would go on training and writing checkpoints beside the restarted run). The kernel
does it on Linux: `PR_SET_PDEATHSIG` sends SIGKILL to a process when its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent() -> None:
    """From now on this process is killed when its parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def dataloader_worker_init(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: the worker dies with its rank (PyTorch's own check of its
    parent runs only every 5 s, and only while the worker waits for work)."""
    exit_with_parent()


def exit_with_launcher() -> None:
    """For a rank that a launcher (`composer -n N`, torchrun) started: killed with the launcher, and
    gone at once if the launcher died before this ran (it was re-parented to init). Call it first
    thing, before slow imports. A process started by hand (no launcher's WORLD_SIZE) is left alone."""
    if 'WORLD_SIZE' not in os.environ or 'LOCAL_RANK' not in os.environ:
        return
    exit_with_parent()
    if os.getppid() == 1:
        sys.exit(f'rank {os.environ.get("RANK", "?")}: its launcher is gone; exiting')
