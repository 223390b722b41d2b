#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, and workflows/slurm_array.sh run on it.
#
#   .ci/slurm.sh            (as root; called by .ci/run)
#
# Steps (each timed; table at the end):
#   1. installs Debian's slurm-wlm and munge when missing
#   2. writes a munge key and a minimal slurm.conf (one node = this host, CPUs from nproc,
#      RealMemory from free, partition debug) under a private directory; ports 16817/16818 so a
#      system SLURM is never touched
#   3. starts munged, slurmctld, slurmd in the foreground mode in the background (PIDs recorded;
#      an EXIT trap stops them by PID), waits until sinfo shows the node idle
#   4. makes the 2-participant demo dataset (qmri-bids demo)
#   5. sbatch --wait --array=1-2 workflows/slurm_array.sh with the native install (one CPU per
#      task, so that both tasks run at the same time and append to the status TSV together)
#   6. checks the status TSV (two rows, exit code 0) and the derivatives of both participants
#   7. runs sub-01 with --use-plugin workflows/plugin_slurmgraph.yml (one job per node), waits for
#      the queue to drain, checks its derivatives
# Every wait has a timeout. Exit status 0 when everything passed.
#
# Environment (optional): QMRI_SLURM_GRAPH=0 (skip the SLURMGraph run of plugin_slurmgraph.yml),
#   QMRI_SLURM_DIR (default /tmp/qmri-ci-slurm; wiped at the start),
#   QMRI_BIDS_CMD (the native qmri-bids; default: next to python3), QMRI_SLURM_TIMEOUT (900 s).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=${QMRI_SLURM_DIR:-/tmp/qmri-ci-slurm}
HOST=$(hostname -s)
JOB_TIMEOUT=${QMRI_SLURM_TIMEOUT:-900}
export SLURM_CONF=$D/etc/slurm.conf
declare -A PIDS=()
export CI_NAME=slurm.sh
# shellcheck source=.ci/timings.sh
source "$(dirname "${BASH_SOURCE[0]}")/timings.sh"

# step NAME COMMAND...: run COMMAND in this shell, errexit on (a failure ends the script; the
# EXIT trap records the step as failed). Every command bounds its own waits.
CURRENT_STEP="" CURRENT_START=0
step() {
    CURRENT_STEP=$1 CURRENT_START=$(date +%s)
    shift
    log "== $CURRENT_STEP"
    "$@"
    TIMING_NAMES+=("$CURRENT_STEP")
    TIMING_SECS+=("$(($(date +%s) - CURRENT_START))")
    TIMING_STATUS+=("ok")
    CURRENT_STEP=""
}

