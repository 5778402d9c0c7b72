#!/usr/bin/env bash
# Install what vmsched needs on a fresh Debian machine (root, apt, PyPI). Idempotent: a second run
# installs nothing and takes about a second.
#   scripts/setup.sh          the service
#   scripts/setup.sh --test   the service and everything its tests need
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
packages=(libvirt-dev pkg-config gcc)          # libvirt-python builds against libvirt's headers
packages+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
           openssh-client openssh-server rsync restic)   # hosts, disks and backup tools (never libvirt-daemon-system)
extras=""
if [[ "${1:-}" == "--test" ]]; then
    extras="[test]"
    packages+=(iproute2)   # tests/test_demo_real.py brings up loopback in a network namespace of its own
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: root is needed to install Debian packages: ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
fi
stamp="$VENV/.installed$extras"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    "$VENV/bin/pip" install -q -e ".$extras" 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -c "import scheduler, libvirt, asyncssh, aiosqlite, lxml, croniter, aiohttp"
    touch "$stamp"
fi
