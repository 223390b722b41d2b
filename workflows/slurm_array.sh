#!/bin/bash
#SBATCH --job-name=qmri-bids
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=qmri-bids_%A_%a.log
# One participant per array task. Submit with as many tasks as participants.tsv has rows:
#
#   n=$(($(grep -c . "$BIDS_DIR/participants.tsv") - 1))
#   BIDS_DIR=/data/ds OUT_DIR=/data/ds-derivatives/qmri-bids QMRI_RUNNER=apptainer \
#   QMRI_SIF=/containers/qmri-bids_0.1.0.sif sbatch --array=1-$n workflows/slurm_array.sh
#
# Task i processes the i-th participant of participants.tsv (header skipped, 'sub-' stripped).
# Settings come from the environment (sbatch exports it by default):
#   BIDS_DIR, OUT_DIR     required: input BIDS dataset, output derivatives folder (shared storage)
#   QMRI_RUNNER           'native' (default: qmri-bids from PATH or QMRI_BIDS_CMD) or 'apptainer'
#   QMRI_BIDS_CMD         native: the qmri-bids executable (default: qmri-bids on PATH)
#   QMRI_SIF              apptainer: the image (.sif); --nv is added when the task has a GPU
#   QMRI_APPTAINER        apptainer: the command (default: apptainer, else singularity)
#   QMRI_PLUGIN           optional Nipype plugin YAML (e.g. workflows/plugin_multiproc.yml)
#   QMRI_EXTRA_ARGS       optional extra qmri-bids arguments, e.g. "--bias-method both"
#   QMRI_STATUS_TSV       where each task appends its exit code (default:
#                         $OUT_DIR/logs/slurm_array_status.tsv), written under flock
#   QMRI_WORK_ROOT        node-local scratch (default: $SLURM_TMPDIR, else $TMPDIR, else /tmp)
#   QMRI_KEEP_WORK=1      keep the work dir after a successful task (it is always kept after a
#                         failure, and reused when the same task is resubmitted on the same node)
# The resources are those of the #SBATCH header (or of sbatch's command line): qmri-bids gets
# --nprocs $SLURM_CPUS_PER_TASK --mem $SLURM_MEM_PER_NODE (MB).
set -euo pipefail

die() { echo "slurm_array.sh: $*" >&2; exit "${2:-64}"; }

: "${BIDS_DIR:?set BIDS_DIR to the input BIDS dataset}"
: "${OUT_DIR:?set OUT_DIR to the output derivatives folder}"
TASK=${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=1-N (one task per participant)}
JOB=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}
RUNNER=${QMRI_RUNNER:-native}
[ -f "$BIDS_DIR/participants.tsv" ] || die "$BIDS_DIR/participants.tsv not found" 66

