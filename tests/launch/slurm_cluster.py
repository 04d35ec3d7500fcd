"""A real one-machine Slurm cluster (Debian's Slurm 22.05) for tests: no systemd, no munge daemon.

slurmctld and slurmd run as root on 127.0.0.1 with their state, spool, pid and log files in a temp
folder, which also names the test process that owns the cluster. Every process of the cluster either
inherits its SLURM_CONF (daemons, jobs) or works in its folder (slurmstepd, whose environment Slurm
clears): that is how `stop()` finds anything left behind, and how `reap_orphans()` finds clusters
whose test process was killed before it could tear them down.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

PACKAGES = ['slurmctld', 'slurmd', 'slurm-client', 'munge']
SYSTEM_PATH = '/usr/sbin:/usr/bin:/sbin:/bin'
OWNER_FILE = 'owner.pid'


class SlurmUnavailable(Exception):
    """Slurm is missing and cannot be installed here (not root, or no apt-get)."""


def ensure_installed() -> None:
    """Installs the Slurm packages with apt-get when they are missing (as root; about 15 s)."""
    if all(shutil.which(p, path=SYSTEM_PATH) for p in ('slurmctld', 'slurmd', 'sbatch')):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable('Slurm is not installed and installing it needs root')
    apt = shutil.which('apt-get', path=SYSTEM_PATH)
    if apt is None:
        raise SlurmUnavailable('Slurm is not installed and there is no apt-get to install it with')
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    lock = ['-o', 'DPkg::Lock::Timeout=300']
    for command in ([apt, *lock, 'update', '-q'], [apt, *lock, 'install', '-y', '-q', '--no-install-recommends',
                                                   *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f'{" ".join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class SlurmCluster:
    """`start()`, then client commands through `run()`; `stop()` always leaves no process behind."""

    def __init__(self, root: Path, cpus: int = 4):
        self.root = root
        self.conf = root / 'slurm.conf'
        self.cpus = cpus
        self.env = {**os.environ, 'SLURM_CONF': str(self.conf), 'PATH': f'{os.environ.get("PATH", "")}:{SYSTEM_PATH}'}

    def _write_conf(self) -> None:
        for sub in ('state', 'spool', 'log'):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / OWNER_FILE).write_text(str(os.getpid()))
        r = self.root
        self.conf.write_text('\n'.join([
            'ClusterName=dbrxtest',
            'SlurmctldHost=localhost(127.0.0.1)',
            f'SlurmctldPort={_free_port()}',
            f'SlurmdPort={_free_port()}',
            'AuthType=auth/none', 'CredType=cred/none',
            'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none',
            'SelectType=select/cons_tres', 'SelectTypeParameters=CR_Core',
            'ReturnToService=2', 'MailProg=/bin/true', 'SlurmUser=root', 'SlurmdUser=root',
            # Job ids (and so the job script's MASTER_PORT) differ between clusters running side by side.
            f'FirstJobId={1000 + os.getpid() % 9000}',
            'KillWait=5',  # how long a cancelled job has between SIGTERM and SIGKILL
            # How long a requeued job waits before it may start again (120 s by default).
            'AuthInfo=cred_expire=5',
            f'StateSaveLocation={r}/state', f'SlurmdSpoolDir={r}/spool',
            f'SlurmctldPidFile={r}/slurmctld.pid', f'SlurmdPidFile={r}/slurmd.pid',
            f'SlurmctldLogFile={r}/log/slurmctld.log', f'SlurmdLogFile={r}/log/slurmd.log',
            'SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1',
            'SlurmdParameters=config_overrides',  # lets CPUs= exceed the real cores
            f'NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus}',
            'PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP',
        ]) + '\n')

    def start(self) -> None:
        self._write_conf()
        slurmctld = shutil.which('slurmctld', path=SYSTEM_PATH)
        slurmd = shutil.which('slurmd', path=SYSTEM_PATH)
        subprocess.run([slurmctld, '-i', '-f', str(self.conf)], env=self.env, check=True, timeout=30)
        subprocess.run([slurmd, '-f', str(self.conf), '-N', 'localhost'], env=self.env, check=True, timeout=30)
        deadline = time.monotonic() + 30
        while self.run('sinfo', '-h', '-o', '%T', check=False).stdout.strip() != 'idle':
            if time.monotonic() > deadline:
                raise RuntimeError(f'the Slurm node never became idle:\n{self.logs()}')
            time.sleep(0.2)
        # The first job warms the scheduler up.
        self.wait_for(self.sbatch('--wrap=true', '--output=/dev/null'), {'COMPLETED'}, timeout=30)

    def run(self, *command: str, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(list(command), env=kwargs.pop('env', self.env), capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and done.returncode:
            raise RuntimeError(f'{" ".join(command)} failed ({done.returncode}): {done.stderr.strip()}')
        return done

    def sbatch(self, *args: str, **kwargs) -> str:
        return self.run('sbatch', '--parsable', *args, **kwargs).stdout.strip().split(';')[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run('scontrol', 'show', 'job', '-o', job_id).stdout
        return dict(re.findall(r'(\w+)=(\S*)', text))

    def wait_for(self, job_id: str, states: set[str], timeout: float, restarts: int | None = None) -> dict[str, str]:
        """Polls the job (`sbatch --wait` is slow to notice) until it is in one of `states`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job['JobState'] in states and (restarts is None or int(job['Restarts']) == restarts):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f'job {job_id} is {job["JobState"]} (restarts {job["Restarts"]}), '
                                   f'not {states} after {timeout} s')
            time.sleep(0.2)

    def logs(self) -> str:
        return '\n'.join(f'--- {p.name}\n{p.read_text()[-3000:]}' for p in sorted((self.root / 'log').glob('*.log')))

    def processes(self) -> list[psutil.Process]:
        """Every live process that belongs to this cluster: daemons, job steps and the jobs' processes."""
        return [proc for proc, root in _cluster_processes() if root == self.root]

    def stop(self) -> list[str]:
        """Cancels every job, shuts the daemons down and kills what is still running.

        Returns the processes that had to be killed (empty when everything shut down by itself).
        """
        if self._pid('slurmctld') is not None:
            try:
                self.run('scancel', '--user=root', check=False, timeout=10)
                deadline = time.monotonic() + 20
                while self.run('squeue', '-h', check=False, timeout=10).stdout.strip():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                self.run('scontrol', 'shutdown', check=False, timeout=10)
            except subprocess.TimeoutExpired:
                pass  # slurmctld is hung: client commands wait for it; kill by pid below
        deadline = time.monotonic() + 15
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        return _kill(self.processes())

    def _pid(self, daemon: str) -> int | None:
        try:
            pid = int((self.root / f'{daemon}.pid').read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if psutil.pid_exists(pid) else None


def reap_orphans() -> list[str]:
    """Kills what is left of test clusters whose test process died without tearing them down."""
    return _kill([proc for proc, root in _cluster_processes() if not psutil.pid_exists(_owner(root))])


def _owner(root: Path) -> int:
    try:
        return int((root / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return -1


def _cluster_processes() -> list[tuple[psutil.Process, Path]]:
    """(process, cluster folder) for every live process of a test cluster on this machine."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid():
                continue
            conf = proc.environ().get('SLURM_CONF')
            cwd = Path(proc.cwd())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for folder in [Path(conf).parent] if conf else [cwd, *cwd.parents]:
            if (folder / OWNER_FILE).is_file():
                found.append((proc, folder))
                break
    return found


def _kill(processes: list[psutil.Process]) -> list[str]:
    described = [f'{p.pid} {_describe(p)}' for p in processes]
    for proc in processes:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)
    return described


def _describe(proc: psutil.Process) -> str:
    try:
        return ' '.join(proc.cmdline())[:200]
    except psutil.Error:
        return '(gone)'
