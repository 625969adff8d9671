# Sourced by tests/run and bench/run: install what is missing, make .venv.
#   setup_machine [EXTRA_DEBIAN_PACKAGE...]
setup_machine() {
    local missing=("$@")
    [ -x /usr/sbin/sshd ] || command -v sshd >/dev/null || missing+=(openssh-server)
    command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || missing+=(openssh-client)
    command -v rsync >/dev/null || missing+=(rsync)
    # The disk-fault tests mount small tmpfs and ext4 images (tests/test_disk_faults.py).
    command -v mkfs.ext4 >/dev/null && command -v e2fsck >/dev/null || missing+=(e2fsprogs)
    command -v losetup >/dev/null && command -v mount >/dev/null || missing+=(mount)
    # A spawner is killed at the worst moment by strace's fault injection (test_recovery.py).
    command -v strace >/dev/null || missing+=(strace)
    # wait's progress line is tested in a real terminal (tests/test_wait.py).
    command -v tmux >/dev/null || missing+=(tmux)
    # The dashboard's page is tested in a real headless browser (tests/test_dashboard.py).
    command -v chromium >/dev/null || missing+=(chromium)
    python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null \
        || missing+=(python3-venv)
    # tests/test_quickstart.py runs quickstart as a new user (useradd, runuser) with the
    # system's Python, which makes a venv with it.
    command -v useradd >/dev/null && command -v runuser >/dev/null || missing+=(passwd util-linux)
    /usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3 python3-venv)
    # Schedules run in local time; their tests take zones such as Europe/Berlin.
    [ -e /usr/share/zoneinfo/Europe/Berlin ] || missing+=(tzdata)
    if [ ${#missing[@]} -gt 0 ]; then
        local sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
        echo "installing ${missing[*]}" >&2
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check \
        -r requirements.txt -r tests/requirements.txt
}
