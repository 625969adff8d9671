"""load_status: status --json round-trips; a bad document changes nothing."""
import json

import pytest


def comparable(status):
    """The parts of a status document that load_status restores."""
    return {"slaves": [{key: slave[key] for key in ("ip", "envs", "slots", "status")}
                       for slave in status["slaves"]],
            "job_waitlist": [{key: job[key] for key in ("id", "script", "args", "cwd", "envs")}
                             for job in status["job_waitlist"]],
            "environments": list(status["environments"].values())}


def occupy(server, count):
    """Jobs that hold every slot, so that the queue stays put."""
    busy = [server.add_job(server.script, env=dict(server.env, SLEEP="60"))
            for _ in range(count)]
    server.wait_for_counts(running=count)
    return busy


def test_status_json_then_load_status_reproduces_the_state(server, tmp_path):
    server.ok("add_slave", "--skip_ssh_auth_check", "-e", "A=1", "w1", "w2")
    occupy(server, 2)
    first = server.add_job("-e", "X=y", server.script, "one", "two words")
    server.add_job(server.script, "")
    saved = tmp_path / "state.json"
    saved.write_text(server.ok("status", "--json"))
    before = comparable(server.status())
    server.ok("remove_slave", "--wait", "w1")   # busy, so draining: the load revives it
    server.ok("remove_job", first)
    server.add_job(server.script, "extra")
    assert "loaded 2 worker(s) and 2 waiting job(s)" in server.ok("load_status", saved)
    assert comparable(server.status()) == before


def test_a_paused_queue_and_worker_stay_paused_through_a_round_trip(server, tmp_path):
    server.ok("add_slave", "--skip_ssh_auth_check", "w1", "w2")
    server.ok("pause")
    server.ok("pause", "w2")
    saved = tmp_path / "state.json"
    saved.write_text(server.ok("status", "--json"))
    server.ok("resume")
    server.ok("resume", "w2")
    server.ok("load_status", saved)
    status = server.status()
    assert status["paused"] is True
    assert [slave["status"] for slave in status["slaves"]] == ["idle", "paused"]


def test_loaded_jobs_run_with_their_saved_environment(server, tmp_path):
    server.add_job(server.script, env=dict(server.env, SAVED="from-submitter"))
    saved = tmp_path / "state.json"
    saved.write_text(server.ok("status", "--json"))
    server.ok("remove_job", "1")
    server.ok("load_status", saved, env=dict(server.env, SAVED="from-loader"))
    server.ok("add_slave", "w1")
    server.wait_for_counts(succeeded=1)
    assert server.record(1)["env"]["SAVED"] == "from-submitter"


def test_an_original_style_document_gets_defaults(server, tmp_path):
    document = {"slaves": [{"ip": "w1", "envs": {}, "status": "idle", "running_job": None}],
                "job_waitlist": [{"script": str(server.script), "args": ["a"]}]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(document))
    server.ok("load_status", path)
    assert server.status()["slaves"][0]["slots"] == 1
    server.wait_for_counts(succeeded=1)
    record = server.record(1)
    assert record["cwd"] == str(server.root) and record["args"] == ["a"]


