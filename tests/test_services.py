"""Services: N replicas of a long-running script kept alive across the workers."""
import json
import os
import signal
import time

import pytest

from conftest import process_alive, wait_until


def service(cli, name):
    return json.loads(cli.ok("services", name, "--json"))


def live(cli, name):
    """{replica: job id} of the replicas running now."""
    return {instance["replica"]: instance["job"] for instance in service(cli, name)["instances"]
            if instance["state"] == "running"}


def replica_script(cli, remote=False):
    """A replica that records itself (pid, JOB_ID, REPLICA, PORT) in pids/ and runs for
    good: here, or (REMOTE) as `sleep` on its worker over ssh, recorded by the remote side."""
    pids = cli.root / "pids"
    pids.mkdir(exist_ok=True)
    if remote:
        body = (f'exec ssh "$SLAVE_IP" "echo \\$\\$ > {pids}/$JOB_ID.remote; '
                f'echo $REPLICA $PORT $SERVICE > {pids}/$JOB_ID.replica; exec sleep 300"\n')
    else:
        body = (f'echo $$ > {pids}/$JOB_ID.pid\necho "$REPLICA $PORT $SERVICE" > '
                f'{pids}/$JOB_ID.replica\nexec sleep 300\n')
    return cli.write_script("replica.sh", body), pids


def test_a_replica_killed_on_its_worker_comes_back_with_its_number_and_a_new_job(server):
    server.ok("add_slave", "w1", "w2")
    script, pids = replica_script(server, remote=True)
    out = server.ok("add_service", "web", "--replicas", 2, "--port", 8100, "--", script)
    assert out.strip() == "service web: 2 replica(s) (jobs 1-2)"
    wait_until(lambda: len(list(pids.glob("*.remote"))) == 2, what="both replicas to start")
    assert {(pids / f"{job}.replica").read_text().split()[0] for job in (1, 2)} == {"0", "1"}
    first = {int((pids / f"{job}.replica").read_text().split()[0]): job for job in (1, 2)}
    assert (pids / f"{first[1]}.replica").read_text().split() == ["1", "8101", "web"]
    os.kill(int((pids / f"{first[1]}.remote").read_text()), signal.SIGKILL)
    wait_until(lambda: live(server, "web").get(1) not in (None, first[1]),
               what="replica 1 to come back")
    again = live(server, "web")
    assert again[0] == first[0] and again[1] > 2
    wait_until(lambda: (pids / f"{again[1]}.replica").exists(), what="the new job to record")
    assert (pids / f"{again[1]}.replica").read_text().split() == ["1", "8101", "web"]
    described = service(server, "web")
    assert (described["replicas"], described["running"], described["restarts"]) == (2, 2, 1)
    assert json.loads(server.ok("jobs", first[1], "--json"))["result"] == "failed"


def test_scale_3_to_1_to_4_stops_the_highest_and_starts_the_missing(server):
    server.ok("add_slave", "--slots", 4, "w1")
    script, _ = replica_script(server)
    server.ok("add_service", "pool", "--replicas", 3, "--", script)
    wait_until(lambda: len(live(server, "pool")) == 3, what="3 replicas")
    before = live(server, "pool")
    assert server.ok("scale", "--grace", "1s", "pool", 1).strip() == \
        "service pool: 1 replica(s), 1 running"
    assert live(server, "pool") == {0: before[0]}   # stopped before scale returned
    for job_id in (before[1], before[2]):
        assert json.loads(server.ok("jobs", job_id, "--json"))["result"] == "killed"
    server.ok("scale", "pool", 4)
    wait_until(lambda: len(live(server, "pool")) == 4, what="4 replicas")
    assert live(server, "pool")[0] == before[0]
    assert service(server, "pool")["restarts"] == 0   # scaling is not a restart


@pytest.mark.alone("measures the delays between a replica's starts to the second")
def test_a_crash_looping_replica_backs_off_doubling(server):
    server.ok("add_slave", "w1")
    starts = server.root / "starts"
    script = server.write_script("crash.sh", f'date +%s.%N >> {starts}\nexit 3\n')
    server.ok("add_service", "crashy", "--", script)
    wait_until(lambda: starts.exists() and len(starts.read_text().split()) >= 5,
               timeout=40, what="five starts")
    times = [float(line) for line in starts.read_text().split()[:5]]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    for gap, delay in zip(gaps, (1, 2, 4, 8)):
        assert delay <= gap < delay + 1.5, gaps
    instance = service(server, "crashy")["instances"][0]
    if instance["state"] == "waiting":
        assert instance["why"].startswith("crash loop: exit 3, next try in ")
    assert service(server, "crashy")["last_end"] == "exit 3"


