import pytest

from sshd import SshSandbox


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped test fails: here a skip could only hide a missing dependency."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped tests count as failures in this suite: {report.longrepr}"


# --- running in parallel: tests/run uses pytest-xdist, then a part with nothing beside it ---


def pytest_addoption(parser):
    parser.addoption("--alone", choices=("include", "exclude", "only"), default="include",
                     help="Run the tests marked `alone` among the others (include, the "
                          "default), leave them out (exclude), or run only them (only). "
                          "tests/run runs the rest in parallel, then these by themselves.")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "alone(reason): no other test may run beside it: it changes what every "
                   "process on the machine shares (the kernel's next pid), or it must look "
                   "while a short job still runs, which a machine busy with other tests "
                   "can make it miss")
    config.addinivalue_line(
        "markers", "slow: it takes minutes; under xdist its file is handed out first, so "
                   "that it does not start last and end long after the rest")


def pytest_collection_modifyitems(config, items):
    choice = config.getoption("alone")
    if choice != "include":
        wanted = choice == "only"
        config.hook.pytest_deselected(
            items=[item for item in items if bool(item.get_closest_marker("alone")) != wanted])
        items[:] = [item for item in items if bool(item.get_closest_marker("alone")) == wanted]
    if hasattr(config, "workerinput"):   # an xdist worker: files are handed out in this order
        slow_files = {item.path for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.path not in slow_files)   # stable: a file keeps its order


# --- SSH: real sshd servers on loopback, isolated from the real ~/.ssh (see sshd.py) ---


@pytest.fixture(scope="session")
def ssh_sandbox(tmp_path_factory):
    with SshSandbox(tmp_path_factory.mktemp("ssh")) as sandbox:
        yield sandbox


@pytest.fixture(scope="session")
def workers(ssh_sandbox):
    return [ssh_sandbox.start_worker(alias) for alias in ("w1", "w2", "w3")]


# --- cli.py: a server per test in a temp dir, driven as a user drives it ---

import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CLI = pathlib.Path(__file__).resolve().parent.parent / "cli.py"
RECORD_JOB = """#!{python}
# Records what a job saw, then sleeps $SLEEP seconds and exits with $EXIT_CODE.
import json, os, sys, time
started = time.time()
results = os.environ["RESULTS"]
with open(os.path.join(results, "runs.log"), "a") as runs:
    runs.write(os.environ["JOB_ID"] + "\\n")
time.sleep(float(os.environ.get("SLEEP", "0")))
record = {{"job_id": os.environ["JOB_ID"], "slave": os.environ["SLAVE_IP"], "cwd": os.getcwd(),
          "args": sys.argv[1:], "env": dict(os.environ), "start": started, "end": time.time()}}
path = os.path.join(results, os.environ["JOB_ID"] + ".json")
with open(path + ".tmp", "w") as out:
    json.dump(record, out)
os.replace(path + ".tmp", path)
print("job", os.environ["JOB_ID"], "ran on", os.environ["SLAVE_IP"])
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""


def with_our_python(env):
    """ENV, with this interpreter's python3 first on PATH: commands run as ./cli.py, as
    users run it (from cached bytecode: see the top of cli.py), with the python3 whose
    packages the tests installed."""
    return dict(env, PATH=f"{os.path.dirname(sys.executable)}:{env.get('PATH', os.defpath)}")


def wait_until(predicate, timeout=20.0, what="condition"):
    """Poll PREDICATE until it returns something truthy, or fail after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def process_alive(pid):
    """True while PID runs (a zombie counts as gone)."""
    try:
        return proc_stat(pid)[0] != "Z"
    except OSError:
        return False


