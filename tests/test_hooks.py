"""Completion hooks: add_job --on-end and start --on-end run a program on this machine
once a job has ended for good, with how it ended in its environment; at least once,
also across stops and a kill -9 of the server, and never holding up the server."""
import importlib.util
import json
import os
import pathlib
import re
import signal
import sys
import time

import pytest

from conftest import process_alive, wait_until

spec = importlib.util.spec_from_file_location(
    "cli", pathlib.Path(__file__).resolve().parent.parent / "cli.py")
cli_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli_module)

# Records what a hook saw in results/hook-JOB_ID-NAME.json (NAME: its first argument,
# so that two hooks of one job keep apart), and appends JOB_ID NAME to hooks.log.
HOOK = """#!{python}
import json, os, sys
results = os.environ["RESULTS"]
name = sys.argv[1] if len(sys.argv) > 1 else "x"
with open(os.path.join(results, "hooks.log"), "a") as runs:
    runs.write(os.environ["JOB_ID"] + " " + name + "\\n")
record = {{"env": dict(os.environ), "argv": sys.argv[1:], "cwd": os.getcwd()}}
path = os.path.join(results, "hook-" + os.environ["JOB_ID"] + "-" + name + ".json")
with open(path + ".tmp", "w") as out:
    json.dump(record, out)
os.replace(path + ".tmp", path)
print("hook of job", os.environ["JOB_ID"], "says hello")
sys.exit(int(os.environ.get("HOOK_EXIT", "0")))
"""


@pytest.fixture
def hook(cli):
    path = cli.root / "hook.py"
    path.write_text(HOOK.format(python=sys.executable))
    path.chmod(0o755)
    return path


def seen(cli, job_id, name="x"):
    """What the hook of JOB_ID named NAME saw, once it has run."""
    path = cli.results / f"hook-{job_id}-{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def hook_runs(cli):
    path = cli.results / "hooks.log"
    return path.read_text().splitlines() if path.exists() else []


def hooks_of(cli, job_id):
    """The hook runs of JOB_ID as jobs --json shows them."""
    job, = [job for job in json.loads(cli.ok("jobs", "--json")) if job["id"] == job_id]
    return job["hooks"]


def wait_for_hooks(cli, job_id, count=1, timeout=30):
    """The hook runs of JOB_ID, once COUNT of them are done."""
    return wait_until(lambda: (lambda hooks: len(hooks) >= count and
                               all(hook["state"] == "done" for hook in hooks) and hooks)(
                                   hooks_of(cli, job_id)),
                      timeout, f"the hooks of job {job_id} to be done")


