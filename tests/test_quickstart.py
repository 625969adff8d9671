"""quickstart, the README's one command: run as a new local user in a fresh copy of the
repository, with the system's Python and the system's sshd on localhost:22, as a
newcomer on a machine where everything is installed and sshd runs (no sudo needed).

The user's home comes from the password database; $HOME points elsewhere, so a
quickstart that went by $HOME would be caught.  Root's own ~/.ssh is never used.
"""
import hashlib
import itertools
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from conftest import process_alive, wait_until

REPO = pathlib.Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"    # root's python3 may be a pyenv shim the user cannot run
USER_NUMBERS = itertools.count(1)
# Passed on to the user's commands: how pip reaches packages on this machine.
PASSED_ON = re.compile(r"PIP_\w+|(?i:https?_proxy|no_proxy)\Z")


def ssh_banner(port):
    """The SSH greeting on localhost:PORT, '' for another program, None if none listens."""
    try:
        with socket.create_connection(("localhost", port), timeout=5) as connection:
            return connection.recv(256).decode(errors="replace").strip()
    except ConnectionRefusedError:
        return None
    except OSError:
        return ""


@pytest.fixture(scope="module")
def system_sshd(tmp_path_factory):
    """The system's sshd on localhost:22 with /etc/ssh/sshd_config: the one running, or
    one started here (on loopback only) and stopped at the end."""
    banner = ssh_banner(22)
    if banner is not None and banner.startswith("SSH-"):
        yield
        return
    if banner is not None:
        pytest.fail(f"localhost:22 is taken by something that is not sshd ({banner!r})")
    if os.geteuid() != 0:
        pytest.fail("nothing listens on localhost:22 and only root can start sshd there")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        pytest.fail("sshd is not installed: apt-get install openssh-server (tests/run does)")
    subprocess.run(["ssh-keygen", "-A"], check=True, capture_output=True)  # host keys, if missing
    os.makedirs("/run/sshd", exist_ok=True)
    log = tmp_path_factory.mktemp("sshd") / "sshd.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen([sshd, "-D", "-e", "-o", "ListenAddress=127.0.0.1",
                                    "-o", "ListenAddress=::1"],
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:
        wait_until(lambda: process.poll() is not None or (ssh_banner(22) or "")[:4] == "SSH-",
                   what="sshd on localhost:22")
        assert process.poll() is None, f"sshd exited: {log.read_text()}"
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


