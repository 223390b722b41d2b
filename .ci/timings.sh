# Shared by .ci/container.sh and .ci/slurm.sh (sourced): a timestamped log line and the table of
# step timings each script prints at its end. The caller sets CI_NAME and fills TIMING_NAMES,
# TIMING_SECS and TIMING_STATUS.
# shellcheck shell=bash

declare -a TIMING_NAMES=() TIMING_SECS=() TIMING_STATUS=()

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$CI_NAME" -1 "$*"; }

print_timings() {
    local i total=0
    printf '\n%-46s %8s  %s\n' "step" "seconds" "status"
    printf '%-46s %8s  %s\n' "----" "-------" "------"
    for i in "${!TIMING_NAMES[@]}"; do
        printf '%-46s %8s  %s\n' "${TIMING_NAMES[$i]}" "${TIMING_SECS[$i]}" "${TIMING_STATUS[$i]}"
        total=$((total + TIMING_SECS[i]))
    done
    printf '%-46s %8s\n' "total" "$total"
}