def test_a_hook_sees_how_its_job_ended_succeeded_failed_killed_timed_out(server, hook):
    cwd = server.root / "work dir"
    cwd.mkdir()
    env = dict(server.env, MY_DISPLAY=":7")
    on_end = f"{hook} x 'two words'"
    never_ran = server.add_job("--on-end", on_end, server.script, env=env, cwd=cwd)
    server.ok("kill", never_ran)
    server.ok("add_slave", "--slots", "4", "w1")
    succeeded = server.add_job("--on-end", on_end, "-e", "MINE=1", server.script, "a", "b c",
                               env=env, cwd=cwd)
    failed = server.add_job("--on-end", on_end, server.script, env=dict(env, EXIT_CODE="3"),
                            cwd=cwd)
    killed = server.add_job("--on-end", on_end, server.script, env=dict(env, SLEEP="300"),
                            cwd=cwd)
    timed_out = server.add_job("--on-end", on_end, "--timeout", "1s", server.script,
                               env=dict(env, SLEEP="300"), cwd=cwd)
    wait_until(lambda: server.record(succeeded) and server.record(failed), what="two jobs")
    wait_until(lambda: killed in server.runs(), what="the job to kill to start")
    server.ok("kill", killed)
    for job_id in (never_ran, succeeded, failed, killed, timed_out):
        wait_for_hooks(server, job_id)
    expected = {
        never_ran: ("killed", "", "", "", "0"),
        succeeded: ("succeeded", "0", "", "w1", "1"),
        failed: ("failed", "3", "", "w1", "1"),
        killed: ("killed", "", str(int(signal.SIGTERM)), "w1", "1"),
        timed_out: ("timed_out", "", str(int(signal.SIGTERM)), "w1", "1"),
    }
    for job_id, (result, exit_code, signal_number, worker, attempts) in expected.items():
        record = seen(server, job_id)
        hook_env = record["env"]
        assert (hook_env["JOB_ID"], hook_env["JOB_RESULT"], hook_env["JOB_EXIT_CODE"],
                hook_env["JOB_SIGNAL"], hook_env["JOB_WORKER"], hook_env["JOB_ATTEMPTS"]) == \
            (str(job_id), result, exit_code, signal_number, worker, attempts), job_id
        assert hook_env["JOB_LOG"] == str(server.log_dir / f"job_{job_id}.txt")
        assert record["cwd"] == str(cwd) and record["argv"] == ["x", "two words"]
        assert hook_env["MY_DISPLAY"] == ":7"   # the submitter's environment
        assert "SLAVE_IP" not in hook_env       # (what only its attempts get)
    assert json.loads(seen(server, succeeded)["env"]["JOB_ARGS"]) == ["a", "b c"]
    assert seen(server, succeeded)["env"]["MINE"] == "1"
    assert sorted(hook_runs(server)) == sorted(f"{job_id} x" for job_id in expected)
    log = (server.log_dir / "server.log").read_text()
    assert f"job {succeeded}: hook: hook of job {succeeded} says hello" in log


def test_jobs_id_shows_how_the_hook_went_and_every_task_of_an_array_gets_one(server, hook):
    server.ok("add_slave", "--slots", "2", "w1")
    array = server.add_job("--on-end", str(hook), server.script, ":::", "a", "b", "c",
                           env=dict(server.env, HOOK_EXIT="7"))
    for job_id in range(array, array + 3):
        done, = wait_for_hooks(server, job_id)
        assert (done["exit_code"], done["signal"], done["timed_out"], done["starts"]) == \
            (7, None, False, 1)
        assert 0 <= done["duration"] < 30 and done["program"] == [str(hook)]
    shown = server.ok("jobs", array + 1)
    assert f"on_end:       {hook}" in shown
    assert f"{hook} (job's --on-end): exit 7 after " in shown
    job = json.loads(server.ok("jobs", array, "--json"))
    assert len(job) == 3 and all(len(task["hooks"]) == 1 for task in job)


def test_a_hook_for_a_job_that_ended_while_the_server_was_down_runs_after_start(server, hook):
    server.ok("add_slave", "w1")
    gate = server.root / "gate"
    gated = server.write_script("gated.sh", f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n"
                                            "exit 4\n")
    job_id = server.add_job("--on-end", str(hook), gated)
    server.wait_for_counts(running=1)
    server.ok("stop")
    gate.touch()
    wait_until(lambda: list((server.data_dir / "run").glob("*.exit")),
               what="the job to end while the server is down")
    assert hook_runs(server) == []
    server.ok("start")
    wait_for_hooks(server, job_id)
    assert (seen(server, job_id)["env"]["JOB_RESULT"], seen(server, job_id)["env"]
            ["JOB_EXIT_CODE"]) == ("failed", "4")
    assert hook_runs(server) == [f"{job_id} x"]


