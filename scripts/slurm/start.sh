#!/usr/bin/env bash
# Stand up a real single-node SLURM cluster (munged + slurmctld + slurmd) from
# Debian packages, for testing `snakemake --profile slurm` on one machine.
#
#   scripts/slurm/start.sh            # idempotent; prints the SLURM_CONF to use
#   source "${DROPINF_SLURM_STATE:-/tmp/dropinf-slurm}/env.sh"
#   sbatch --wrap hostname; squeue
#   scripts/slurm/stop.sh             # stops what start.sh started (pid files)
#
# The node advertises one fake GPU (gres gpu:h100:1 on /dev/nvidia0, created
# with mknod if absent), so jobs that ask for a GPU are scheduled as GPU jobs
# and get CUDA_VISIBLE_DEVICES=0. Accounting is off (no slurmdbd): use
# `squeue` for job status (the slurm profile does).
#
# Exit codes: 0 ready; 1 a step failed (the daemon's log is printed);
# 3 this machine cannot host the daemons (not root, packages missing and
# no apt-get) -- callers may skip on 3.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

[[ $(id -u) -eq 0 ]] || { log "needs root (daemons run as root, mknod $FAKE_GPU_DEV)"; exit 3; }
if [[ -e /etc/slurm/slurm.conf ]]; then
    # job steps (srun inside a job) would read that file instead of ours
    log "/etc/slurm/slurm.conf exists: this machine already belongs to a SLURM cluster; not starting a test cluster"
    exit 3
fi

# --- 1. packages --------------------------------------------------------------
need=(munged munge unmunge mungekey slurmctld slurmd sbatch squeue sinfo scontrol srun scancel)
missing=()
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 || { log "missing ${missing[*]} and no apt-get to install slurm-wlm/munge"; exit 3; }
    log "installing Debian packages slurm-wlm munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt_log="$(mktemp /tmp/dropinf-slurm-apt.XXXXXX)"
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >"$apt_log" 2>&1; then
        apt-get update -q >>"$apt_log" 2>&1 || true
        apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$apt_log" 2>&1 \
            || { tail -n 30 "$apt_log" >&2; die "apt-get install slurm-wlm munge failed (log: $apt_log)"; }
    fi
    rm -f "$apt_log"
fi

# --- 2. state directory, fake GPU -------------------------------------------
mkdir -p "$SLURM_STATE_DIR"
chmod 700 "$SLURM_STATE_DIR"
mkdir -p "$SLURM_ETC" "$SLURM_RUN" "$SLURM_LOG" "$SLURM_SPOOL/ctld" "$SLURM_SPOOL/d" "$MUNGE_DIR"
chmod 700 "$MUNGE_DIR" "$SLURM_RUN" "$SLURM_LOG"

if [[ ! -e $FAKE_GPU_DEV ]]; then
    mknod "$FAKE_GPU_DEV" c 195 0 || die "mknod $FAKE_GPU_DEV c 195 0 failed (needed for the fake gpu gres)"
    chmod 666 "$FAKE_GPU_DEV"
    : >"$SLURM_STATE_DIR/created-nvidia0"   # stop.sh removes only what we made
    log "created fake GPU device $FAKE_GPU_DEV (char 195:0)"
fi

# --- 3. configuration (rewritten only while no daemon is running) ------------
ctld_running=0; pid_alive "$SLURM_RUN/slurmctld.pid" slurmctld && ctld_running=1
d_running=0; pid_alive "$SLURM_RUN/slurmd.pid" slurmd && d_running=1
if ((ctld_running == 0 && d_running == 0)); then
    cat >"$SLURM_CONF_FILE" <<CONF
