# Shared settings for the CI Slurm scripts (sourced, not run).
#
# The cluster is one node, "localhost", with munged, slurmctld and slurmd started by
# start-cluster.sh and stopped by stop-cluster.sh through the PIDs recorded here.
# Everything the cluster writes (state, logs, PID files) lives under SLURM_CI_DIR, so a
# failed run leaves its logs in one place.

SLURM_CI_DIR=${SLURM_CI_DIR:-/var/spool/slurm-ci}
SLURM_CI_PIDS=$SLURM_CI_DIR/pids
SLURM_CI_LOGS=$SLURM_CI_DIR/log
# The one partition (default for jobs that name none).
SLURM_CI_PARTITION=${SLURM_CI_PARTITION:-debug}

# The executor plugin's job step drops SLURM_CONF from the environment, so the config must
# sit where every Slurm command looks by default.
SLURM_CONF_DIR=/etc/slurm
# First line of every file we write into $SLURM_CONF_DIR: we only overwrite or delete
# files that carry it, never a site's own Slurm configuration.
SLURM_CI_MARKER="# written by duodiff .ci/slurm/start-cluster.sh; removed by stop-cluster.sh"

# Daemons in start order; stop-cluster.sh stops them in reverse.
SLURM_CI_DAEMONS=(munged slurmctld slurmd)

slurm_ci_log() { echo "[slurm-ci $(date +%H:%M:%S)] $*" >&2; }

# pid_alive NAME: true when NAME's recorded PID is a running process of that name (the
# name check guards against a recycled PID after a crash).
pid_alive() {
    local name=$1 file=$SLURM_CI_PIDS/$1.pid pid comm
    [[ -s $file ]] || return 1
    pid=$(<"$file")
    comm=$(ps -o comm= -p "$pid" 2>/dev/null) || return 1
    [[ $comm == "$name" ]]
}

# Print the tail of every daemon log: what a CI reader needs when something went wrong.
dump_logs() {
    local f
    for f in "$SLURM_CI_LOGS"/*; do
        [[ -f $f ]] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2
    done
}
