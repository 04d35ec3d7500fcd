"""launch/node.py: the per-node environment checks, and the Composer launcher it runs."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import time

import pytest

from dbrx_train.errors import UserError
from tests.training.conftest import REPO

NODE = REPO / 'launch' / 'node.py'
_spec = importlib.util.spec_from_file_location('launch_node', NODE)
node = sys.modules['launch_node'] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(node)


def _topology(argv: list[str], env: dict[str, str] | None = None, gpus: int = 0):
    return node.resolve_topology(node.parse_args([*argv, 'train.py']), env or {}, gpus)


def test_slurm_node_rank_is_the_node_id_with_one_task_per_node_and_the_task_id_with_several():
    one_per_node = {'SLURM_NTASKS': '4', 'SLURM_JOB_NUM_NODES': '4', 'SLURM_NODEID': '2', 'SLURM_PROCID': '2'}
    two_on_one_host = {'SLURM_NTASKS': '2', 'SLURM_JOB_NUM_NODES': '1', 'SLURM_NODEID': '0', 'SLURM_PROCID': '1'}
    assert node.slurm_layout(one_per_node) == (4, 2)
    assert node.slurm_layout(two_on_one_host) == (2, 1)
    topology = _topology(['--slurm', '-n', '8', '--master_addr', 'a', '--master_port', '1'], one_per_node, gpus=8)
    assert (topology.nnodes, topology.node_rank, topology.world_size, topology.base_rank) == (4, 2, 32, 16)


def test_the_platform_environment_gives_nodes_and_ranks_the_way_composer_reads_it():
    env = {'WORLD_SIZE': '16', 'LOCAL_WORLD_SIZE': '8', 'NODE_RANK': '1', 'MASTER_ADDR': 'n0', 'MASTER_PORT': '7'}
    topology = _topology([], env, gpus=8)
    assert (topology.nnodes, topology.node_rank, topology.nproc, topology.master_addr) == (2, 1, 8, 'n0')
    assert _topology([], {**env, 'NODE_RANK': '', 'BASE_RANK': '8'}, gpus=8).node_rank == 1
    assert _topology([]).world_size == 1  # a single CPU process by default


@pytest.mark.parametrize('argv, env, gpus, message', [
    (['--nnodes', '2', '-n', '1', '--node_rank', '0'], {'WORLD_SIZE': '3'}, 0,
     'world size 3 disagrees with 2 nodes x 1 processes per node (= 2)'),
    (['--nnodes', '2', '--node_rank', '2', '--master_addr', 'a', '--master_port', '1'], {}, 0,
     'node rank 2 is outside 0..1 for 2 nodes'),
    (['--nnodes', '2', '--master_addr', 'a', '--master_port', '1'], {}, 0, '2 nodes but no node rank'),
    (['--nnodes', '2', '--node_rank', '1'], {}, 0, '2 nodes need the address and port of node 0'),
    (['-n', '8'], {}, 4, '8 processes per node asked for, but this node has only 4 GPUs'),
    (['--slurm', '--nnodes', '3'], {'SLURM_NTASKS': '2', 'SLURM_JOB_NUM_NODES': '2', 'SLURM_NODEID': '0',
                                    'SLURM_PROCID': '0'}, 0, '--nnodes 3 disagrees with the Slurm job step'),
    (['--slurm'], {'SLURM_NTASKS': '3', 'SLURM_JOB_NUM_NODES': '2', 'SLURM_NODEID': '0', 'SLURM_PROCID': '0'}, 0,
     '3 tasks do not spread evenly over 2 nodes'),
    (['--slurm'], {}, 0, 'run this under srun'),
])
def test_inconsistent_settings_fail_with_a_clear_message(argv, env, gpus, message):
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
        _topology(argv, env, gpus)


def test_master_checks(tmp_path):
    unresolvable = node.Topology(nnodes=2, node_rank=1, nproc=1, master_addr='no-such-host.invalid', master_port=1)
    with pytest.raises(UserError, match='no-such-host.invalid:1 is unreachable from node 1 .*does not resolve'):
        node.check_master(unresolvable, wait=0)
    with socket.socket() as listening:
        listening.bind(('127.0.0.1', 0))
        listening.listen()
        port = listening.getsockname()[1]
        # Node 0 must be able to open the rendezvous port; the others only need to reach it.
        with pytest.raises(UserError, match=f'MASTER_PORT {port} cannot be used on node 0'):
            node.check_master(node.Topology(2, 0, 1, '127.0.0.1', port), wait=0)
        node.check_master(node.Topology(2, 1, 1, '127.0.0.1', port), wait=0)
    node.check_master(node.Topology(2, 1, 1, '127.0.0.1', port), wait=0)  # refused: up, not listening yet


def test_the_command_line_fails_fast_with_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(NODE), '--nnodes', '2', '--node_rank', '1', '--master_addr',
                           'no-such-host.invalid', '--master_port', '29500', '--master_wait', '0', 'train.py'],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert 'node 1/2 on ' in proc.stdout and 'world size 2 = 2 node(s) x 1 process(es); global ranks 1..1' in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        'error: MASTER_ADDR no-such-host.invalid:29500 is unreachable from node 1 after 0 s: the name does not '
        'resolve (Name or service not known)']


STAND_IN = '''
import os, signal, sys, time
out = os.path.join(sys.argv[1], f'rank{os.environ["RANK"]}.txt')
def on_term(number, frame):
    with open(out, 'a') as f:
        f.write('SIGTERM\\n')
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with open(out, 'w') as f:
    f.write(f'{os.environ["RANK"]}/{os.environ["WORLD_SIZE"]} usr1_ignored={signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN}\\n')
print('stand-in rank', os.environ['RANK'], flush=True)
time.sleep(120)
'''


def test_runs_composer_launcher_passes_sigterm_on_and_ignores_sigusr1(tmp_path):
    """The launcher's processes get the topology; SIGTERM to the launcher (as Kubernetes sends it) reaches
    them; SIGUSR1 (which Slurm sends to every process itself) neither kills the launcher nor them."""
    script = tmp_path / 'stand_in.py'
    script.write_text(STAND_IN)
    logs = tmp_path / 'logs'
    proc = subprocess.Popen([sys.executable, str(NODE), '-n', '2', '--log_dir', str(logs), str(script), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f'rank{r}.txt').exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    for rank in (0, 1):
        assert (tmp_path / f'rank{rank}.txt').read_text() == f'{rank}/2 usr1_ignored=True\nSIGTERM\n'
    assert 'SIGTERM received, passing it to the training processes' in out
    assert 'stand-in rank 0' in out and (logs / 'rank1.stdout.txt').read_text() == 'stand-in rank 1\n'