stop_pid() {  # stop_pid NAME PID: SIGTERM, up to 20 s, then SIGKILL
    local name=$1 pid=$2
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
    log "$name did not stop in 20 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

stop_daemons() {
    local name
    for name in slurmd slurmctld munged; do
        if [ -n "${PIDS[$name]:-}" ]; then
            stop_pid "$name" "${PIDS[$name]}"
            unset "PIDS[$name]"
        fi
    done
}

cleanup() {
    local rc=$? why
    set +e  # nothing in here may end the trap early: the daemons must be stopped
    if [ -n "$CURRENT_STEP" ]; then
        why="exit $rc"
        if [ "$rc" -eq 124 ]; then why="$why, timed out"; fi
        TIMING_NAMES+=("$CURRENT_STEP")
        TIMING_SECS+=("$(($(date +%s) - CURRENT_START))")
        TIMING_STATUS+=("FAILED ($why)")
    fi
    if [ "$rc" -ne 0 ] && [ -d "$D/log" ]; then
        for f in "$D"/log/*.log "$D"/jobs/*.log; do
            [ -f "$f" ] && { echo "---- tail $f"; tail -n 25 "$f"; }
        done
    fi
    stop_daemons
    print_timings
    log "exit $rc (files kept in $D)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------------------------
install_slurm() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v flock >/dev/null || missing+=(util-linux)
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || { log "need root to install ${missing[*]}"; return 1; }
        timeout 120 apt-get update -q
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q \
            --no-install-recommends "${missing[@]}"
    fi
    slurmctld -V
    munged --version
}

leftovers() {  # daemons of an interrupted earlier run of this script: stop them by pid file
    local f pid
    for f in "$D"/run/*.pid; do
        [ -s "$f" ] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null && grep -qE 'munged|slurm' "/proc/$pid/cmdline" 2>/dev/null
        then
            stop_pid "leftover $(basename "$f" .pid)" "$pid"
        fi
    done
}

configure() {
    leftovers
    rm -rf "$D"
    mkdir -p "$D"/{etc,run,log,state,spool,munge,jobs,data}
    chmod 700 "$D/munge" "$D/etc"
    dd if=/dev/urandom of="$D/etc/munge.key" bs=1024 count=1 status=none
    chmod 400 "$D/etc/munge.key"
    local cpus mem addr
    cpus=$(nproc)
    mem=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
    addr=$(getent hosts "$HOST" | awk '{print $1; exit}')
    addr=${addr:-127.0.0.1}
    cat >"$SLURM_CONF" <<EOF
ClusterName=qmrici
SlurmctldHost=$HOST($addr)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
NodeName=$HOST NodeAddr=$addr CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    cat "$SLURM_CONF"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2
    shift 2
    for _ in $(seq 1 "$limit"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    log "timed out after ${limit}s waiting for $what"
    return 124
}

node_idle() { [ "$(sinfo -h -n "$HOST" -o %t 2>/dev/null)" = idle ]; }

start_daemons() {
    munged --foreground --force --key-file="$D/etc/munge.key" --socket="$D/munge/munge.socket" \
        --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" \
        --seed-file="$D/munge/munge.seed" >"$D/log/munged.out" 2>&1 &
    PIDS[munged]=$!
    wait_for 30 "munged" test -S "$D/munge/munge.socket"
    munge -n --socket="$D/munge/munge.socket" | unmunge --socket="$D/munge/munge.socket" >/dev/null
    log "munged pid ${PIDS[munged]}: credentials encode and decode"

    slurmctld -D -i -f "$SLURM_CONF" >"$D/log/slurmctld.out" 2>&1 &
    PIDS[slurmctld]=$!
    wait_for 60 "slurmctld" scontrol ping
    log "slurmctld pid ${PIDS[slurmctld]}"

    slurmd -D -f "$SLURM_CONF" -N "$HOST" >"$D/log/slurmd.out" 2>&1 &
    PIDS[slurmd]=$!
    log "slurmd pid ${PIDS[slurmd]}"
    if ! wait_for 90 "node $HOST idle" node_idle; then
        sinfo -N -l || true
        scontrol show node "$HOST" || true
        return 124
    fi
    sinfo -N -o '%N %t %c %m %P'
}

make_demo() {
    QMRI_BIDS_CMD=${QMRI_BIDS_CMD:-$(python3 -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "qmri-bids"))')}
    [ -x "$QMRI_BIDS_CMD" ] || QMRI_BIDS_CMD=$(command -v qmri-bids)
    export QMRI_BIDS_CMD
    log "native qmri-bids: $QMRI_BIDS_CMD"
    timeout 300 "$QMRI_BIDS_CMD" demo "$D/data/bids" --subjects 2
    cat "$D/data/bids/participants.tsv"
}

run_array() {
    local n
    n=$(awk -F'\t' 'NR > 1 && $1 != ""' "$D/data/bids/participants.tsv" | wc -l)
    [ "$n" -eq 2 ] || { log "expected 2 participants, found $n"; return 1; }
    # Everything the job needs travels in its environment (sbatch --export=ALL is the default).
    export BIDS_DIR=$D/data/bids OUT_DIR=$D/data/out QMRI_RUNNER=native \
        QMRI_WORK_ROOT=$D/data/scratch QMRI_STATUS_TSV=$D/data/out/logs/slurm_array_status.tsv
    mkdir -p "$QMRI_WORK_ROOT"
    # Resources on the command line override the #SBATCH header: 1 CPU and 3 GB per task, so
    # the two tasks share this 2-CPU node at the same time.
    timeout "$JOB_TIMEOUT" sbatch --wait --array=1-"$n" --cpus-per-task=1 --mem=3000 \
        --time=00:20:00 --chdir="$D/jobs" --output="$D/jobs/qmri-bids_%A_%a.log" \
        "$REPO/workflows/slurm_array.sh"
}

check_results() {
    local tsv=$D/data/out/logs/slurm_array_status.tsv f
    for f in "$D"/jobs/*.log; do echo "---- $f"; tail -n 6 "$f"; done
    echo "---- $tsv"
    cat "$tsv"
    python3 - "$tsv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
got = sorted((r["participant_id"], r["exit_code"]) for r in rows)
want = [("sub-01", "0"), ("sub-02", "0")]
assert got == want, f"status TSV: {got}, expected {want}"
assert len({r["task_id"] for r in rows}) == 2, "the two rows must come from two tasks"
print("status TSV: 2 tasks, both exit 0")
EOF
    python3 "$REPO/tests/container/check_derivatives.py" "$D/data/bids" "$D/data/out"
    # The scratch work dirs of successful tasks are removed.
    if compgen -G "$D/data/scratch/qmri-bids_*" >/dev/null; then
        log "work dirs left in $D/data/scratch: $(ls "$D/data/scratch")"
        return 1
    fi
}

# Unless QMRI_SLURM_GRAPH=0: the SLURMGraph plugin, one SLURM job per workflow node. Nipype's
# graph plugins submit and return at once, so wait for the queue to drain before checking.
run_slurmgraph() {
    local out=$D/data/out-graph work=$D/data/work-graph
    timeout 300 "$QMRI_BIDS_CMD" "$D/data/bids" "$out" participant --participant-label 01 \
        -w "$work" --skip-bids-validation --use-plugin "$REPO/workflows/plugin_slurmgraph.yml"
    local waited=0
    while [ -n "$(squeue -h -o %i 2>/dev/null)" ]; do
        [ "$waited" -lt "$JOB_TIMEOUT" ] || { log "SLURMGraph jobs still queued"; squeue; return 124; }
        sleep 5; waited=$((waited + 5))
    done
    python3 "$REPO/tests/container/check_derivatives.py" "$D/data/bids" "$out" \
        --participant-label 01
}

# ------------------------------------------------------------------------------------------------
log "repo $REPO, cluster dir $D, host $HOST"
step "install slurm-wlm, munge" install_slurm
step "configure (munge key, slurm.conf)" configure
step "start munged, slurmctld, slurmd; node idle" start_daemons
step "qmri-bids demo (2 participants)" make_demo
step "sbatch --wait --array=1-2 slurm_array.sh" run_array
step "check status TSV and derivatives" check_results
if [ "${QMRI_SLURM_GRAPH:-1}" = 1 ]; then
    step "SLURMGraph plugin, sub-01 (one job per node)" run_slurmgraph
fi
step "stop daemons" stop_daemons
log "SLURM array test passed"