def test_stop_service_and_start_service_hold_across_a_restart(server):
    server.ok("add_slave", "--slots", 3, "w1")
    script, _ = replica_script(server)
    server.ok("add_service", "a", "--replicas", 2, "--", script)
    server.ok("add_service", "b", "--", script)
    wait_until(lambda: len(live(server, "a")) == 2 and len(live(server, "b")) == 1,
               what="the replicas")
    assert server.ok("stop_service", "--grace", "0", "b").strip() == "service b: stopped"
    assert live(server, "b") == {}
    running_a = live(server, "a")
    server.ok("stop")
    server.ok("start")
    assert live(server, "a") == running_a   # adopted, not restarted
    assert live(server, "b") == {}          # stopped stays stopped
    server.fails("stop_service", "b", expect="service b is already stopped")
    server.ok("start_service", "b")
    wait_until(lambda: len(live(server, "b")) == 1, what="b to start again")
    assert [line.split()[:2] for line in server.ok("services").splitlines()[2:]] == \
        [["a", "started"], ["b", "started"]]


def test_remove_service_stops_its_replicas_and_forgets_it(server):
    server.ok("add_slave", "w1")
    script, pids = replica_script(server)
    server.ok("add_service", "gone", "--", script)
    wait_until(lambda: live(server, "gone"), what="the replica")
    job_id = live(server, "gone")[0]
    wait_until(lambda: (pids / f"{job_id}.pid").exists(), what="its pid")
    pid = int((pids / f"{job_id}.pid").read_text())
    assert server.ok("remove_service", "--grace", "0", "gone").strip() == \
        f"service gone: removed (job {job_id} stopped)"
    assert not process_alive(pid)
    assert server.ok("services").strip().startswith("no services")
    assert json.loads(server.ok("jobs", job_id, "--json"))["service"] == "gone"   # history


def test_replicas_move_off_a_worker_being_removed(server):
    server.ok("add_slave", "w1", "w2")
    script, _ = replica_script(server)
    server.ok("add_service", "pinned", "--on", "w1", "--", script)
    wait_until(lambda: live(server, "pinned"), what="the pinned replica")
    server.ok("add_service", "mover", "--", script)
    wait_until(lambda: live(server, "mover"), what="the other replica")
    worker = service(server, "mover")["instances"][0]["worker"]
    assert worker == "w2"   # w1 was taken (one slot each)
    first = live(server, "mover")[0]
    server.ok("remove_slave", "--wait", "w1")
    # pinned may run nowhere else: it stays; w2 is busy with mover.
    assert live(server, "pinned") and service(server, "pinned")["instances"][0]["worker"] == "w1"
    server.ok("remove_slave", "--wait", "w2")
    assert live(server, "mover") == {0: first} or service(server, "mover")["running"] == 0
    server.ok("add_slave", "w3")
    wait_until(lambda: service(server, "mover")["instances"][0]["worker"] == "w3" and
               service(server, "mover")["instances"][0]["state"] == "running",
               what="mover to move to w3")
    assert live(server, "mover")[0] != first
    wait_until(lambda: [slave["ip"] for slave in server.status()["slaves"]] == ["w1", "w3"],
               what="w2 to be removed once mover left it")
    server.ok("remove_service", "--grace", "0", "pinned")
    wait_until(lambda: [slave["ip"] for slave in server.status()["slaves"]] == ["w3"],
               what="w1 to be removed once pinned stopped")


