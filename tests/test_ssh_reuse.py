"""Job scripts share one SSH connection per worker and host (OpenSSH ControlMaster).

Connections are counted in each worker's sshd log ("Accepted publickey" lines),
so every test here proves what reached the real sshd, not what a shim said.
"""
import json
import os
import pathlib
import re
import signal
import stat
import subprocess
import tempfile

import pytest

from conftest import Cli, process_alive, wait_until

# Three SSH connections' worth of work: two ssh calls and an rsync.
SSH_JOB = """set -e
echo "$CLI_PY_SSH_CONTROL_PATH" > "$RESULTS/$JOB_ID.control"
ssh "$SLAVE_IP" true
ssh "$SLAVE_IP" "echo hello from $JOB_ID" > "$RESULTS/$JOB_ID.out"
rsync -a "$0" "$SLAVE_IP:$RESULTS/rsync-$JOB_ID"
"""
# scp runs /usr/bin/ssh itself, which knows nothing of the sandbox's ssh config
# (tests/sshd.py), so plain scp can only reach the workers through our shim.
SCP_LINE = 'scp -q "$0" "$SLAVE_IP:$RESULTS/scp-$JOB_ID"\n'


@pytest.fixture
def ssh_job(server):
    return server.write_script("ssh_job.sh", SSH_JOB + SCP_LINE)


@pytest.fixture
def ssh_job_no_scp(server):
    return server.write_script("ssh_job_no_scp.sh", SSH_JOB)


def run_jobs(cli, *add_job_args, count=4, scp=True):
    """Queue COUNT jobs, wait for them all, and check each really reached its worker."""
    ids = cli.ok("add_job", *add_job_args, ":::", *range(count)).strip()
    cli.ok("wait", "-q", ids)
    job_ids = range(int(ids), int(ids) + count)   # the array's id is its first job's
    for job_id in job_ids:
        assert (cli.results / f"{job_id}.out").read_text() == f"hello from {job_id}\n"
        assert (cli.results / f"rsync-{job_id}").exists()
        assert (cli.results / f"scp-{job_id}").exists() == scp
    return list(job_ids)


def worker_of(cli, job_id):
    # (Not `jobs ID`: the first job of a ::: call is its array's id, which names them all.)
    return next(job["worker"] for job in json.loads(cli.ok("jobs", "--json"))
                if job["id"] == job_id)


def control_dir(cli, job_id):
    path = (cli.results / f"{job_id}.control").read_text().strip()
    assert path.endswith("/%C"), path
    return pathlib.Path(path).parent


def masters(directory):
    """{socket: pid} of the live ControlMasters in DIRECTORY."""
    found = {}
    for sock in directory.glob("*") if directory.is_dir() else []:
        check = subprocess.run(["ssh", "-F", "/dev/null", "-S", str(sock), "-O", "check", "x"],
                               capture_output=True, text=True, timeout=10)
        match = re.search(r"pid=(\d+)", check.stderr)
        if check.returncode == 0 and match:
            found[sock] = int(match.group(1))
    return found


def test_jobs_on_a_worker_share_one_connection(server, ssh_job, workers):
    server.ok("add_slave", "--skip_ssh_auth_check", "w1")
    before = workers[0].connections()
    job_ids = run_jobs(server, ssh_job, count=5)
    # 5 jobs x (2 ssh + rsync + scp) = 20 calls; one TCP connection carried them all.
    assert workers[0].connections() - before == 1
    directory = control_dir(server, job_ids[0])
    assert {control_dir(server, job_id) for job_id in job_ids} == {directory}
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    (sock, pid), = masters(directory).items()
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
    jobs = json.loads(server.ok("jobs", "--json"))
    assert all(job["ssh_reuse"] for job in jobs)
    assert json.loads(server.ok("status", "--json"))["slaves"][0]["ssh_reuse"] is True


def test_each_worker_has_its_own_masters(server, ssh_job, workers):
    server.ok("add_slave", "--skip_ssh_auth_check", "--slots", "1", "w1", "w2")
    before = [worker.connections() for worker in workers[:2]]
    job_ids = run_jobs(server, ssh_job, count=6)
    assert [worker.connections() - count for worker, count in zip(workers, before)] == [1, 1]
    slaves = {worker_of(server, job_id): control_dir(server, job_id)
              for job_id in job_ids}
    assert slaves["w1"] != slaves["w2"]


def test_a_short_data_dir_keeps_its_sockets_inside(ssh_sandbox, workers):
    root = pathlib.Path(tempfile.mkdtemp(prefix="c", dir="/tmp"))
    cli = Cli(root, ssh_sandbox.env())
    try:
        cli.ok("start")
        script = cli.write_script("ssh_job.sh", SSH_JOB + SCP_LINE)
        cli.ok("add_slave", "--skip_ssh_auth_check", "w3")
        job_id, = run_jobs(cli, script, count=1)
        assert control_dir(cli, job_id).parent == cli.data_dir / "ssh"
        shim = cli.data_dir / "ssh" / "bin" / "ssh"
        assert stat.S_IMODE(shim.stat().st_mode) == 0o700
    finally:
        cli.run("stop")
        cli.end_leftover_jobs()


