#!/bin/bash
# Run an mpiopt configuration on a list of hosts with the mpiexec that came with mpiopt
# (MPICH's hydra), without a batch system.
#   jobs/hosts/mpiexec.sh jobs/configs/quickstart.yaml [mpiopt run options]
# `mpiopt jobs hosts CONFIG --hosts node1,node2 --tasks-per-node 4` prints it filled in.
# Needs on every host the environment at the same path, passwordless ssh to the other hosts
# from this one (hydra starts one proxy per host with ssh; this host runs its own without),
# TCP between the hosts on any port, and the run directory on a file system every host sees
# (each rank writes its own metrics file there; rank 0 merges them at the end).
set -euo pipefail
CONFIG=${1:?usage: mpiexec.sh CONFIG [mpiopt run options]}
shift
HOSTS=(localhost)
TASKS_PER_NODE=4

MPIOPT_VENV=${MPIOPT_VENV:-}
if [ -n "$MPIOPT_VENV" ]; then source "$MPIOPT_VENV/bin/activate"; fi
# Hydra passes this environment (PATH, the venv, these settings) on to every rank.
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

HOSTLIST=$(printf "%s:$TASKS_PER_NODE," "${HOSTS[@]}")
RANKS=$(( ${#HOSTS[@]} * TASKS_PER_NODE ))
OUT=${MPIOPT_OUT:-runs/hosts-$(date +%Y%m%d-%H%M%S)}
# -hosts NAME:N places N ranks on each host, in order. A rank that fails ends every rank.
mpiexec -hosts "${HOSTLIST%,}" -n "$RANKS" mpiopt run "$CONFIG" --quiet --out "$OUT" "$@"
