#!/usr/bin/env bash
# Stop the CI Slurm cluster that start-cluster.sh started: cancel any job still queued or
# running, stop slurmd, slurmctld and munged by their recorded PIDs (TERM, then KILL after
# a grace period), and remove the config files start-cluster.sh wrote. Safe to run when
# nothing, or only part of the cluster, is running; always exits 0 so it fits in a trap.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

grace_s=${SLURM_CI_STOP_GRACE_S:-20}
# A closed stderr (say, a pipe to `head` that has exited) must not kill us halfway.
trap '' PIPE

# Jobs first, while the controller can still cancel them: slurmstepd processes outlive
# slurmd, so stopping the daemons alone would leave job processes behind.
if pid_alive slurmctld; then
    jobs=$(timeout 10 squeue -h -t PD,R,CG,S -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// } ]]; then
        slurm_ci_log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086  # one job id per word
        timeout 10 scancel $jobs || true
        deadline=$((SECONDS + grace_s))
        while (( SECONDS < deadline )) &&
            [[ -n $(timeout 10 squeue -h -t R,CG -o %i 2>/dev/null) ]]; do
            sleep 1
        done
    fi
fi

stop() {
    local name=$1 file=$SLURM_CI_PIDS/$1.pid pid deadline
    if ! pid_alive "$name"; then
        rm -f "$file"
        return 0
    fi
    pid=$(<"$file")
    kill -TERM "$pid" 2>/dev/null
    deadline=$((SECONDS + grace_s))
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        slurm_ci_log "$name (pid $pid) ignored TERM for ${grace_s}s; sending KILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    # Our own background job when called from the shell that started it; reap it quietly.
    wait "$pid" 2>/dev/null
    slurm_ci_log "stopped $name (pid $pid)"
    rm -f "$file"
}

for (( i = ${#SLURM_CI_DAEMONS[@]} - 1; i >= 0; i-- )); do
    stop "${SLURM_CI_DAEMONS[i]}"
done

# Without its daemons a left-over slurm.conf only makes Slurm tools (and the Snakemake
# plugin's start-up probe, `scontrol show config`) wait for a controller that is gone.
for name in slurm.conf gres.conf; do
    if [[ -e $SLURM_CONF_DIR/$name ]] &&
        [[ $(head -n 1 "$SLURM_CONF_DIR/$name") == "$SLURM_CI_MARKER" ]]; then
        rm -f "$SLURM_CONF_DIR/$name"
    fi
done
exit 0
