"""The MCLI run YAML (through mosaicml-cli's own parser) and the Kubernetes template drive the same command."""

from __future__ import annotations

import shlex
import subprocess
import warnings

import yaml

from tests.launch.test_node import node
from tests.training.conftest import REPO

MCLI = REPO / 'launch' / 'mcli' / 'train.yaml'
K8S = REPO / 'launch' / 'k8s' / 'train.yaml'


def _node_args(argv: list[str]):
    """Checks that `argv` is `python launch/node.py ... dbrx_train/train.py <existing yaml> ...`."""
    assert argv[:2] == ['python', 'launch/node.py'], argv
    args = node.parse_args(argv[2:])
    assert args.training_script == 'dbrx_train/train.py'
    assert (REPO / args.training_args[0]).is_file(), args.training_args
    return args


def test_mcli_run_yaml_passes_mosaicml_clis_validation_and_runs_the_trainer_through_the_launcher():
    from mcli.models.run_config import FinalRunConfig, RunConfig

    with warnings.catch_warnings():
        warnings.simplefilter('error')  # mcli only warns about unknown or deprecated fields
        run = FinalRunConfig.finalize_config(RunConfig.from_file(MCLI))
        payload = run.to_create_run_api_input()
    assert run.compute['gpus'] > 0 and run.integrations[0]['integration_type'] == 'git_repo'
    command = payload['runInput']['command']  # as it is sent to the platform
    last = shlex.split(command.replace('\\\n', ' ').splitlines()[-1])
    assert last[0] == 'exec'  # the launcher is the process the platform signals on preemption
    args = _node_args(last[1:])
    # Nodes and ranks come from the platform's environment, not the command.
    assert (args.nnodes, args.node_rank, args.nproc, args.master_addr) == (None, None, None, None)


def test_kubernetes_indexed_job_matches_its_headless_service_and_the_launcher_flags():
    service, job = yaml.safe_load_all(K8S.read_text())
    assert (service['kind'], job['kind']) == ('Service', 'Job')
    spec, pod = job['spec'], job['spec']['template']['spec']
    container = pod['containers'][0]
    args = _node_args(container['command'])

    assert spec['completionMode'] == 'Indexed'
    assert spec['completions'] == spec['parallelism'] == args.nnodes
    assert container['resources']['limits']['nvidia.com/gpu'] == args.nproc
    # Pod i is node rank i, and node 0 is reachable by the name given as the master address.
    rank = next(e for e in container['env'] if e['name'] == 'NODE_RANK')
    assert rank['valueFrom']['fieldRef']['fieldPath'] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert service['spec']['clusterIP'] == 'None'
    assert service['spec']['selector'] == {'job-name': job['metadata']['name']}
    assert pod['subdomain'] == service['metadata']['name']
    assert args.master_addr == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert pod['terminationGracePeriodSeconds'] > 0


def test_slurm_submit_helper_rejects_a_missing_config_before_submitting(tmp_path):
    done = subprocess.run([str(REPO / 'launch' / 'slurm' / 'submit.sh'), '--nodes', '2', 'no/such.yaml'],
                          capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert (done.returncode, done.stderr.strip()) == (2, 'error: config file not found: no/such.yaml')
