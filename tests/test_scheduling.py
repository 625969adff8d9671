"""Scheduling policy end to end through real sshd workers: priority and slot identity."""
import json

from conftest import wait_until


def start_order(cli):
    return cli.runs()


def test_priority_orders_the_queue_and_can_be_changed(server):
    server.ok("pause")
    low = server.add_job(server.script)
    high = server.add_job("--priority", "5", server.script)
    low_too = server.add_job(server.script)
    high_too = server.add_job("--priority", "5", server.script)
    lowest = server.add_job("--priority", "-1", server.script)
    assert server.ok("priority", "10", low_too).strip() == f"job {low_too}: priority 10"
    waiting = [job["id"] for job in server.status()["job_waitlist"]]
    expected = [low_too, high, high_too, low, lowest]
    assert waiting == expected, "status lists waiting jobs in the order they will start"
    server.ok("add_slave", "w1")
    server.ok("resume")
    server.ok("wait", "-q")
    assert start_order(server) == expected
    jobs = {job["id"]: job for job in json.loads(server.ok("jobs", "--json"))}
    assert [jobs[job_id]["priority"] for job_id in expected] == [10, 5, 5, 0, -1]


def test_priority_refuses_what_it_cannot_change(server):
    server.ok("add_slave", "w1")
    running = server.add_job(server.script, env=dict(server.env, SLEEP="30"))
    server.wait_for_counts(running=1)
    waiting = server.add_job(server.script)
    before = server.status()
    server.fails("priority", "3", running, expect=f"job {running} is running")
    server.fails("priority", "3", waiting, "999", expect="unknown job id 999")
    server.fails("priority", "high", waiting, expect="invalid int value")
    server.fails("priority", str(10 ** 10), waiting, expect="'priority' must be a whole number")
    server.fails("add_job", "--priority", "1.5", server.script, expect="--priority")
    after = server.status()
    assert after["job_waitlist"] == before["job_waitlist"]
    server.ok("kill", running)


def test_each_running_job_has_a_slot_of_its_own(server):
    server.ok("add_slave", "--slots", "3", "w1")
    server.ok("add_slave", "--slots", "2", "w2")
    ids = server.ok("add_job", server.script, ":::", *range(12),
                    env=dict(server.env, SLEEP="0.3")).strip()
    server.ok("wait", "-q", ids)
    records = [server.record(job_id) for job_id in range(1, 13)]
    slots = {"w1": 3, "w2": 2}
    for record in records:
        env = record["env"]
        assert env["JOB_ATTEMPT"] == "1"
        assert env["SLOTS"] == env["SLOT"]
        assert 0 <= int(env["SLOT"]) < slots[record["slave"]]
    for first in records:
        for second in records:
            if first is not second and first["slave"] == second["slave"] and \
                    first["env"]["SLOT"] == second["env"]["SLOT"]:
                assert first["end"] <= second["start"] or second["end"] <= first["start"], \
                    "two jobs held one slot at once"
    wait_until(lambda: server.status()["counts"].get("succeeded") == 12)