# Written by scripts/slurm/start.sh -- single-node test cluster for dropinf.
ClusterName=dropinf
SlurmctldHost=$SLURM_NODE_NAME(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
MpiDefault=none
# no cgroups needed (and none usable in containers/VMs without systemd)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: sacct is disabled, job status comes from squeue, so keep
# finished jobs visible to squeue for an hour (the executor plugin trusts
# squeue only when MinJobAge >= 120 s, otherwise it falls back to sacct).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
# advertise the configured node shape below instead of the real hardware
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation=$SLURM_SPOOL/ctld
SlurmdSpoolDir=$SLURM_SPOOL/d
SlurmctldPidFile=$SLURM_RUN/slurmctld.pid
SlurmdPidFile=$SLURM_RUN/slurmd.pid
SlurmctldLogFile=$SLURM_LOG/slurmctld.log
SlurmdLogFile=$SLURM_LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$SLURM_ETC/plugstack.conf
# records every task's GPU binding: "<job> <step> <CUDA_VISIBLE_DEVICES>" in log/task-env.log
TaskProlog=$SLURM_ETC/task-prolog.sh
NodeName=$SLURM_NODE_NAME NodeAddr=127.0.0.1 CPUs=$SLURM_NODE_CPUS RealMemory=$SLURM_NODE_MEM_MB Gres=gpu:$SLURM_GPU_TYPE:1 State=UNKNOWN
# no Default=YES on purpose: the profile must pass the partition it is given
PartitionName=$SLURM_PARTITION_NAME Nodes=ALL MaxTime=INFINITE State=UP
CONF
    cat >"$SLURM_ETC/gres.conf" <<CONF
AutoDetect=off
NodeName=$SLURM_NODE_NAME Name=gpu Type=$SLURM_GPU_TYPE File=$FAKE_GPU_DEV
CONF
    cat >"$SLURM_ETC/cgroup.conf" <<CONF
# Unused (proctrack/linuxproc, task/none); present so nothing falls back to /etc/slurm.
CgroupPlugin=autodetect
IgnoreSystemd=yes
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
CONF
    : >"$SLURM_ETC/plugstack.conf"
    cat >"$SLURM_ETC/task-prolog.sh" <<PROLOG
#!/bin/sh
echo "\${SLURM_JOB_ID:-?} \${SLURM_STEP_ID:-batch} \${CUDA_VISIBLE_DEVICES-unset}" >>"$SLURM_LOG/task-env.log"
PROLOG
    chmod 755 "$SLURM_ETC/task-prolog.sh"
fi
cat >"$SLURM_STATE_DIR/env.sh" <<ENV
# source me: points SLURM client commands (sbatch, squeue, snakemake's plugin) at this cluster
export SLURM_CONF=$SLURM_CONF_FILE
ENV
export SLURM_CONF="$SLURM_CONF_FILE"
# Job steps cannot rely on SLURM_CONF: the executor plugin's jobstep strips SLURM_*
# variables before its inner `srun`. Client commands fall back to
# /run/slurm/conf/slurm.conf (the configless location) when /etc/slurm/slurm.conf is
# absent, so point that at our etc/ while the cluster runs; stop.sh removes it.
if [[ -L $RUN_CONF_LINK && $(readlink "$RUN_CONF_LINK") == "$SLURM_ETC" ]]; then
    :
elif [[ -e $RUN_CONF_LINK || -L $RUN_CONF_LINK ]]; then
    log "$RUN_CONF_LINK exists and is not ours: this machine runs a configless slurmd; not starting a test cluster"
    exit 3
else
    mkdir -p "$(dirname "$RUN_CONF_LINK")"
    ln -s "$SLURM_ETC" "$RUN_CONF_LINK"
    : >"$SLURM_STATE_DIR/created-run-conf"
fi

# --- 4. munged ----------------------------------------------------------------
if [[ ! -s $MUNGE_DIR/munge.key ]]; then
    mungekey --create --keyfile="$MUNGE_DIR/munge.key" 2>/dev/null \
        || dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    chmod 400 "$MUNGE_DIR/munge.key"
fi
if pid_alive "$SLURM_RUN/munged.pid" munged; then
    log "munged already running (pid $(<"$SLURM_RUN/munged.pid"))"
else
    munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$SLURM_RUN/munged.pid" --log-file="$SLURM_LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || { show_log munged "$SLURM_LOG/munged.log"; die "munged failed to start"; }
    log "started munged (pid $(<"$SLURM_RUN/munged.pid"))"
fi
munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 \
    || { show_log munged "$SLURM_LOG/munged.log"; die "munge credential round trip failed on $MUNGE_SOCKET"; }

# --- 5. slurmctld, slurmd -------------------------------------------------------
# start_daemon NAME ARGS...: start unless its pid file names a live process;
# the daemons fork and write their pid file themselves.
start_daemon() {
    local name=$1; shift
    local pidfile="$SLURM_RUN/$name.pid" i
    if pid_alive "$pidfile" "$name"; then
        log "$name already running (pid $(<"$pidfile"))"; return 0
    fi
    rm -f "$pidfile"
    "$name" "$@" -f "$SLURM_CONF_FILE" || { show_log "$name" "$SLURM_LOG/$name.log"; die "$name failed to start"; }
    for ((i = 0; i < 50; i++)); do
        pid_alive "$pidfile" "$name" && { log "started $name (pid $(<"$pidfile"))"; return 0; }
        sleep 0.2
    done
    show_log "$name" "$SLURM_LOG/$name.log"
    die "$name exited right after starting"
}
start_daemon slurmctld
# wait until the controller answers before starting slurmd (it registers once)
for ((i = 0; i < 60; i++)); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    pid_alive "$SLURM_RUN/slurmctld.pid" slurmctld || { show_log slurmctld "$SLURM_LOG/slurmctld.log"; die "slurmctld died"; }
    sleep 0.5
done
scontrol ping 2>/dev/null | grep -q 'is UP' || { show_log slurmctld "$SLURM_LOG/slurmctld.log"; die "slurmctld does not answer 'scontrol ping'"; }
start_daemon slurmd

# --- 6. wait until the node is idle --------------------------------------------
timeout_s=${DROPINF_SLURM_START_TIMEOUT:-90}
state=""
for ((i = 0; i < timeout_s * 2; i++)); do
    state=$(sinfo -h -N -n "$SLURM_NODE_NAME" -o %T 2>/dev/null | head -n1 || true)
    case $state in
        idle|mixed|allocated) break ;;
        drain*|down*|fail*)
            if ((i > 10)); then
                sinfo -R >&2 || true
                show_log slurmd "$SLURM_LOG/slurmd.log"; show_log slurmctld "$SLURM_LOG/slurmctld.log"
                die "node $SLURM_NODE_NAME is '$state'"
            fi ;;
    esac
    pid_alive "$SLURM_RUN/slurmd.pid" slurmd || { show_log slurmd "$SLURM_LOG/slurmd.log"; die "slurmd died"; }
    pid_alive "$SLURM_RUN/slurmctld.pid" slurmctld || { show_log slurmctld "$SLURM_LOG/slurmctld.log"; die "slurmctld died"; }
    sleep 0.5
done
case $state in
    idle|mixed|allocated) ;;
    *) show_log slurmd "$SLURM_LOG/slurmd.log"; show_log slurmctld "$SLURM_LOG/slurmctld.log"
       die "node $SLURM_NODE_NAME not idle after ${timeout_s}s (state '${state:-none}')" ;;
esac
log "SLURM ready ($(sinfo --version 2>/dev/null)): node $SLURM_NODE_NAME $state, partition $SLURM_PARTITION_NAME, gres gpu:$SLURM_GPU_TYPE:1"
log "use it with: source $SLURM_STATE_DIR/env.sh"
echo "SLURM_CONF=$SLURM_CONF_FILE"