def test_a_hook_that_hangs_is_cut_at_its_timeout_and_the_server_stays_responsive(cli):
    # 4 s: room for the looks below while it hangs, even on a busy machine
    cli.ok("start", "--hook-timeout", "4s")
    cli.ok("add_slave", "w1")
    marker = cli.root / "hook.pid"
    hang = cli.write_script("hang.sh", f"echo $$ > '{marker}'\nsleep 300\n")
    job_id = cli.add_job("--on-end", str(hang), cli.script)
    wait_until(marker.exists, what="the hook to start")
    began = time.monotonic()
    status = cli.status()   # answered while the hook hangs
    assert time.monotonic() - began < 2.0
    assert status["hooks"]["running"] == [job_id] and status["hooks"]["timeout"] == 4.0
    assert json.loads(cli.ok("jobs", job_id, "--json"))["hooks"][0]["state"] == "running"
    done, = wait_for_hooks(cli, job_id)
    assert done["timed_out"] and done["signal"] == signal.SIGTERM and done["exit_code"] is None
    assert 3.5 < done["duration"] < 20
    assert not process_alive(int(marker.read_text()))
    assert "timed out, SIGTERM after" in cli.ok("jobs", job_id)
    assert "still runs after 4s" in (cli.log_dir / "server.log").read_text()


