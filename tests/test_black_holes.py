"""A black-hole worker (every job fails there at once, for reasons that are not the
job's) is set aside after K failures in a row, and the jobs that could not reach it
are retried elsewhere without spending their --retries."""
import json

import pytest

from conftest import wait_until

# Fails at once on w2 the way ssh does when it cannot get through; works on w1,
# where it takes long enough for w2 to be offered several jobs meanwhile.
ON_W2_EXIT = """[ "$SLAVE_IP" = w2 ] && exit {code}
sleep 0.3
echo "ok on $SLAVE_IP"
"""
REACH = """set -e
ssh "$SLAVE_IP" true
sleep 0.3
"""


def slaves(cli):
    return {slave["ip"]: slave for slave in cli.status()["slaves"]}


def add_checked_workers(cli, *names):
    """Add NAMES, and let the health checker's first round (at once) pass: a check that
    starts after a worker is set aside and passes takes it back."""
    cli.ok("add_slave", *names)
    first_checks_done(cli)


def first_checks_done(cli):
    wait_until(lambda: all(slave["checked_at"] for slave in slaves(cli).values()),
               what="the first health checks")


def hole_on_w2(cli, code, *start_options):
    """A server with w1 and w2 (checked hourly), and a script that exits CODE at once on
    w2 (ON_W2_EXIT)."""
    cli.ok("start", "--check-interval", "1h", *start_options)
    add_checked_workers(cli, "w1", "w2")
    return cli.write_script(f"exit{code}_on_w2.sh", ON_W2_EXIT.format(code=code))


def prove(cli, worker, script):
    """Run one job of SCRIPT on WORKER that goes well there: a worker is set aside only
    while jobs work elsewhere."""
    job_id = cli.add_job("--on", worker, script)
    cli.ok("wait", "-q", job_id)


def attempts_on(cli, worker):
    jobs = json.loads(cli.ok("jobs", "--json"))
    found = []
    for job in jobs:
        # A task as ARRAY.TASK: a first task's id is its array's, which names them all.
        name = job["id"] if job["array"] is None else f"{job['array']}.{job['task']}"
        found += [attempt for attempt in json.loads(cli.ok("jobs", name, "--json"))[
            "attempts"] if attempt["worker"] == worker]
    return found


def test_a_worker_that_ssh_cannot_get_through_is_set_aside_and_its_jobs_go_elsewhere(cli):
    script = hole_on_w2(cli, 255)
    prove(cli, "w1", script)
    ids = cli.ok("add_job", script, ":::", *range(10)).strip()
    cli.ok("wait", "-q", ids)                 # every job succeeded in the end
    failed_there = attempts_on(cli, "w2")
    assert len(failed_there) == 3 and all(a["exit_code"] == 255 for a in failed_there)
    w2 = slaves(cli)["w2"]
    assert (w2["status"], w2["health"]) == ("down", "set_aside")
    assert "3 jobs in a row failed to reach it" in w2["check_reason"]
    assert "./cli.py resume w2" in w2["check_reason"]
    for job in json.loads(cli.ok("jobs", "--json")):
        assert job["result"] == "succeeded" and job["worker"] == "w1"

    cli.ok("resume", "w2")                    # taken back by hand
    assert slaves(cli)["w2"]["health"] == "up"


def test_quick_failures_set_a_worker_aside_but_spend_retries(cli):
    script = hole_on_w2(cli, 1)
    prove(cli, "w1", script)
    ids = cli.ok("add_job", script, ":::", *range(10)).strip()
    cli.run("wait", "-q", ids)
    counts = cli.status()["counts"]
    assert (counts.get("failed"), counts.get("succeeded")) == (3, 7 + 1)
    assert slaves(cli)["w2"]["health"] == "set_aside"


@pytest.mark.alone("its 6 jobs must end before the first 2 s health check")
def test_a_passing_health_check_takes_a_set_aside_worker_back(cli):
    cli.ok("start", "--check-interval", "2s")
    cli.ok("add_slave", "w1", "w2")
    script = cli.write_script("hole.sh", ON_W2_EXIT.format(code=255))
    prove(cli, "w1", script)
    ids = cli.ok("add_job", script, ":::", *range(6)).strip()
    cli.ok("wait", "-q", ids)
    assert len(attempts_on(cli, "w2")) == 3
    wait_until(lambda: slaves(cli)["w2"]["health"] == "up", timeout=30,
               what="a health check to bring w2 back")


def test_the_rule_can_be_turned_off_per_server_and_per_worker(cli):
    script = hole_on_w2(cli, 255, "--down-after", "0")
    ids = cli.ok("add_job", script, ":::", *range(8)).strip()
    cli.run("wait", "-q", ids)
    assert slaves(cli)["w2"]["health"] == "up"
    assert cli.status()["counts"].get("failed", 0) >= 3   # every job sent there failed
    # Remembered across a restart; a worker's own setting wins.
    cli.ok("stop")
    cli.ok("start", "--check-interval", "1h")
    first_checks_done(cli)
    assert "set aside after 2 failures" in cli.ok("edit_slave", "w2", "--down-after", "2")
    prove(cli, "w1", script)
    ids = cli.ok("add_job", script, ":::", *range(8)).strip()
    cli.ok("wait", "-q", ids)
    assert slaves(cli)["w2"]["health"] == "set_aside"
    cli.fails("edit_slave", "w2", "--down-after", "-1", expect="--down-after")
    # load_status keeps a worker's own setting.
    document = cli.root / "state.json"
    document.write_text(cli.ok("status", "--json"))
    cli.ok("load_status", document)
    assert {slave["ip"]: slave["down_after"] for slave in cli.status()["slaves"]} == \
        {"w1": None, "w2": 2}
    cli.fails("start", "--down-after", "x", expect="--down-after")


