#!/bin/bash
# Submit a training run to Slurm: N nodes x G GPUs, logs under logs/slurm/.
#
#   launch/slurm/submit.sh [--nodes N] [--gpus-per-node G] [other sbatch options] CONFIG.yaml [key=value ...]
#
# --gpus-per-node 0 trains on CPUs, one process per node. Other options (--time, --partition,
# --account, --qos, --signal, ...) go to sbatch unchanged; write them as --option=value.
# Prints the job id. Needs the virtual environment active, or PYTHON set to its python.
set -eu

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

repo=$(cd "$(dirname "$0")/../.." && pwd)
nodes=1
gpus=
sbatch_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -N|--nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
        --nodes=*) nodes=${1#*=}; shift ;;
        -G|--gpus-per-node) gpus=${2:?--gpus-per-node needs a number}; shift 2 ;;
        --gpus-per-node=*) gpus=${1#*=}; shift ;;
        -h|--help) usage ;;
        -*) sbatch_args+=("$1"); shift ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
config=$1
shift
# The job runs in the repository root: make a path given relative to here absolute.
if [ -f "$config" ]; then
    config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
elif [ ! -f "$repo/$config" ]; then
    echo "error: config file not found: $config" >&2
    exit 2
fi

if [ -n "$gpus" ] && [ "$gpus" -gt 0 ]; then
    sbatch_args+=("--gpus-per-node=$gpus")
    export NPROC_PER_NODE=$gpus
elif [ -n "$gpus" ]; then
    export NPROC_PER_NODE=1
fi
export PYTHON=${PYTHON:-$(command -v python3)}
log_root=${LOG_ROOT:-logs/slurm}
(cd "$repo" && mkdir -p "$log_root")  # Slurm does not create the folder of --output

name=$(basename "$config" .yaml)
exec sbatch --parsable --chdir="$repo" --job-name="$name" --nodes="$nodes" --output="$log_root/%x-%j.out" \
    ${sbatch_args[@]+"${sbatch_args[@]}"} "$repo/launch/slurm/train.sbatch" "$config" "$@"
