#!/usr/bin/env bash
# One-command set-up: the Fashion-MNIST data (Debian package) and semdb with its test tools.
# Usage: bash scripts/setup.sh      (root, or a user with sudo, on Debian/Ubuntu)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get install -y -q dataset-fashion-mnist \
        || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
fi

# PostgreSQL's server programs (initdb, pg_ctl): the tests start a throw-away server with them.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get install -y -q postgresql || { $SUDO apt-get update -q && $SUDO apt-get install -y -q postgresql; }
fi

# issue 13: Debian's chromium for the browser tests (Playwright drives it; it never downloads a browser).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get install -y -q chromium \
        || { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; }
fi

# torch and torchvision are pinned together: PyPI's torchvision only imports beside its matching torch.
python3 -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python3 -m pip install -q -e ".[dev]"
echo "semdb is installed: try 'semdb demo'"
