"""A real Slurm cluster on this machine for the launch tests, torn down whatever happens."""

from __future__ import annotations

import pytest

from tests.launch.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed, reap_orphans


@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    """A started one-node cluster (2 launchers fit: 4 CPUs); after the tests no process of it is left."""
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    reap_orphans()
    cluster = SlurmCluster(tmp_path_factory.mktemp('slurm'))
    try:
        cluster.start()
        yield cluster
    finally:
        leftovers = cluster.stop()
    assert not leftovers, f'processes outlived the cluster shutdown and were killed: {leftovers}'
