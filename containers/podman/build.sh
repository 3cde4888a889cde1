#!/usr/bin/env bash
# Build an image equivalent to containers/dropinf.def with podman, from a local debootstrap root
# file system (for machines with no Apptainer and no reachable container registry).
#
#   containers/podman/build.sh [IMAGE]          # default IMAGE: localhost/dropinf:latest
#
# "Equivalent": the %files and %post sections of containers/dropinf.def are translated into a
# Containerfile verbatim (COPY lines, one RUN with the same shell), so the same pinned versions are
# installed by the same commands. Only the base differs: Debian bookworm (Python 3.11, as
# python:3.11-slim) from debootstrap instead of the Docker Hub image. Needs root, debootstrap,
# podman and runc (apt-get install podman debootstrap runc); pip reads the host's pip
# configuration, CA bundle and local wheel directories, bound read-only into the build.
set -euo pipefail
IMAGE=${1:-localhost/dropinf:latest}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DEF=$REPO/containers/dropinf.def
WORK=${DROPINF_PODMAN_WORK:-/var/tmp/dropinf-podman}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PODMAN=(podman --runtime runc)
# podman's default rlimits (nofile 1048576, nproc 4194304) cannot be set on these VMs: ask for less
NPROC=${DROPINF_PODMAN_NPROC:-32768}
ULIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=$NPROC:$NPROC")
mkdir -p "$WORK"

# 1. base image: a minimal bookworm root file system with Python 3.11 and pip
if ! "${PODMAN[@]}" image exists localhost/dropinf-base:bookworm; then
    if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase \
            --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
            bookworm "$WORK/rootfs" "$MIRROR"
    fi
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
        --change 'CMD ["/bin/bash"]' - localhost/dropinf-base:bookworm
fi

# 2. Containerfile from the Apptainer definition (%files -> COPY, %post -> RUN, %environment -> ENV)
python3 "$REPO/containers/podman/containerfile.py" "$DEF" localhost/dropinf-base:bookworm > "$WORK/Containerfile"

# 3. build (host network: PyPI; the host's pip configuration and wheel directories, read-only)
VOLUMES=()
for d in /opt/wheels /opt/pypi /opt/pypi-more /etc/pip.conf /etc/xdg/pip /etc/ssl/certs/ca-certificates.crt; do
    [ -e "$d" ] && VOLUMES+=(--volume "$d:$d:ro")
done
"${PODMAN[@]}" build --network host "${VOLUMES[@]}" -f "$WORK/Containerfile" -t "$IMAGE" "$REPO"
"${PODMAN[@]}" run --rm "${ULIMITS[@]}" "$IMAGE" python -c "import dropinf, torch, zarr, snakemake; print('dropinf', dropinf.__version__, 'torch', torch.__version__, 'zarr', zarr.__version__)"