def test_no_ssh_reuse_for_one_job(server, ssh_job_no_scp, workers):
    server.ok("add_slave", "--skip_ssh_auth_check", "w1")
    before = workers[0].connections()
    job_ids = run_jobs(server, "--no-ssh-reuse", ssh_job_no_scp, count=2, scp=False)
    assert workers[0].connections() - before == 6
    for job_id in job_ids:
        assert (server.results / f"{job_id}.control").read_text() == "\n"
    assert not any(job["ssh_reuse"] for job in json.loads(server.ok("jobs", "--json")))


def test_no_ssh_reuse_for_a_worker_and_turning_it_back_on(server, ssh_job, ssh_job_no_scp,
                                                          workers):
    server.ok("add_slave", "--skip_ssh_auth_check", "--no-ssh-reuse", "w2")
    assert server.status()["slaves"][0]["ssh_reuse"] is False
    before = workers[1].connections()
    run_jobs(server, ssh_job_no_scp, count=2, scp=False)
    assert workers[1].connections() - before == 6

    assert "ssh reuse: on" in server.ok("edit_slave", "w2", "--ssh-reuse")
    before = workers[1].connections()
    job_id, = run_jobs(server, ssh_job, count=1)
    assert workers[1].connections() - before == 1
    directory = control_dir(server, job_id)
    (sock, pid), = masters(directory).items()

    # Turning it off stops the shared connection at once.
    assert "ssh reuse: off" in server.ok("edit_slave", "w2", "--no-ssh-reuse")
    wait_until(lambda: not process_alive(pid), what="the master to exit")
    assert not directory.exists()


def test_a_dead_master_is_replaced(server, ssh_job, workers):
    server.ok("add_slave", "--skip_ssh_auth_check", "w1")
    job_id, = run_jobs(server, ssh_job, count=1)
    directory = control_dir(server, job_id)
    (sock, pid), = masters(directory).items()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not process_alive(pid), what="the master to die")

    before = workers[0].connections()
    run_jobs(server, ssh_job, count=2)   # the stale socket neither blocks nor fails them
    assert workers[0].connections() - before == 1
    (new_sock, new_pid), = masters(directory).items()
    assert new_pid != pid


def test_masters_stop_when_the_worker_goes_or_the_server_stops(server, ssh_job, workers):
    server.ok("add_slave", "--skip_ssh_auth_check", "w1", "w2")
    job_ids = run_jobs(server, ssh_job, count=2)
    found = {}
    for job_id in job_ids:
        found.update(masters(control_dir(server, job_id)))
    directories = {sock.parent: pid for sock, pid in found.items()}
    assert len(directories) == 2

    w1_dir = next(d for d in directories if any(
        worker_of(server, job_id) == "w1" and control_dir(server, job_id) == d
        for job_id in job_ids))
    server.ok("remove_slave", "w1")
    wait_until(lambda: not process_alive(directories[w1_dir]), what="w1's master to exit")
    assert not w1_dir.exists()

    (w2_dir, w2_pid), = [(d, pid) for d, pid in directories.items() if d != w1_dir]
    server.ok("stop")
    wait_until(lambda: not process_alive(w2_pid), what="w2's master to exit")
    assert not w2_dir.exists()


def test_callers_own_control_options_win(server, workers):
    script = server.write_script("own_options.sh", """set -e
ssh -o ControlMaster=no "$SLAVE_IP" true
ssh -o controlpath=none "$SLAVE_IP" true
ssh "$SLAVE_IP" true
ssh "$SLAVE_IP" true
""")
    server.ok("add_slave", "--skip_ssh_auth_check", "w3")
    before = workers[2].connections()
    job_id = server.add_job(script)
    server.ok("wait", "-q", job_id)
    assert workers[2].connections() - before == 3


def test_ssh_reuse_options_are_checked(server):
    server.fails("add_slave", "--no-ssh-reuse=yes", "w1", expect="--no-ssh-reuse")
    server.ok("add_slave", "--skip_ssh_auth_check", "w1")
    server.fails("edit_slave", "w1", expect="--[no-]ssh-reuse")
    status_file = server.root / "status.json"
    document = server.status()
    document["slaves"][0]["ssh_reuse"] = "no"
    status_file.write_text(json.dumps(document))
    server.fails("load_status", status_file, expect="'ssh_reuse' must be true or false")
    assert server.status()["slaves"][0]["ssh_reuse"] is True