@pytest.mark.parametrize("retries", [0, 1])
def test_a_job_whose_own_work_exits_255_runs_a_bounded_number_of_times(cli, retries):
    cli.ok("start", "--check-interval", "1h")
    add_checked_workers(cli, "w1", "w2")
    script = cli.write_script("always255.sh", "exit 255\n")
    job_id = cli.add_job("--retries", retries, script)
    cli.run("wait", "-q", job_id)
    job = json.loads(cli.ok("jobs", job_id, "--json"))
    assert (job["result"], job["exit_code"]) == ("failed", 255)
    # 3 free tries (--down-after), then its own attempt and its --retries.
    assert len(job["attempts"]) == 3 + 1 + retries
    assert {attempt["worker"] for attempt in job["attempts"][:2]} == {"w1", "w2"}


def test_a_worker_whose_host_key_changed_no_longer_swallows_the_queue(cli, ssh_sandbox):
    """The reproduction: a 1-slot good worker beside one whose host key changed after it
    was added; every job sent there fails (REMOTE HOST IDENTIFICATION HAS CHANGED)."""
    changed = ssh_sandbox.start_worker(f"wk{len(ssh_sandbox._workers)}")
    cli.ok("start", "--check-interval", "1h")
    add_checked_workers(cli, "w1", changed.alias)
    changed.new_host_key()
    script = cli.write_script("reach.sh", REACH)
    prove(cli, "w1", script)
    ids = cli.ok("add_job", script, ":::", *range(10)).strip()
    cli.ok("wait", "-q", ids)                 # 10 of 10 succeeded
    assert len(attempts_on(cli, changed.alias)) == 3
    assert slaves(cli)[changed.alias]["health"] == "set_aside"


def test_a_set_aside_worker_is_checked_over_a_new_connection(cli, ssh_sandbox):
    """Its host key changed while the health checker's connection stayed open (sshd
    reloaded): only a new handshake can tell, so that is what the check uses."""
    changed = ssh_sandbox.start_worker(f"wk{len(ssh_sandbox._workers)}")
    cli.ok("start", "--check-interval", "2s")
    cli.ok("add_slave", "--down-after", "1", changed.alias)
    add_checked_workers(cli, "w1")
    changed.new_host_key(keep_connections=True)
    script = cli.write_script("reach.sh", REACH)
    prove(cli, "w1", script)
    ids = cli.ok("add_job", script, ":::", *range(6)).strip()
    cli.ok("wait", "-q", ids)
    assert len(attempts_on(cli, changed.alias)) == 1
    slave = wait_until(lambda: slaves(cli)[changed.alias]["health"] == "down" and
                       slaves(cli)[changed.alias], timeout=30, what="the check to see the key")
    assert f"host key of {changed.alias} changed" in slave["check_reason"]


def test_jobs_that_fail_everywhere_set_no_worker_aside(cli):
    """Quick failures on every worker are the jobs' doing: setting the workers aside
    would only stall the queue (with one worker, for a health-check interval each)."""
    cli.ok("start", "--check-interval", "1h")
    add_checked_workers(cli, "w1", "w2")
    script = cli.write_script("broken.sh", "exit 1\n")
    ids = cli.ok("add_job", script, ":::", *range(12)).strip()
    cli.run("wait", "-q", ids)
    assert cli.status()["counts"].get("failed") == 12
    assert {slave["health"] for slave in slaves(cli).values()} == {"up"}


@pytest.mark.alone("resume must not land while a 1 s health check of rwgone is on its way")
def test_a_set_aside_worker_without_checks_of_its_own_stays_down_until_one_passes(
        cli, ssh_sandbox):
    """Added with --skip_ssh_auth_check, it gets no health checks, except once set aside:
    then a failing check keeps it down, whatever else happens meanwhile."""
    ssh_sandbox.add_alias("rwgone", "127.0.0.1", ssh_sandbox.refusing_port())
    cli.ok("start", "--check-interval", "1s")
    add_checked_workers(cli, "w1")
    cli.ok("add_slave", "--skip_ssh_auth_check", "rwgone")
    script = cli.write_script("reach.sh", REACH)
    prove(cli, "w1", script)
    ids = cli.ok("add_job", script, ":::", *range(8)).strip()
    cli.ok("wait", "-q", ids)
    wait_until(lambda: slaves(cli)["rwgone"]["health"] == "down", timeout=20,
               what="its check to fail")
    assert "connection refused" in slaves(cli)["rwgone"]["check_reason"]
    cli.ok("add_slave", "w3")                 # the checker's list changes meanwhile
    assert slaves(cli)["rwgone"]["health"] == "down"
    cli.ok("resume", "rwgone")
    assert slaves(cli)["rwgone"]["health"] == "up"
