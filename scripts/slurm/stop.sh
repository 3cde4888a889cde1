#!/usr/bin/env bash
# Stop the single-node SLURM started by scripts/slurm/start.sh: cancel its
# jobs, then stop slurmd, slurmctld and munged by their pid files, and remove
# the fake /dev/nvidia0 if start.sh created it. Idempotent.
#   scripts/slurm/stop.sh           # keep the state dir (logs) for inspection
#   scripts/slurm/stop.sh --purge   # also delete the state dir
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
purge=0; [[ ${1:-} == --purge ]] && purge=1
[[ -d $SLURM_STATE_DIR ]] || { log "no state dir $SLURM_STATE_DIR: nothing to stop"; exit 0; }
export SLURM_CONF="$SLURM_CONF_FILE"

# cancel whatever is still queued/running on this (private) cluster
if pid_alive "$SLURM_RUN/slurmctld.pid" slurmctld; then
    ids=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $ids ]]; then
        log "cancelling jobs: $(echo $ids)"
        # shellcheck disable=SC2086
        scancel $ids 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            [[ -z $(squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
fi

# stop_daemon NAME: SIGTERM the pid from its pid file, SIGKILL after 15 s.
stop_daemon() {
    local name=$1 pidfile="$SLURM_RUN/$1.pid" pid i
    if ! pid_alive "$pidfile" "$name"; then rm -f "$pidfile"; return 0; fi
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.2
    done
    if [[ -d /proc/$pid ]]; then
        log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pidfile"
    log "stopped $name (pid $pid)"
}
stop_daemon slurmd
stop_daemon slurmctld
stop_daemon munged

if [[ -e $SLURM_STATE_DIR/created-nvidia0 ]]; then
    rm -f "$FAKE_GPU_DEV" "$SLURM_STATE_DIR/created-nvidia0"
    log "removed fake GPU device $FAKE_GPU_DEV"
fi
if [[ -e $SLURM_STATE_DIR/created-run-conf ]]; then
    if [[ -L $RUN_CONF_LINK && $(readlink "$RUN_CONF_LINK") == "$SLURM_ETC" ]]; then
        rm -f "$RUN_CONF_LINK"
        rmdir "$(dirname "$RUN_CONF_LINK")" 2>/dev/null || true
    fi
    rm -f "$SLURM_STATE_DIR/created-run-conf"
fi
if ((purge)); then
    rm -rf "$SLURM_STATE_DIR"
    log "removed $SLURM_STATE_DIR"
fi
exit 0