def test_the_original_tools_own_status_document_loads(server, tmp_path):
    """What the original tool's status printed: each waiting job a pair of (script and
    arguments, NAME=value strings), envs as lists, scripts named from the current
    directory; a running job (its pid is that tool's) and a worker it was to remove
    after its job are left out, and said so."""
    document = {
        "job_waitlist": [[["record.py", "first", "two words"], ["MODE=fast", "EQ=a=b"]],
                         [["record.py"], []]],
        "slaves": [
            {"ip": "w1", "envs": ["SCRATCH=/tmp"], "status": "busy",
             "running_job": {"id": 7, "envs": [], "script": ["record.py", "old"],
                             "pid": 4242, "log_file": "logs/job_7.txt"}},
            {"ip": "w2", "envs": [], "status": "idle", "running_job": None,
             "remove_after_finish": True}]}
    path = tmp_path / "original.json"
    path.write_text(json.dumps(document))
    result = server.run("load_status", path)
    assert result.returncode == 0, result.stderr
    assert "loaded 1 worker(s) and 2 waiting job(s)" in result.stdout
    assert "w1 was running job 7 (record.py old) under the original tool: not adopted " \
           "(its pid 4242 is that tool's)" in result.stderr
    assert "w2 was to be removed after its job (remove_after_finish): left out" in result.stderr
    server.wait_for_counts(succeeded=2)
    first, second = server.record(1), server.record(2)
    assert first["args"] == ["first", "two words"] and second["args"] == []
    assert (first["env"]["MODE"], first["env"]["EQ"], first["env"]["SCRATCH"]) == \
        ("fast", "a=b", "/tmp")
    assert [slave["ip"] for slave in server.status()["slaves"]] == ["w1"]
    for job, message in (([["record.py"], ["NOEQUALS"]], "has no '='"),
                         ([["record.py"]], "[[SCRIPT, ARGS...], [NAME=value, ...]]"),
                         ([["nonexistent.sh"], []], "no such script")):
        path.write_text(json.dumps({"slaves": [], "job_waitlist": [job]}))
        server.fails("load_status", path, expect=message)


def bad_documents(script):
    good_job = {"script": str(script), "args": []}
    return [
        ("[]", "expected a JSON object"),
        ('{"slaves": []}', "'job_waitlist' must be a list"),
        ('{"slaves": [{"ip": "-oProxyCommand=x"}], "job_waitlist": []}', "cannot start with"),
        ('{"slaves": [{"ip": "a"}, {"ip": "a"}], "job_waitlist": []}', "listed twice"),
        ('{"slaves": [{"ip": "a", "slots": 0}], "job_waitlist": []}', "at least 1"),
        ('{"slaves": [{"ip": "a", "envs": {"JOB_ID": "1"}}], "job_waitlist": []}',
         "cannot be overridden"),
        (json.dumps({"slaves": [], "job_waitlist": [dict(good_job, envs={"SLAVE_IP": "x"})]}),
         "cannot be overridden"),
        (json.dumps({"slaves": [], "job_waitlist": [dict(good_job, args=[1])]}),
         "list of strings"),
        (json.dumps({"slaves": [], "job_waitlist": [dict(good_job, script="/nonexistent")]}),
         "no such script"),
        (json.dumps({"slaves": [], "job_waitlist": [dict(good_job, cwd="relative")]}),
         "absolute path"),
        (json.dumps({"slaves": [], "job_waitlist": [dict(good_job, environment=9)]}),
         "not in 'environments'"),
        (json.dumps({"slaves": [], "job_waitlist": [dict(good_job, id=3), dict(good_job, id=3)]}),
         "listed twice"),
        ("{not json", "not valid JSON"),
    ]


@pytest.mark.parametrize("index", range(len(bad_documents("x"))))
def test_a_bad_document_is_rejected_whole(server, tmp_path, index):
    text, message = bad_documents(server.script)[index]
    server.ok("add_slave", "--skip_ssh_auth_check", "keep")
    occupy(server, 1)                      # so the waiting job below stays waiting
    server.add_job(server.script, "keep")
    before = comparable(server.status())
    path = tmp_path / "bad.json"
    path.write_text(text)
    server.fails("load_status", path, expect=message)
    assert comparable(server.status()) == before


def test_unreadable_file(server, tmp_path):
    server.fails("load_status", tmp_path / "missing.json", expect="cannot read")


def test_running_jobs_survive_a_load_and_a_dropped_busy_worker_drains(server, tmp_path):
    server.ok("add_slave", "--skip_ssh_auth_check", "w1", "w2")
    running = occupy(server, 2)
    path = tmp_path / "only-w2.json"
    path.write_text(json.dumps({"slaves": [{"ip": "w2", "slots": 2}], "job_waitlist": []}))
    server.ok("load_status", path)
    status = server.status()
    assert sorted(job["id"] for job in status["running_jobs"]) == running
    states = {slave["ip"]: (slave["status"], slave["slots"]) for slave in status["slaves"]}
    assert states == {"w1": ("draining", 1), "w2": ("busy", 2)}
