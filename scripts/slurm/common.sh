# shellcheck shell=bash
# Shared settings for scripts/slurm/{start,stop,env}.sh. Sourced, not executed.
#
# Everything lives under one state directory (default /tmp/dropinf-slurm):
#   etc/   slurm.conf gres.conf cgroup.conf plugstack.conf
#   munge/ key, socket, seed          run/  pid files
#   log/   munged.log slurmctld.log slurmd.log
#   spool/ slurmctld state, slurmd spool
#   env.sh exports SLURM_CONF for client commands (sbatch, squeue, snakemake)
# plus, while the cluster runs, a symlink /run/slurm/conf -> etc/ (see start.sh) and
# the fake GPU device /dev/nvidia0 if it was absent.
#
# Nothing is written to /etc/slurm: with no /etc/slurm/slurm.conf, client
# commands that are not pointed at this cluster fail in milliseconds instead of
# spending ~9 s looking for a controller (see docs/slurm.md).

SLURM_STATE_DIR="${DROPINF_SLURM_STATE:-/tmp/dropinf-slurm}"
SLURM_ETC="$SLURM_STATE_DIR/etc"
SLURM_RUN="$SLURM_STATE_DIR/run"
SLURM_LOG="$SLURM_STATE_DIR/log"
SLURM_SPOOL="$SLURM_STATE_DIR/spool"
MUNGE_DIR="$SLURM_STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
SLURM_CONF_FILE="$SLURM_ETC/slurm.conf"

# Node shape. With SlurmdParameters=config_overrides the node advertises these
# values instead of the real hardware, so jobs sized for an H100 node
# (cpus, mem_mb) are accepted on a small CI machine. Nothing is enforced
# (proctrack/linuxproc, task/none), so jobs just share the real cores.
SLURM_NODE_CPUS="${DROPINF_SLURM_CPUS:-16}"
SLURM_NODE_MEM_MB="${DROPINF_SLURM_MEM_MB:-128000}"
SLURM_GPU_TYPE="${DROPINF_SLURM_GPU_TYPE:-h100}"
SLURM_PARTITION_NAME="${DROPINF_SLURM_PARTITION_NAME:-gpu}"
SLURMCTLD_PORT="${DROPINF_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${DROPINF_SLURMD_PORT:-6818}"
SLURM_NODE_NAME="$(hostname -s)"
FAKE_GPU_DEV=/dev/nvidia0
RUN_CONF_LINK=/run/slurm/conf

log() { printf '[dropinf-slurm] %s\n' "$*" >&2; }
die() { printf '[dropinf-slurm] ERROR: %s\n' "$*" >&2; exit 1; }

# pid_alive PIDFILE NAME: true if PIDFILE names a live process whose command is NAME.
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    [[ $(</proc/$pid/comm) == "$name" ]]
}

# show_log NAME FILE: print the tail of a daemon log to stderr.
show_log() {
    local name=$1 file=$2
    if [[ -s $file ]]; then
        printf -- '----- last lines of %s (%s) -----\n' "$name" "$file" >&2
        tail -n 25 "$file" >&2
        printf -- '-----\n' >&2
    else
        printf '(%s wrote no log at %s)\n' "$name" "$file" >&2
    fi
}