class NewUser:
    """A new local account with a real home (from the password database), no sudo, and a
    copy of the repository's files in ~/cli-py."""

    def __init__(self):
        if os.geteuid() != 0:
            pytest.fail("this test creates a local user: run the suite as root, as CI does")
        for tool in ("useradd", "userdel", "runuser"):
            if not shutil.which(tool):
                pytest.fail(f"{tool} is needed: apt-get install passwd util-linux")
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="clipy-quickstart-"))
        self.root.chmod(0o755)
        self.home = self.root / "home"
        self.name = f"clipyqs{os.getpid() % 100000}n{next(USER_NUMBERS)}"
        subprocess.run(["useradd", "--create-home", "--home-dir", str(self.home),
                        "--shell", "/bin/sh", self.name], check=True, capture_output=True)
        self.clone = self.home / "cli-py"
        self.decoy_home = self.root / "not-home"   # what $HOME says
        for path in (self.clone, self.decoy_home):
            path.mkdir()
            shutil.chown(path, self.name, self.name)
        self.copy_repository()

    def copy_repository(self):
        """The repository's tracked files as they are in the working tree (what a clone
        of this commit plus the edits under test would hold)."""
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                                 capture_output=True).stdout.decode()
        for name in filter(None, listing.split("\0")):
            source, target = REPO / name, self.clone / name
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        subprocess.run(["chown", "-R", f"{self.name}:{self.name}", str(self.clone)], check=True)

    def run(self, *argv, timeout=120):
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.decoy_home), "LANG": "C.UTF-8"}
        env.update((key, value) for key, value in os.environ.items() if PASSED_ON.match(key))
        return subprocess.run([shutil.which("runuser"), "-u", self.name, "--", *argv],
                              cwd=self.clone,
                              env=env, capture_output=True, text=True, timeout=timeout)

    def quickstart(self, *args, timeout=120):
        return self.run(SYSTEM_PYTHON, "cli.py", "quickstart", *args, timeout=timeout)

    def files(self):
        """Every path under the home and the decoy, with its mode, size and content hash."""
        found = {}
        for top in (self.home, self.decoy_home):
            for directory, names, files in os.walk(top):
                for name in names + files:
                    path = pathlib.Path(directory, name)
                    stat = path.lstat()
                    digest = hashlib.sha256(path.read_bytes()).hexdigest() \
                        if path.is_file() and not path.is_symlink() else None
                    found[str(path)] = (stat.st_mode, stat.st_size, digest)
        return found

    def processes(self):
        """The user's live processes (zombies left to a parent that does not reap are not)."""
        pids = subprocess.run(["pgrep", "-u", self.name], capture_output=True,
                              text=True).stdout.split()
        return [int(pid) for pid in pids if process_alive(int(pid))]

    def remove(self):
        venv_python = self.clone / ".venv" / "bin" / "python"
        if venv_python.exists():
            self.run(str(venv_python), "cli.py", "stop")
        # Whatever of the user's is left (an ssh master, a job), by pid.
        for pid in self.processes():
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        wait_until(lambda: not self.processes(), what=f"the processes of {self.name} to end")
        subprocess.run(["userdel", self.name], check=True, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def new_user():
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is needed: apt-get install python3 python3-venv")
    user = NewUser()
    try:
        yield user
    finally:
        user.remove()


def succeeded(result):
    assert result.returncode == 0, f"quickstart failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def announced(output):
    """The job ids and the results quickstart announced: (first, last), {path: text}."""
    first, last, array = map(int, re.search(r"^queued jobs (\d+)-(\d+) \(array (\d+)\):",
                                            output, re.M).groups())
    assert array == first
    results = dict(re.findall(r"^  (results/\S+): (.*)$", output, re.M))
    return (first, last), results


def check_results(user, output):
    ids, results = announced(output)
    assert sorted(results) == [f"results/input-{n}.txt.out" for n in (1, 2, 3)], output
    for path, text in results.items():
        sample = user.clone / "quickstart" / pathlib.Path(path).name.removesuffix(".out")
        assert (user.clone / path).read_text().strip() == text == \
            sample.read_text().strip().upper()
    return ids


def check_ssh_dir(user):
    """~/.ssh holds authorized_keys alone, owner-only, with the queue's key once."""
    ssh_dir = user.home / ".ssh"
    assert sorted(os.listdir(ssh_dir)) == ["authorized_keys"]
    assert ssh_dir.stat().st_mode & 0o777 == 0o700
    authorized_keys = ssh_dir / "authorized_keys"
    assert authorized_keys.stat().st_mode & 0o777 == 0o600
    lines = authorized_keys.read_text().splitlines()
    key = (user.clone / ".data" / "quickstart" / "id_ed25519.pub").read_text().split()[1]
    assert len(lines) == 1 and key in lines[0].split(), lines
    assert lines[0].startswith('from="127.0.0.1,::1" ssh-ed25519 ')
    assert not (user.decoy_home / ".ssh").exists()   # $HOME is not the account's home
    return lines[0]


def test_quickstart_twice_as_a_new_user_without_sudo(example_job_dirs, system_sshd, new_user):
    first = succeeded(new_user.quickstart(timeout=300))   # pip installs into .venv
    assert "installed fabric, filelock, tabulate into .venv" in first
    assert "added localhost (1 slot)" in first
    first_ids = check_results(new_user, first)
    line = check_ssh_dir(new_user)
    assert "./cli.py status" in first and ". .venv/bin/activate" in first

    second = succeeded(new_user.quickstart())
    for step in ("OS packages already installed", "an SSH server already answers",
                 "Python packages already in .venv", "the queue's SSH key already exists",
                 "already has the queue's key", "localhost's host keys already in",
                 "the queue's ssh config already written", "the server already runs",
                 "localhost is already a worker"):
        assert step in second, second
    second_ids = check_results(new_user, second)
    assert second_ids == (first_ids[1] + 1, first_ids[1] + 3)
    assert check_ssh_dir(new_user) == line

    # Stopped in between: the next run starts the server again, with the queue's config.
    venv_python = str(new_user.clone / ".venv" / "bin" / "python")
    assert new_user.run(venv_python, "cli.py", "stop").returncode == 0
    third = succeeded(new_user.quickstart())
    assert "server started" in third
    assert check_results(new_user, third)[0] == second_ids[1] + 1
    assert check_ssh_dir(new_user) == line

    # sshd refuses the key (StrictModes: a home others may write to): one line, why.
    new_user.home.chmod(0o777)
    try:
        refused = new_user.quickstart()
    finally:
        new_user.home.chmod(0o755)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("Error: ") and \
        "sshd refuses the key" in refused.stderr, refused.stderr


@pytest.fixture
def not_ssh_port():
    """A port on localhost where something that is not an SSH server answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def free_port():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def test_quickstart_stops_with_one_line_and_changes_nothing(new_user, not_ssh_port):
    before = new_user.files()
    for port, expected in ((free_port(), "nothing listens on localhost:"),
                           (not_ssh_port, "is taken by something that is not an SSH server")):
        result = new_user.quickstart("--port", str(port))
        assert result.returncode == 1, result.stdout
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0] \
            and f"localhost:{port}" in lines[0], result.stderr
        assert new_user.files() == before


def test_quickstart_help_ends_with_examples():
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "quickstart", "--help"],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.rstrip().splitlines()
    examples = lines.index("examples:")
    assert examples > 0 and all(line.startswith("  ./cli.py quickstart")
                                for line in lines[examples + 1:])
