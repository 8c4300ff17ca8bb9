#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost for CI: munged, slurmctld and slurmd, each
# started in the foreground of a background shell job so that its PID is known exactly
# and stop-cluster.sh can stop it by that PID.
#
# Needs root (it installs Debian's slurm-wlm and munge when missing and writes
# /etc/slurm/slurm.conf). Returns once the node is idle and a job step and a GPU (gres) job
# have run. On failure it prints the daemon logs; whatever it did start is recorded, so
# stop-cluster.sh (run it from a trap) cleans up.
#
# Settings (environment): SLURM_CI_DIR (state, logs, PIDs; default /var/spool/slurm-ci),
# SLURM_CI_CPUS (default: nproc), SLURM_CI_MEM_MARGIN_MB (memory kept back from Slurm for
# the daemons and Snakemake itself; default 2048), SLURM_CI_START_TIMEOUT_S (default 60).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

cpus=${SLURM_CI_CPUS:-$(nproc)}
mem_margin_mb=${SLURM_CI_MEM_MARGIN_MB:-2048}
start_timeout_s=${SLURM_CI_START_TIMEOUT_S:-60}

if [[ $(id -u) -ne 0 ]]; then
    slurm_ci_log "must run as root (installs packages, writes $SLURM_CONF_DIR, starts daemons)"
    exit 1
fi

install_packages() {
    local needed=(munged mungekey slurmctld slurmd sbatch srun squeue sinfo scontrol)
    local missing=0 cmd
    for cmd in "${needed[@]}"; do
        command -v "$cmd" >/dev/null || missing=1
    done
    (( missing )) || return 0
    slurm_ci_log "installing slurm-wlm and munge"
    # Package scripts must not start daemons: every daemon here is one we started and
    # can stop by PID. Debian asks /usr/sbin/policy-rc.d first; 101 means "do not start".
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    local rc=0
    {
        apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                slurm-wlm munge
    } || rc=$?
    (( made_policy )) && rm -f "$policy"
    return "$rc"
}

# fill_template IN OUT: replace the @...@ fields of a template from .ci/slurm.
fill_template() {
    local memory_mb
    memory_mb=$(( $(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - mem_margin_mb ))
    sed -e "s|@MARKER@|$SLURM_CI_MARKER|" \
        -e "s|@DIR@|$SLURM_CI_DIR|g" \
        -e "s|@CPUS@|$cpus|" \
        -e "s|@MEMORY@|$memory_mb|" \
        -e "s|@PARTITION@|$SLURM_CI_PARTITION|" \
        "$1" >"$2.tmp"
    mv "$2.tmp" "$2"
}

write_config() {
    local name
    mkdir -p "$SLURM_CONF_DIR"
    for name in slurm.conf gres.conf; do
        if [[ -e $SLURM_CONF_DIR/$name ]] &&
            [[ $(head -n 1 "$SLURM_CONF_DIR/$name") != "$SLURM_CI_MARKER" ]]; then
            slurm_ci_log "$SLURM_CONF_DIR/$name exists and was not written by this script;" \
                "refusing to replace a real Slurm configuration"
            exit 1
        fi
        fill_template "$here/$name.in" "$SLURM_CONF_DIR/$name"
    done
}

# start NAME CMD...: run CMD in the background (foreground mode of the daemon), record
# its PID. setpriv execs, so the recorded PID is the daemon's own.
start() {
    local name=$1
    shift
    "$@" >"$SLURM_CI_LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$SLURM_CI_PIDS/$name.pid"
    slurm_ci_log "started $name (pid $!)"
}

# wait_for WHAT CMD...: poll CMD until it succeeds, fail after start_timeout_s.
wait_for() {
    local what=$1 deadline=$((SECONDS + start_timeout_s))
    shift
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS >= deadline )); then
            slurm_ci_log "timed out after ${start_timeout_s}s waiting for $what"
            return 1
        fi
        sleep 1
    done
}

node_idle() { [[ $(sinfo -h -N -n localhost -o %T) == idle ]]; }

on_error() {
    slurm_ci_log "cluster start failed; daemon logs follow (stop-cluster.sh stops what did start)"
    dump_logs
}
trap on_error ERR

install_packages

for name in "${SLURM_CI_DAEMONS[@]}"; do
    if pid_alive "$name"; then
        slurm_ci_log "$name is already running (pid $(<"$SLURM_CI_PIDS/$name.pid")); run stop-cluster.sh first"
        exit 1
    fi
done

mkdir -p "$SLURM_CI_PIDS" "$SLURM_CI_LOGS" "$SLURM_CI_DIR/slurmctld" "$SLURM_CI_DIR/slurmd"
rm -f "$SLURM_CI_LOGS"/*
write_config

# munge: the key normally comes with the package; make one if it did not.
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
start munged setpriv --reuid=munge --regid=munge --init-groups -- munged --foreground --force
wait_for "munged to sign a credential" bash -c 'munge -n | unmunge'

# -c: start from empty state, so no job of an earlier run comes back.
start slurmctld slurmctld -D -c -i
wait_for "slurmctld to answer" bash -c 'scontrol ping | grep -q UP'
start slurmd slurmd -D -N localhost
wait_for "node localhost to be idle" node_idle

# A job step, and a job that must be given a GPU to run.
timeout 60 srun -N1 -n1 --time=1 hostname >/dev/null
gpus=$(timeout 60 srun -N1 -n1 --time=1 --gres=gpu:1 printenv CUDA_VISIBLE_DEVICES)
if [[ -z $gpus ]]; then
    slurm_ci_log "a --gres=gpu:1 job ran without CUDA_VISIBLE_DEVICES: gres is not set up"
    false
fi
wait_for "node localhost to be idle again" node_idle
slurm_ci_log "cluster up: $(sinfo -h -N -n localhost -o '%N %T cpus=%c mem=%mMB gres=%G')"
