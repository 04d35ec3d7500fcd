"""One node's share of a multi-node run: check the environment, then run the Composer launcher.

    python launch/node.py [-n NPROC] [--nnodes N] [--node_rank R] [--master_addr A] [--master_port P]
                          [--world_size W] [--slurm] [--log_dir DIR] dbrx_train/train.py CONFIG.yaml [key=value ...]

The same as `composer -n NPROC --world_size N*NPROC --node_rank R ... dbrx_train/train.py ...`, with
unset flags read from the environment the way `composer` reads them (LOCAL_WORLD_SIZE, WORLD_SIZE,
NODE_RANK or BASE_RANK, MASTER_ADDR, MASTER_PORT; and NUM_NODES), or from the Slurm task with `--slurm`. Before
anything starts it prints the world size, this node's ranks and its devices, and stops with one
`error:` line when the world size disagrees with the nodes or the master address cannot be reached.
While training runs it passes SIGTERM on to the training processes (which checkpoint on it with
the `save_on_signal` callback) instead of dying on it, and ignores SIGUSR1, which Slurm delivers to
every process of the job step itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Mapping

if __name__ == '__main__' and sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script: launch/'s folders must not shadow packages of the same name

from dbrx_train.errors import UserError, cli_entry  # noqa: E402

# A container's main process gets SIGTERM alone (Kubernetes, MCLI): pass it on.
FORWARDED_SIGNALS = (signal.SIGTERM,)
# Slurm sends a job step's signals to every process in it. Ignoring SIGUSR1 here is inherited by the
# training processes until their save_on_signal handler takes it, and by the helpers they start early
# (Python's resource tracker, ...), which would otherwise die of it.
IGNORED_SIGNALS = (signal.SIGUSR1,)


@dataclass(frozen=True)
class Topology:
    nnodes: int
    node_rank: int
    nproc: int
    master_addr: str
    master_port: int | None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc

    @property
    def base_rank(self) -> int:
        return self.node_rank * self.nproc


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='launch/node.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('-n', '--nproc', type=int, help='processes on this node (default: its GPUs, 1 on CPU)')
    parser.add_argument('--nnodes', type=int, help='number of nodes (launchers) in the run')
    parser.add_argument('--node_rank', type=int, help='this node, 0 to nnodes-1')
    parser.add_argument('--world_size', type=int, help='optional: checked against nnodes x nproc')
    parser.add_argument('--master_addr', help='host of node 0, where the rendezvous runs')
    parser.add_argument('--master_port', type=int, help='free TCP port on node 0')
    parser.add_argument('--slurm', action='store_true', help='take nnodes and node_rank from this Slurm task')
    parser.add_argument('--log_dir', help='write each rank\'s output to LOG_DIR/rank{rank}.{stdout,stderr}.txt '
                                          '(the first rank of each node stays on this output)')
    parser.add_argument('--master_wait', type=float, default=120.0,
                        help='seconds to keep trying to resolve and reach the master (nodes start at different times)')
    parser.add_argument('training_script')
    parser.add_argument('training_args', nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ''):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f'{name}={value!r} is not an integer') from None


def _first(*values):
    return next((v for v in values if v is not None), None)


def slurm_layout(env: Mapping[str, str]) -> tuple[int, int]:
    """(launchers, this launcher's rank) of a Slurm job step with one launcher per task.

    One task per node is the real layout, ranked by SLURM_NODEID; several tasks on one host (a
    one-machine test cluster) each act as a node of their own, ranked by SLURM_PROCID.
    """
    ntasks, nnodes = _env_int(env, 'SLURM_NTASKS'), _env_int(env, 'SLURM_JOB_NUM_NODES')
    node_id, proc_id = _env_int(env, 'SLURM_NODEID'), _env_int(env, 'SLURM_PROCID')
    if None in (ntasks, nnodes, node_id, proc_id):
        raise UserError('--slurm: SLURM_NTASKS, SLURM_JOB_NUM_NODES, SLURM_NODEID or SLURM_PROCID is not set; '
                        'run this under srun inside an allocation')
    if ntasks % nnodes:
        raise UserError(f'--slurm: {ntasks} tasks do not spread evenly over {nnodes} nodes; '
                        'ask for a fixed number of tasks per node (--ntasks-per-node)')
    return ntasks, node_id if ntasks == nnodes else proc_id


def resolve_topology(args: argparse.Namespace, env: Mapping[str, str], gpus: int) -> Topology:
    """Fills unset flags from the environment and checks that they agree with each other."""
    nproc = _first(args.nproc, _env_int(env, 'LOCAL_WORLD_SIZE'), gpus or 1)
    if nproc < 1:
        raise UserError(f'the number of processes per node must be at least 1, got {nproc}')
    if gpus and nproc > gpus:
        raise UserError(f'{nproc} processes per node asked for, but this node has only {gpus} GPUs')

    nnodes, node_rank = args.nnodes, args.node_rank
    if args.slurm:
        slurm_nnodes, slurm_rank = slurm_layout(env)
        if nnodes is not None and nnodes != slurm_nnodes:
            raise UserError(f'--nnodes {nnodes} disagrees with the Slurm job step, which has {slurm_nnodes} launchers')
        nnodes = slurm_nnodes
        node_rank = _first(node_rank, slurm_rank)
    nnodes = _first(nnodes, _env_int(env, 'NUM_NODES'))
    base_rank = _env_int(env, 'BASE_RANK')  # composer's alternative to NODE_RANK
    node_rank = _first(node_rank, _env_int(env, 'NODE_RANK'), None if base_rank is None else base_rank // nproc)

    world_size = _first(args.world_size, _env_int(env, 'WORLD_SIZE'))
    if nnodes is None:
        if world_size is None:
            nnodes = 1
        elif world_size % nproc:
            raise UserError(f'world size {world_size} is not a multiple of the {nproc} processes per node')
        else:
            nnodes = world_size // nproc
    if nnodes < 1:
        raise UserError(f'the number of nodes must be at least 1, got {nnodes}')
    if world_size is not None and world_size != nnodes * nproc:
        raise UserError(f'world size {world_size} disagrees with {nnodes} nodes x {nproc} processes per node '
                        f'(= {nnodes * nproc})')
    if node_rank is None:
        if nnodes > 1:
            raise UserError(f'{nnodes} nodes but no node rank: pass --node_rank or set NODE_RANK')
        node_rank = 0
    if not 0 <= node_rank < nnodes:
        raise UserError(f'node rank {node_rank} is outside 0..{nnodes - 1} for {nnodes} nodes')

    master_addr = args.master_addr or env.get('MASTER_ADDR') or ('127.0.0.1' if nnodes == 1 else None)
    master_port = _first(args.master_port, _env_int(env, 'MASTER_PORT'))
    if nnodes > 1 and (not master_addr or not master_port):
        raise UserError(f'{nnodes} nodes need the address and port of node 0: pass --master_addr and '
                        '--master_port or set MASTER_ADDR and MASTER_PORT')
    return Topology(nnodes, node_rank, nproc, master_addr, master_port)


def check_master(topology: Topology, wait: float) -> None:
    """Node 0 needs the rendezvous port free; every other node needs to reach node 0.

    A refused connection counts as reachable: node 0's rendezvous may simply not be listening yet.
    Name lookups and connections are retried for `wait` seconds, since nodes start at different times.
    """
    addr, port = topology.master_addr, topology.master_port
    if topology.node_rank == 0:
        if port is None:  # one node: the launcher picks a free port itself
            return
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous does: TIME_WAIT is fine
            try:
                s.bind(('', port))
            except OSError as e:
                raise UserError(f'MASTER_PORT {port} cannot be used on node 0 ({e.strerror}); choose another port')
        return
    deadline = time.monotonic() + wait
    while True:
        problem = _probe(addr, port)
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise UserError(f'MASTER_ADDR {addr}:{port} is unreachable from node {topology.node_rank} '
                            f'after {wait:.0f} s: {problem}')
        time.sleep(1.0)


def _probe(addr: str, port: int) -> str | None:
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f'the name does not resolve ({e.strerror})'
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.settimeout(3.0)
        try:
            s.connect(sockaddr)
        except ConnectionRefusedError:
            return None  # the host answered
        except TimeoutError:
            return 'connection timed out'
        except OSError as e:
            return e.strerror or str(e)
    return None


def describe(topology: Topology, gpu_names: list[str]) -> str:
    first, last = topology.base_rank, topology.base_rank + topology.nproc - 1
    devices = f'{len(gpu_names)} GPU(s): {", ".join(gpu_names)}' if gpu_names else 'CPU only (no CUDA device)'
    master = f'{topology.master_addr}:{topology.master_port or "(any free port)"}'
    return (f'node {topology.node_rank}/{topology.nnodes} on {socket.gethostname()}: world size '
            f'{topology.world_size} = {topology.nnodes} node(s) x {topology.nproc} process(es); global ranks '
            f'{first}..{last}; master {master}; devices: {devices}')


def composer_argv(topology: Topology, log_dir: str | None, script: str, script_args: list[str]) -> list[str]:
    argv = ['composer', '-n', str(topology.nproc), '--world_size', str(topology.world_size),
            '--node_rank', str(topology.node_rank), '--master_addr', topology.master_addr]
    if topology.master_port is not None:
        argv += ['--master_port', str(topology.master_port)]
    if log_dir is not None:
        argv += ['--stdout', os.path.join(log_dir, 'rank{rank}.stdout.txt'),
                 '--stderr', os.path.join(log_dir, 'rank{rank}.stderr.txt')]
    return [*argv, script, *script_args]


def _forward_to_training_processes(number: int, frame) -> None:
    import psutil

    # os.write, not print: a signal handler may interrupt a print in progress.
    os.write(2, f'launch/node.py: {signal.Signals(number).name} received, passing it to the training processes\n'
             .encode())
    for child in psutil.Process().children():
        try:
            child.send_signal(number)
        except psutil.NoSuchProcess:
            pass


def _gpu_names() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gpu_names = _gpu_names()
    topology = resolve_topology(args, os.environ, len(gpu_names))
    print(describe(topology, gpu_names), flush=True)
    check_master(topology, args.master_wait)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)

    from composer.cli.launcher import main as composer_main

    for number in FORWARDED_SIGNALS:
        signal.signal(number, _forward_to_training_processes)
    for number in IGNORED_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    sys.argv = composer_argv(topology, args.log_dir, args.training_script, args.training_args)
    return composer_main()


if __name__ == '__main__':
    sys.exit(main())
