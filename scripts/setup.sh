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

# Python packages: exactly the committed lock (scripts/lock, `make lock`), every file checked by its hash.
# A venv made from other lock files is made anew, so nothing that was not locked stays installed.
lock=requirements.txt
[[ -n "$extras" ]] && lock=requirements-test.txt
lock_id=$(cat pyproject.toml requirements-build.txt requirements.txt requirements-test.txt | sha256sum | cut -c1-16)
if [[ -x "$VENV/bin/python" && "$(cat "$VENV/.lock" 2>/dev/null)" != "$lock_id" ]]; then
    echo "setup: the lock changed; making $VENV anew"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
    echo "$lock_id" >"$VENV/.lock"
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input)
# pip's status is kept; only the notice about this machine's unused extra index is dropped.
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v "is ignored" >&2); }
installed() { [[ -f "$VENV/.installed-$1" ]]; }
if ! installed "$lock" && ! { [[ $lock == requirements.txt ]] && installed requirements-test.txt; }; then
    echo "setup: installing $lock into $VENV"
    # setuptools first: it builds this project and libvirt-python's sdist, without build isolation, so
    # no unlocked build dependency is fetched either.
    quiet_pip --require-hashes --no-deps -r requirements-build.txt
    quiet_pip --require-hashes --no-deps --no-build-isolation -r "$lock"
    # (setuptools' notice that an editable install is one is not for the user's screen)
    PYTHONWARNINGS=ignore quiet_pip --no-deps --no-build-isolation -e .
    "$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null
    "$VENV/bin/python" -W ignore -c "import scheduler.cli, scheduler.daemon.service, libvirt, asyncssh, aiosqlite, lxml, croniter, aiohttp"
    touch "$VENV/.installed-$lock"
fi