# The TASK-th participant: first column, header skipped, CR (Windows line ends) and 'sub-' removed.
LABEL=$(awk -F'\t' -v n="$TASK" 'NR > 1 { sub(/\r$/, "", $1) } NR > 1 && $1 != "" { i++ }
    NR > 1 && $1 != "" && i == n { sub(/^sub-/, "", $1); print $1; exit }' \
    "$BIDS_DIR/participants.tsv")
[ -n "$LABEL" ] || die "array task $TASK: participants.tsv has fewer than $TASK participants"

NPROCS=${SLURM_CPUS_PER_TASK:-1}
if [ -n "${SLURM_MEM_PER_NODE:-}" ]; then
    MEM_MB=$SLURM_MEM_PER_NODE
elif [ -n "${SLURM_MEM_PER_CPU:-}" ]; then
    MEM_MB=$((SLURM_MEM_PER_CPU * NPROCS))
else
    MEM_MB=""
fi

SCRATCH_ROOT=${QMRI_WORK_ROOT:-${SLURM_TMPDIR:-${TMPDIR:-/tmp}}}
WORK_DIR=$SCRATCH_ROOT/qmri-bids_${JOB}_${TASK}_sub-${LABEL}
STATUS_TSV=${QMRI_STATUS_TSV:-$OUT_DIR/logs/slurm_array_status.tsv}
mkdir -p "$OUT_DIR" "$WORK_DIR" "$(dirname "$STATUS_TSV")"

ARGS=(participant --participant-label "$LABEL" --nprocs "$NPROCS")
[ -n "$MEM_MB" ] && ARGS+=(--mem "$MEM_MB")
# shellcheck disable=SC2206  # QMRI_EXTRA_ARGS is split on purpose
[ -n "${QMRI_EXTRA_ARGS:-}" ] && ARGS+=($QMRI_EXTRA_ARGS)

case "$RUNNER" in
    native)
        CMD=("${QMRI_BIDS_CMD:-qmri-bids}" "$BIDS_DIR" "$OUT_DIR" "${ARGS[@]}" -w "$WORK_DIR")
        [ -n "${QMRI_PLUGIN:-}" ] && CMD+=(--use-plugin "$QMRI_PLUGIN")
        ;;
    apptainer|singularity)
        : "${QMRI_SIF:?QMRI_RUNNER=apptainer needs QMRI_SIF (the .sif image)}"
        APPTAINER=${QMRI_APPTAINER:-$(command -v apptainer || command -v singularity || true)}
        [ -n "$APPTAINER" ] || die "neither apptainer nor singularity is on PATH" 69
        BINDS=(-B "$BIDS_DIR:/data:ro" -B "$OUT_DIR:/out" -B "$WORK_DIR:/work")
        GPU=()
        if [ -n "${SLURM_JOB_GPUS:-}${SLURM_STEP_GPUS:-}" ] || [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
            GPU=(--nv)
        fi
        CMD=("$APPTAINER" run --cleanenv "${GPU[@]}" "${BINDS[@]}")
        if [ -n "${QMRI_PLUGIN:-}" ]; then
            CMD+=(-B "$QMRI_PLUGIN:/opt/plugin.yml:ro")
        fi
        CMD+=("$QMRI_SIF" /data /out "${ARGS[@]}" -w /work)
        [ -n "${QMRI_PLUGIN:-}" ] && CMD+=(--use-plugin /opt/plugin.yml)
        ;;
    *) die "QMRI_RUNNER must be 'native' or 'apptainer', not '$RUNNER'" ;;
esac

# shellcheck disable=SC2094  # the lock file is the TSV itself, only appended to
record() {  # record EXIT_CODE SECONDS: one TSV row per task, appended under an exclusive lock
    local line
    line=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "sub-$LABEL" "$JOB" "$TASK" \
        "$(hostname -s)" "$RUNNER" "$1" "$2" "$(date -u +%Y-%m-%dT%H:%M:%SZ)")
    (
        flock -w 120 9 || { echo "slurm_array.sh: could not lock $STATUS_TSV" >&2; exit 0; }
        if [ ! -s "$STATUS_TSV" ]; then
            printf 'participant_id\tjob_id\ttask_id\tnode\trunner\texit_code\tseconds\tfinished\n' >&9
        fi
        printf '%s\n' "$line" >&9
    ) 9>>"$STATUS_TSV"
}

echo "slurm_array.sh: job $JOB task $TASK -> sub-$LABEL on $(hostname -s); runner $RUNNER;" \
     "nprocs $NPROCS, mem ${MEM_MB:-unset} MB; work $WORK_DIR"
echo "slurm_array.sh: ${CMD[*]}"

START=$(date +%s)
CHILD=""
# scancel / the time limit send SIGTERM: pass it on, record 143, keep the work dir for resuming.
# shellcheck disable=SC2329  # called by the trap
on_term() {
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
    [ -n "$CHILD" ] && wait "$CHILD" 2>/dev/null
    record 143 $(($(date +%s) - START))
    exit 143
}
trap on_term TERM INT
"${CMD[@]}" &
CHILD=$!
RC=0
wait "$CHILD" || RC=$?
CHILD=""
record "$RC" $(($(date +%s) - START))

if [ "$RC" -eq 0 ] && [ "${QMRI_KEEP_WORK:-0}" != 1 ]; then
    rm -rf "$WORK_DIR"
elif [ "$RC" -ne 0 ]; then
    echo "slurm_array.sh: sub-$LABEL failed (exit $RC); work dir kept on $(hostname -s):" \
         "$WORK_DIR; crash files: $OUT_DIR/sub-$LABEL/log/" >&2
fi
exit "$RC"