def cpu_seconds(pid):
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Cli:
    """Runs ./cli.py in a subprocess with one data dir, as a user would."""

    def __init__(self, root, env):
        self.root = pathlib.Path(root)
        self.data_dir = self.root / ".data"
        self.log_dir = self.root / "logs"
        self.results = self.root / "results"
        self.results.mkdir(exist_ok=True)
        # Pinned, so that commands run from other directories reach the same server.
        self.env = dict(env, RESULTS=str(self.results), CLI_PY_DATA_DIR=str(self.data_dir))
        self.script = self.root / "record.py"
        self.script.write_text(RECORD_JOB.format(python=sys.executable))
        self.script.chmod(0o755)

    def run(self, *args, env=None, cwd=None, timeout=60, input=None, umask=None):
        def set_umask():
            os.umask(umask)
        return subprocess.run([str(CLI), *map(str, args)], cwd=cwd or self.root,
                              env=with_our_python(env or self.env), input=input,
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=set_umask if umask is not None else None)

    def ok(self, *args, **kwargs):
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, f"cli.py {args} failed: {result.stderr}"
        return result.stdout

    def fails(self, *args, expect=None, **kwargs):
        """A user error: non-zero exit, one line 'Error: ...' on stderr, no traceback."""
        result = self.run(*args, **kwargs)
        assert result.returncode != 0, f"cli.py {args} should have failed: {result.stdout}"
        lines = result.stderr.strip().splitlines()
        assert "Traceback" not in result.stderr, result.stderr
        assert lines and lines[-1].startswith("Error: "), result.stderr
        if expect:
            assert expect in result.stderr, result.stderr
        return result.stderr

    def write_script(self, name, body, shell="/bin/sh"):
        """An executable script in the test's directory."""
        path = self.root / name
        path.write_text(f"#!{shell}\n{body}")
        path.chmod(0o755)
        return path

    def status(self):
        return json.loads(self.ok("status", "--json"))

    def add_job(self, *args, **kwargs):
        return int(self.ok("add_job", *args, **kwargs).strip())

    def record(self, job_id):
        """A job's row from status --json (waiting or running), or its record if it ran."""
        record = self.results / f"{job_id}.json"
        return json.loads(record.read_text()) if record.exists() else None

    def runs(self):
        path = self.results / "runs.log"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def wait_for_counts(self, timeout=30, **expected):
        def reached():
            counts = self.status()["counts"]
            return all(counts.get(name, 0) == value for name, value in expected.items())
        wait_until(reached, timeout, f"job counts {expected}")

    def server_pid(self):
        try:
            return int((self.data_dir / "server.pid").read_text())
        except (OSError, ValueError):
            return None

    def end_leftover_jobs(self):
        """Teardown: end every supervisor still running for this data dir, at once."""
        run_dir = self.data_dir / "run"
        if not run_dir.is_dir():
            return
        for pid_file in run_dir.glob("*.pid"):
            pid_file.with_suffix(".kill").write_text("0")
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


@pytest.fixture
def cli(tmp_path, ssh_sandbox, workers):
    """A Cli whose server is not started yet."""
    cli = Cli(tmp_path, ssh_sandbox.env())
    yield cli
    if cli.server_pid():
        cli.run("stop")
    cli.end_leftover_jobs()


@pytest.fixture
def server(cli):
    """A Cli with a running server and no workers."""
    cli.ok("start")
    return cli


@pytest.fixture
def example_job_dirs():
    """Held by the tests that run example_job.sh: it works in /tmp/cli-py-job-$JOB_ID on
    its worker, and every sandbox worker is this machine, so two servers' job 1 at once
    (tests in parallel, under xdist) would share a directory and remove it under each
    other.  Ask for it before `server` or `cli`: it is let go after their teardown."""
    with open("/tmp/cli-py-job-dirs.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # let go when the file closes
        yield


# --- a second local user: what another account on the machine may do ---

@pytest.fixture
def second_user():
    """A real second local user (the CI machine runs as root, so it can make one)."""
    if os.geteuid() != 0:
        pytest.fail("this test creates a second local user: run the suite as root, as CI does")
    if not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.fail("useradd and runuser are needed: apt-get install passwd util-linux")
    name = f"clipy{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/bin/sh", name], check=True, capture_output=True)
    try:
        if as_user(name, "test", "-r", str(CLI)).returncode != 0:
            pytest.fail(f"{CLI} must be readable by other users for this test")
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", name], check=True, capture_output=True)


def as_user(name, *argv, env=None):
    return subprocess.run([shutil.which("runuser") or "/usr/sbin/runuser", "-u", name, "--",
                           *argv], capture_output=True, text=True,
                          env=env or {"PATH": os.defpath, "HOME": "/tmp"}, timeout=60)


def python_for(name):
    """A Python the other user may run (a pyenv or venv one under /root may not be)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and as_user(name, candidate, "-c", "pass").returncode == 0:
            return candidate
    pytest.fail("no python3 that another user may run: apt-get install python3")


# --- terminals: a tmux server of the test's own ---------------------------------

@pytest.fixture
def tmux():
    """Runs tmux commands against a tmux server of the test's own, whose socket is in a
    directory of its own (tmp_path may be too long for a socket's path)."""
    socket_dir = tempfile.mkdtemp(prefix="cli-py-tmux-")
    socket_path = os.path.join(socket_dir, "socket")

    def run(*args, env=None):
        return subprocess.run(["tmux", "-S", socket_path, *args], env=env, check=True,
                              capture_output=True, text=True, timeout=10).stdout
    yield run
    subprocess.run(["tmux", "-S", socket_path, "kill-server"], capture_output=True, timeout=10)
    shutil.rmtree(socket_dir)
