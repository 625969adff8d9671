"""./cli.py top: a live terminal view, driven in tmux against a server with real sshd
workers, and the snapshots the server sends it."""
import json
import shlex
import sys

from conftest import CLI, wait_until


def start_top(server, tmux, width=80, height=24):
    """top in a tmux pane of WIDTH x HEIGHT; its exit status lands in a file."""
    exit_status = server.root / "top.status"
    command = shlex.join([sys.executable, str(CLI), "top"]) + f" 2> {shlex.quote(str(server.root / 'top.err'))}" + \
        f"; echo $? > {shlex.quote(str(exit_status))}"
    tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height),
         "-c", str(server.root), command, env=dict(server.env, TERM="xterm-256color"))
    return exit_status


def screen(tmux):
    return tmux("capture-pane", "-p", "-t", "top")


def test_top_shows_the_running_job_pauses_the_queue_and_quits(server, tmux):
    server.ok("add_slave", "--slots", "2", "--gpus", "4", "w1")
    gate = server.root / "gate"
    gated = server.write_script("gated.sh", f"while [ ! -e {gate} ]; do sleep 0.05; done\n")
    job_id = server.add_job("--gpus", "1", gated, "some-input")
    failing = server.add_job(server.write_script("failing.sh", "exit 3\n"))
    server.wait_for_counts(running=1, failed=1)
    exit_status = start_top(server, tmux)
    wait_until(lambda: f"{job_id}  w1:" in screen(tmux) and "some-input" in screen(tmux),
               what="the running job on the screen")
    shown = screen(tmux)
    assert "Workers (1)" in shown and "w1" in shown and "1/2 gpus 1/4" in shown
    assert "1 running" in shown and "1 failed" in shown
    assert f"{failing}  failed" in shown and "Latest failures" in shown
    assert len(shown.splitlines()) <= 24 and max(map(len, shown.splitlines())) <= 80
    tmux("send-keys", "-t", "top", "p")
    wait_until(lambda: server.status()["paused"], what="the queue to pause")
    wait_until(lambda: "QUEUE PAUSED" in screen(tmux), what="top to say so")
    tmux("send-keys", "-t", "top", "p")
    wait_until(lambda: not server.status()["paused"], what="the queue to resume")
    # A job that starts appears without a key being pressed.
    second = server.add_job(gated, "second-input")
    try:
        wait_until(lambda: "second-input" in screen(tmux), what="the new job")
    except AssertionError:
        raise AssertionError(screen(tmux) + json.dumps(server.status()["counts"]))
    # The selected job's worker: w pauses it.
    tmux("send-keys", "-t", "top", "w")
    wait_until(lambda: server.status()["slaves"][0]["state"] == "paused",
               what="worker w1 to pause")
    # A resize does not crash it.
    tmux("resize-window", "-t", "top", "-x", "60", "-y", "12")
    try:
        wait_until(lambda: "Running (2)" in screen(tmux), what="the smaller screen")
    except AssertionError:
        raise AssertionError(screen(tmux) + json.dumps(server.status()["counts"]))
    tmux("resize-window", "-t", "top", "-x", "120", "-y", "40")
    wait_until(lambda: "Workers (1)" in screen(tmux), what="the larger screen")
    tmux("send-keys", "-t", "top", "q")
    wait_until(lambda: exit_status.exists() and exit_status.read_text(), what="top to exit")
    assert exit_status.read_text() == "0\n"
    gate.touch()
    server.ok("wait", job_id, second)


def test_k_kills_the_selected_job_after_y_and_l_shows_its_log(server, tmux):
    server.ok("add_slave", "w1")
    talker = server.write_script("talker.sh", "echo hello-from-the-job; sleep 300\n")
    job_id = server.add_job(talker)
    server.wait_for_counts(running=1)
    exit_status = start_top(server, tmux)
    wait_until(lambda: f"{job_id}  w1:" in screen(tmux), what="the job on the screen")
    tmux("send-keys", "-t", "top", "l")
    wait_until(lambda: "hello-from-the-job" in screen(tmux), what="the log's tail")
    tmux("send-keys", "-t", "top", "l")
    tmux("send-keys", "-t", "top", "k")
    wait_until(lambda: f"kill job {job_id}?" in screen(tmux), what="the question")
    tmux("send-keys", "-t", "top", "n")
    wait_until(lambda: "not killed" in screen(tmux), what="the answer")
    assert server.status()["counts"]["running"] == 1
    tmux("send-keys", "-t", "top", "k")
    tmux("send-keys", "-t", "top", "y")
    server.wait_for_counts(killed=1, running=0)
    tmux("send-keys", "-t", "top", "q")
    wait_until(lambda: exit_status.exists() and exit_status.read_text(), what="top to exit")


def test_thousands_of_jobs_show_the_top_of_each_list_and_count_the_rest(server, tmux):
    server.ok("add_slave", "--slots", "150", "w1")
    sleeper = server.write_script("sleeper.sh", "sleep 300\n")
    server.ok("add_job", "--array", "1-3000", sleeper)
    server.wait_for_counts(running=150, waiting=2850)
    start_top(server, tmux)
    wait_until(lambda: "Running (150)" in screen(tmux), what="the counts")
    shown = screen(tmux)
    assert "2850 waiting" in shown and "... and " in shown and "more" in shown
    assert len(shown.splitlines()) <= 24
    server.ok("kill", "1")   # the array: every task


def test_without_a_terminal_top_says_so_and_exits_2(server):
    result = server.run("top")
    assert result.returncode == 2 and "top needs a terminal" in result.stderr


def test_watch_sends_a_snapshot_at_once_and_after_each_change(server):
    """The feed under top (and the dashboard): what a snapshot holds."""
    sys.path.insert(0, str(CLI.parent))
    import cli
    server.ok("add_slave", "w1")
    events = []
    with cli.connect(str(server.data_dir), "watch", {}) as connection:
        reader = cli.LineReader()

        def next_snapshot():
            while True:
                for line in reader.feed(connection.recv(1 << 20)):
                    events.append(json.loads(line))
                if events:
                    return events.pop(0)
        first = next_snapshot()
        assert first["event"] == "live" and first["counts"]["waiting"] == 0
        assert [worker["ip"] for worker in first["workers"]] == ["w1"]
        job_id = server.add_job(server.script)
        snapshot = next_snapshot()
        while not snapshot["recent"]:
            snapshot = next_snapshot()
        assert snapshot["recent"][0]["id"] == job_id
        assert "envs" not in snapshot["recent"][0]   # no environment in a live view
        assert snapshot["activity"]["starts"] == 1