def test_replicas_start_before_waiting_batch_jobs(server):
    server.ok("add_slave", "w1")
    gate = server.root / "gate"
    blocker = server.add_job(server.write_script(
        "gate.sh", f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'))
    server.wait_for_counts(running=1)
    batch = server.add_job("--priority", 1000, server.script)
    script, _ = replica_script(server)
    server.ok("add_service", "first", "--", script)
    gate.touch()
    wait_until(lambda: live(server, "first"), what="the replica")
    assert json.loads(server.ok("jobs", batch, "--json"))["state"] == "waiting"
    assert json.loads(server.ok("jobs", blocker, "--json"))["result"] == "succeeded"


def test_exactly_n_replicas_survive_kill_9s_of_the_server_while_they_crash(server):
    server.ok("add_slave", "--slots", 4, "w1", "w2")
    pids, calm = server.root / "pids", server.root / "calm"
    pids.mkdir()
    # Each replica runs 1-3 s, then crashes, until `calm` exists.
    script = server.write_script(
        "flaky.sh", f'echo $$ > {pids}/$REPLICA.$JOB_ID\n[ -e {calm} ] && exec sleep 300\n'
                    'sleep "$(( ($JOB_ID % 3) + 1 ))"\nexit 1\n')
    server.ok("add_service", "flaky", "--replicas", 5, "--", script)

    def alive_by_replica():
        found = {}
        for path in pids.iterdir():
            replica, job_id = map(int, path.name.split("."))
            if process_alive(int(path.read_text())):
                found.setdefault(replica, []).append(job_id)
        return found

    def one_of_each():
        assert all(len(jobs) == 1 for jobs in alive_by_replica().values()), alive_by_replica()
        instances = service(server, "flaky")["instances"]
        assert sorted(instance["replica"] for instance in instances) == [0, 1, 2, 3, 4]
        assert all(instance["state"] in ("running", "waiting") for instance in instances)
    for _ in range(5):
        time.sleep(1.5)
        one_of_each()
        os.kill(server.server_pid(), signal.SIGKILL)
        wait_until(lambda: server.run("status").returncode != 0, what="the server to die")
        assert all(len(jobs) == 1 for jobs in alive_by_replica().values()), alive_by_replica()
        server.ok("start")
        one_of_each()
    assert len(list(pids.iterdir())) > 10   # they did crash and restart meanwhile
    calm.touch()
    deadline = time.monotonic() + 60   # the longest back-off reached here is under 60 s
    while sorted(alive_by_replica()) != [0, 1, 2, 3, 4]:
        assert time.monotonic() < deadline, alive_by_replica()
        one_of_each()
        time.sleep(0.2)
    one_of_each()


@pytest.mark.parametrize("arguments, message", [
    (["web", "--", "SCRIPT"], "a service named 'web' exists already"),
    (["other", "--on", "nowhere", "--", "SCRIPT"], "unknown worker 'nowhere' in --on"),
    (["other", "--port", "65535", "--replicas", "2", "--", "SCRIPT"], "runs past port 65535"),
    (["other", "--port", "0", "--", "SCRIPT"], "not a port number"),
    (["other", "--replicas", "3", "--", "SCRIPT"], "3 replicas of 1 slot each do not fit: "
                                                   "the workers it may use hold 2 at once"),
    (["other", "--slots", "2", "--replicas", "2", "--on", "w1", "--", "SCRIPT"],
     "no worker in --on has 2 slots"),
    (["bad name", "--", "SCRIPT"], "is not a service name"),
    (["other", "-e", "REPLICA=1", "--", "SCRIPT"], "-e REPLICA: the service sets"),
    (["other", "--", "./missing.sh"], "no such script"),
])
def test_bad_service_specs_change_nothing(server, arguments, message):
    server.ok("add_slave", "w1", "w2")
    script, _ = replica_script(server)
    server.ok("add_service", "web", "--", script)
    job_before = live(server, "web")
    server.fails("add_service", *[str(script) if word == "SCRIPT" else word
                                  for word in arguments], expect=message)
    assert [entry["name"] for entry in json.loads(server.ok("services", "--json"))] == ["web"]
    assert server.status()["counts"].get("waiting", 0) == 0
    assert live(server, "web") == job_before or not job_before
    server.fails("scale", "nope", 2, expect="unknown service 'nope'")
    server.fails("scale", "web", 9, expect="9 replicas of 1 slot each do not fit")
    assert service(server, "web")["replicas"] == 1


LISTENER = """#!{python}
# Listens on 127.0.0.1:$PORT (this machine is the workers' host) until the file
# sick-$JOB_ID exists, then stops listening and lingers.
import os, socket, sys, time
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(os.environ["PORT"])))
listener.listen()
with open(os.path.join("pids", os.environ["JOB_ID"]), "w") as record:
    record.write(os.environ["REPLICA"])
while not os.path.exists("sick-" + os.environ["JOB_ID"]):
    time.sleep(0.05)
listener.close()
time.sleep(300)
"""


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("check", [["--health-tcp"], ["--health-cmd", "./check.sh --quiet"]])
def test_a_replica_whose_health_check_starts_failing_is_restarted(server, check):
    import sys
    server.ok("add_slave", "w1")
    (server.root / "pids").mkdir()
    script = server.root / "listen.py"
    script.write_text(LISTENER.format(python=sys.executable))
    script.chmod(0o755)
    server.write_script("check.sh", '[ "$1" = --quiet ] && [ -n "$SLAVE_IP" ] && '
                                    '[ -n "$PORT" ] && [ ! -e "sick-$JOB_ID" ]\n')
    server.ok("add_service", "web", "--port", free_port(), *check, "--health-interval", "0.3s",
              "--health-failures", 3, "--", script)
    wait_until(lambda: service(server, "web")["instances"][0]["health"] == "healthy",
               what="a first probe to pass")
    first = live(server, "web")[0]
    started = time.monotonic()
    (server.root / f"sick-{first}").touch()   # this replica's job only
    wait_until(lambda: json.loads(server.ok("jobs", first, "--json"))["state"] == "done",
               what="the unhealthy replica to be stopped")
    assert time.monotonic() - started >= 0.3 * 2   # three failures, 0.3 s apart
    ended = json.loads(server.ok("jobs", first, "--json"))
    assert ended["result"] == "killed"
    assert ended["reason"].startswith("restarted: 3 health checks in a row failed")
    wait_until(lambda: live(server, "web").get(0) not in (None, first), what="a restart")
    wait_until(lambda: service(server, "web")["instances"][0]["health"] == "healthy",
               what="the new replica to be healthy")
    assert service(server, "web")["restarts"] == 1


def test_a_replica_moves_off_a_worker_that_goes_down(cli, ssh_sandbox):
    doomed = ssh_sandbox.start_worker(f"wsvc{len(ssh_sandbox._workers)}")
    cli.ok("start", "--check-interval", "0.5s")
    cli.ok("add_slave", doomed.alias)
    script, _ = replica_script(cli)
    cli.ok("add_service", "agent", "--", script)
    wait_until(lambda: live(cli, "agent"), what="the replica on the only worker")
    first = live(cli, "agent")[0]
    cli.ok("add_slave", "w1")
    assert service(cli, "agent")["instances"][0]["worker"] == doomed.alias
    doomed.stop()
    wait_until(lambda: service(cli, "agent")["instances"][0]["worker"] == "w1" and
               service(cli, "agent")["instances"][0]["state"] == "running",
               what="the replica to move to w1")
    assert live(cli, "agent")[0] != first
    assert json.loads(cli.ok("jobs", first, "--json"))["reason"].startswith(
        f"moved: worker {doomed.alias} is down")


def test_replicas_are_the_services_own_wait_remove_job_and_priority_leave_them(server):
    server.ok("add_slave", "--slots", 2, "w1")
    script, _ = replica_script(server)
    server.ok("add_service", "busy", "--", script)
    server.ok("add_service", "queued", "--slots", 2, "--", script)   # no room yet: it waits
    wait_until(lambda: live(server, "busy"), what="the first replica")
    waiting = service(server, "queued")["instances"][0]["job"]
    server.fails("remove_job", waiting, expect=f"job {waiting} is replica 0 of service queued "
                                               "and cannot be removed")
    server.fails("priority", 5, waiting, expect="scale queued N")
    server.ok("kill", waiting)   # a replica killed before it ran is queued again at once
    again = service(server, "queued")["instances"][0]
    assert again["state"] == "waiting" and again["job"] not in (None, waiting)
    batch = server.add_job(server.script)   # the replicas go first: it waits
    server.ok("stop_service", "queued")
    # wait (no ids) waits for batch jobs only: busy's replica never ends.
    server.ok("wait", timeout=30)
    assert json.loads(server.ok("jobs", batch, "--json"))["result"] == "succeeded"
    assert live(server, "busy")


def test_retry_leaves_the_jobs_of_replicas_to_their_service(server):
    server.ok("add_slave", "w1")
    crash = server.write_script("crash.sh", "exit 3\n")
    server.ok("add_service", "crashy", "--", crash)
    wait_until(lambda: service(server, "crashy")["restarts"] >= 1, what="a crash")
    ended = json.loads(server.ok("jobs", "--state", "failed", "--json"))[0]["id"]
    server.fails("retry", ended, expect=f"job {ended} ran replica 0 of service crashy")
    assert server.ok("retry", "--failed").strip() == "nothing to retry: no ended job matches"