def test_load_status_keeps_ssh_reuse(server, workers):
    server.ok("add_slave", "--skip_ssh_auth_check", "--no-ssh-reuse", "w1")
    server.ok("pause")
    server.ok("add_job", "--no-ssh-reuse", server.script)
    server.ok("add_job", server.script)
    status_file = server.root / "status.json"
    status_file.write_text(server.ok("status", "--json"))
    server.ok("load_status", status_file)
    document = server.status()
    assert document["slaves"][0]["ssh_reuse"] is False
    assert [job["ssh_reuse"] for job in document["job_waitlist"]] == [False, True]


# --- running jobs keep their SSH through stop, restart, kill -9 and worker changes ---

# ssh to the worker, say so, wait for the test's go, ssh again: the second call
# needs the worker's control directory after whatever the test did meanwhile.
TWO_CALLS = """set -e
ssh -o BatchMode=yes "$SLAVE_IP" echo first
touch "$RESULTS/$JOB_ID.first"
while [ ! -e "$RESULTS/go" ]; do sleep 0.05; done
ssh -o BatchMode=yes "$SLAVE_IP" echo second
"""


def restart(cli):
    cli.ok("stop")
    cli.ok("start")


def kill_9_and_start(cli):
    os.kill(cli.server_pid(), signal.SIGKILL)
    wait_until(lambda: not process_alive(cli.server_pid()), what="the server to die")
    cli.ok("start")


@pytest.mark.parametrize("disruption", [
    restart,
    kill_9_and_start,
    lambda cli: cli.ok("stop"),
    lambda cli: cli.ok("edit_slave", "w3", "--no-ssh-reuse"),
    lambda cli: cli.ok("remove_slave", "--wait", "w3"),
], ids=["stop-start", "kill-9", "stopped", "edit-no-reuse", "remove-wait"])
def test_a_running_job_keeps_its_ssh_through(server, workers, disruption):
    script = server.write_script("two.sh", TWO_CALLS)
    server.ok("add_slave", "--skip_ssh_auth_check", "w3")
    job_id = server.add_job(script)
    wait_until(lambda: (server.results / f"{job_id}.first").exists(), what="the first ssh")
    disruption(server)
    (server.results / "go").touch()
    if not server.server_pid():
        # No server: the job still ends well, and the next start records it.
        wait_until(lambda: "second" in (server.log_dir / f"job_{job_id}.txt").read_text(),
                   what="the second ssh")
        server.ok("start")
    server.ok("wait", "-q", job_id)
    log = (server.log_dir / f"job_{job_id}.txt").read_text()
    assert log.splitlines() == ["first", "second"], log


def test_jobs_starting_at_once_share_one_master_without_a_race(server, workers):
    script = server.write_script("race.sh", """set -e
ssh "$SLAVE_IP" true
ssh "$SLAVE_IP" "echo hello from $JOB_ID"
""")
    server.ok("add_slave", "--skip_ssh_auth_check", "--slots", "8", "w2")
    before = workers[1].connections()
    ids = server.ok("add_job", script, ":::", *range(8)).strip()
    server.ok("wait", "-q", ids)
    for job_id in range(int(ids), int(ids) + 8):
        log = (server.log_dir / f"job_{job_id}.txt").read_text()
        assert log == f"hello from {job_id}\n", log   # no "ControlSocket ... already exists"
    assert workers[1].connections() - before == 1


def test_a_job_whose_control_directory_vanished_still_reaches_its_worker(server, workers):
    server.ok("add_slave", "--skip_ssh_auth_check", "w1")
    script = server.write_script("gone.sh", """set -e
rm -rf "${CLI_PY_SSH_CONTROL_PATH%/*}"
ssh "$SLAVE_IP" echo still here
""")
    job_id = server.add_job(script)
    server.ok("wait", "-q", job_id)
    assert (server.log_dir / f"job_{job_id}.txt").read_text() == "still here\n"


def test_the_ssh_directory_under_tmp_goes_when_the_queue_no_longer_needs_it(server, workers):
    # The fixtures' data dirs are too long for sockets: their SSH files live under /tmp.
    server.ok("add_slave", "--skip_ssh_auth_check", "w1")
    script = server.write_script("two.sh", TWO_CALLS)
    job_id = server.add_job(script)
    wait_until(lambda: (server.results / f"{job_id}.first").exists(), what="the first ssh")
    root = control_root(server)
    assert root.parent == pathlib.Path(f"/tmp/cli-py-{os.getuid()}")
    server.ok("stop")
    assert root.is_dir()          # its job still needs it
    (server.results / "go").touch()
    server.ok("start")
    server.ok("wait", "-q", job_id)
    server.ok("stop")
    assert not root.exists()      # nothing runs: nothing is left behind


def control_root(cli):
    """The directory of a queue's shims and masters under /tmp, named by its data dir."""
    import hashlib
    digest = hashlib.sha256(os.fsencode(str(cli.data_dir))).hexdigest()[:12]
    root = pathlib.Path(f"/tmp/cli-py-{os.getuid()}") / f"ssh-{digest}"
    assert (root / "bin" / "ssh").exists()
    return root