def test_at_most_four_hooks_run_at_once_the_rest_wait_their_turn(cli):
    cli.ok("start")
    cli.ok("add_slave", "--slots", "6", "w1")
    gate = cli.root / "gate"
    started = cli.root / "started"
    started.mkdir()
    gated = cli.write_script("gated_hook.sh", f"touch '{started}'/$JOB_ID\n"
                                              f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n")
    ids = [cli.add_job("--on-end", str(gated), cli.script) for _ in range(6)]
    wait_until(lambda: len(os.listdir(started)) == 4, what="four hooks to start")
    hooks = wait_until(lambda: (lambda found: found["pending"] == 2 and found)(
        cli.status()["hooks"]), what="two hooks to wait")
    assert len(hooks["running"]) == 4 and len(os.listdir(started)) == 4
    gate.touch()
    for job_id in ids:
        wait_for_hooks(cli, job_id)
    assert len(os.listdir(started)) == 6


def test_start_on_end_runs_for_every_job_beside_its_own_and_is_remembered(cli, hook):
    cli.ok("start", "--on-end", f"{hook} server")
    cli.ok("add_slave", "w1")
    plain = cli.add_job(cli.script)
    both = cli.add_job("--on-end", f"{hook} own", cli.script)
    wait_for_hooks(cli, plain)
    hooks = wait_for_hooks(cli, both, count=2)
    assert sorted(hook["from"] for hook in hooks) == ["job", "server"]
    assert seen(cli, plain, "server")["env"]["JOB_RESULT"] == "succeeded"
    assert seen(cli, both, "own") and seen(cli, both, "server")
    assert cli.status()["hooks"]["on_end"] == [str(hook), "server"]
    cli.ok("stop")
    cli.ok("start")   # without --on-end: kept
    assert cli.status()["hooks"]["on_end"] == [str(hook), "server"]
    cli.ok("stop")
    cli.ok("start", "--no-on-end")
    assert cli.status()["hooks"]["on_end"] is None
    later = cli.add_job("--on-end", f"{hook} own", cli.script)
    assert [hook["from"] for hook in wait_for_hooks(cli, later)] == ["job"]
    cli.wait_for_counts(succeeded=3)
    assert len(hooks_of(cli, later)) == 1 and seen(cli, later, "server") is None


@pytest.mark.parametrize("how", ["kill -9", "stop"])
def test_a_hook_cut_short_by_the_server_going_runs_again_and_a_finished_one_does_not(cli, hook,
                                                                                    how):
    cli.ok("start")
    cli.ok("add_slave", "w1")
    gate = cli.root / "gate"
    starts = cli.root / "starts"
    slow = cli.write_script("slow_hook.sh", f"echo $$ >> '{starts}'\n"
                                            f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n"
                                            f"echo done >> '{starts}'\n")
    finished = cli.add_job("--on-end", str(hook), cli.script)
    wait_for_hooks(cli, finished)
    cut = cli.add_job("--on-end", str(slow), cli.script)
    wait_until(lambda: starts.exists(), what="the slow hook to start")
    first_hook = int(starts.read_text().split()[0])
    if how == "stop":   # stop ends the hook, which runs again at the next start
        cli.ok("stop")
        wait_until(lambda: not process_alive(first_hook), what="stop to end the hook")
    else:
        os.kill(cli.server_pid(), signal.SIGKILL)
        wait_until(lambda: cli.run("status").returncode != 0, what="the server to die")
    cli.ok("start")
    wait_until(lambda: len(starts.read_text().split()) >= 2, what="the hook to run again")
    assert hooks_of(cli, cut)[0]["state"] == "running" and hooks_of(cli, cut)[0]["starts"] == 2
    assert "running (again" in cli.ok("jobs", cut)
    gate.touch()
    done, = wait_for_hooks(cli, cut)
    assert done["starts"] == 2 and done["exit_code"] == 0
    assert hook_runs(cli) == [f"{finished} x"]   # the finished one: once only
    assert hooks_of(cli, finished)[0]["starts"] == 1


def test_on_end_survives_status_json_and_load_status(server, hook, tmp_path):
    job_id = server.add_job("--on-end", f"{hook} 'a b'", server.script)
    document = tmp_path / "state.json"
    document.write_text(server.ok("status", "--json"))
    assert json.loads(document.read_text())["job_waitlist"][0]["on_end"] == [str(hook), "a b"]
    server.ok("load_status", str(document))
    server.ok("add_slave", "w1")
    wait_for_hooks(server, job_id)
    assert seen(server, job_id, "a b")["env"]["JOB_RESULT"] == "succeeded"


def test_purge_keeps_a_job_until_its_hook_has_run(cli):
    cli.ok("start")
    cli.ok("add_slave", "w1")
    gate = cli.root / "gate"
    gated = cli.write_script("gated_hook.sh", f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n")
    job_id = cli.add_job("--on-end", str(gated), cli.script)
    cli.wait_for_counts(succeeded=1)
    assert "purged 0" in cli.ok("purge", "--older-than", "0")
    gate.touch()
    wait_for_hooks(cli, job_id)
    assert "purged 1" in cli.ok("purge", "--older-than", "0")


@pytest.mark.parametrize("argv, expect", [
    (["add_job", "--on-end", "/nonexistent/notify", "SCRIPT"], "no such --on-end program"),
    (["add_job", "--on-end", "no-such-program-anywhere", "SCRIPT"], "command on PATH"),
    (["add_job", "--on-end", "", "SCRIPT"], "--on-end needs a program"),
    (["add_job", "--on-end", "  ", "SCRIPT"], "--on-end needs a program"),
    (["add_job", "--on-end", "notify-send 'unclosed", "SCRIPT"], "fix its quoting"),
    (["add_job", "--on-end", "PLAIN", "SCRIPT"], "chmod +x"),
    (["start", "--on-end", "/nonexistent/notify"], "no such --on-end program"),
    (["start", "--on-end", "SCRIPT", "--no-on-end"], "choose one"),
    (["start", "--hook-timeout", "0"], "longer than 0"),
    (["start", "--hook-timeout", "soon"], "not a duration"),
])
def test_bad_on_end_is_refused_with_one_line_and_changes_nothing(server, argv, expect):
    plain = server.write_script("plain", "exit 0\n")
    plain.chmod(0o644)
    places = {"SCRIPT": str(server.script), "PLAIN": str(plain)}
    argv = [places.get(word, word) for word in argv]
    before = server.status()
    stderr = server.fails(*argv, expect=expect)
    assert len(stderr.strip().splitlines()) == 1, stderr
    after = server.status()
    assert after["counts"] == before["counts"] and after["hooks"] == before["hooks"]


@pytest.mark.parametrize("on_end, expect", [
    ([], "non-empty list"), ("/bin/true", "non-empty list"), ([1], "non-empty list"),
    (["true"], "must be absolute"), (["/nonexistent"], "no such --on-end program"),
    (["/bin/true", "a\0b"], "non-empty list"),
])
def test_a_malformed_on_end_request_is_refused(server, on_end, expect):
    with pytest.raises(cli_module.UserError, match=expect):
        cli_module.request(str(server.data_dir), "add_job", script=str(server.script), args=[],
                           cwd=str(server.root), environment={}, on_end=on_end)
    assert server.status()["counts"]["waiting"] == 0


# --- the README's three uses, run as the README writes them ------------------------

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_script(cli, name):
    """The script of README.md that begins '#!/bin/sh' then '# NAME: ...', written out."""
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        if block.startswith(f"#!/bin/sh\n# {name}:"):
            return cli.write_script(name, block.split("\n", 1)[1])
    raise AssertionError(f"README.md has no {name}")


@pytest.fixture
def chat():
    """A chat webhook on loopback: the JSON bodies posted to it."""
    import http.server
    import threading
    posts = []

    class Webhook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posts.append((self.headers["Content-Type"], json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T000/B000", posts
    server.shutdown()
    server.server_close()


def test_the_readme_notification_chat_and_csv_hooks_work_as_written(cli, chat):
    url, posts = chat
    home, bin_dir, sweep_dir = cli.root / "home", cli.root / "bin", cli.root / "sweep"
    for directory in (home / ".config" / "cli-py", bin_dir, sweep_dir):
        directory.mkdir(parents=True)
    (home / ".config" / "cli-py" / "webhook-url").write_text(url + "\n")
    # notify-send as a desktop would run it, but writing what it was told to a file.
    (bin_dir / "notify-send").write_text(
        '#!/bin/sh\nprintf "%s|" "$@" > "$RESULTS/notified-$JOB_ID"\n')
    (bin_dir / "notify-send").chmod(0o755)
    env = {name: value for name, value in cli.env.items() if "proxy" not in name.lower()}
    env.update(HOME=str(home), PATH=f"{bin_dir}:{env['PATH']}", NO_PROXY="127.0.0.1")
    notify, chat_hook = readme_script(cli, "notify.sh"), readme_script(cli, "chat.sh")
    collect = readme_script(cli, "collect.sh")
    cli.ok("start", "--on-end", notify, env=env)
    cli.ok("add_slave", "--slots", "3", "w1", env=env)
    failing = cli.add_job("--on-end", chat_hook, cli.script, "x",
                          env=dict(env, EXIT_CODE="3"))
    sweep = cli.add_job("--on-end", collect, cli.script, ":::", "0.1", "a \"b\"", "c,d",
                        env=env, cwd=sweep_dir)
    for job_id in (failing, sweep, sweep + 1, sweep + 2):
        assert len(wait_for_hooks(cli, job_id, count=2)) == 2
        assert all(hook["exit_code"] == 0 for hook in hooks_of(cli, job_id)), job_id
    assert (cli.results / f"notified-{failing}").read_text() == \
        f"job {failing}: failed|exit 3, on w1|"
    assert (cli.results / f"notified-{sweep}").read_text() == \
        f"job {sweep}: succeeded|exit 0, on w1|"
    assert posts == [("application/json",
                      {"text": f'job {failing} failed (exit 3) on w1: ["x"]'})]
    import csv
    rows = list(csv.reader((sweep_dir / "results.csv").open()))
    assert rows[0] == ["job", "result", "exit_code", "signal", "worker", "attempts", "args"]
    assert sorted(rows[1:]) == sorted(
        [str(job_id), "succeeded", "0", "", "w1", "1", json.dumps([arg])]
        for job_id, arg in zip(range(sweep, sweep + 3), ["0.1", 'a "b"', "c,d"]))
    # Run again for the same end (as after a kill -9), it writes no second line.
    import subprocess
    again = seen_environment(cli, sweep, rows)
    subprocess.run([str(collect)], cwd=sweep_dir, env=again, check=True)
    assert len(list(csv.reader((sweep_dir / "results.csv").open()))) == 4


def seen_environment(cli, job_id, rows):
    """The environment a hook of JOB_ID had, as its CSV line tells it."""
    line, = [row for row in rows if row[0] == str(job_id)]
    return dict(cli.env, JOB_ID=line[0], JOB_RESULT=line[1], JOB_EXIT_CODE=line[2],
                JOB_SIGNAL=line[3], JOB_WORKER=line[4], JOB_ATTEMPTS=line[5], JOB_ARGS=line[6])
