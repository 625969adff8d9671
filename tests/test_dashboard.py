"""./cli.py dashboard: the web page in a real headless Chromium against a server with
real sshd workers; the token, the cookie and the Origin check asked over plain HTTP;
/metrics read by Prometheus's own parser."""
import http.client
import json
import os
import signal
import socket
import stat
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from browser import Browser
from conftest import process_alive, wait_until


@pytest.fixture(scope="module")
def browser():
    chromium = Browser()
    yield chromium
    chromium.close()


def open_dashboard(server, *args, listen="127.0.0.1:0"):
    """Turn the dashboard on; (its base URL, its token) from the URL dashboard printed."""
    url = server.ok("dashboard", "--listen", listen, *args).strip().splitlines()[-1]
    base, token = url.split("/?token=")
    return base, token


def ask(url, method="GET", headers=None, body=None):
    """(status, headers, body) of one HTTP request, redirects not followed; of an event
    stream (which never ends), the body up to its first event with data."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                           body=body, headers=headers or {})
        response = connection.getresponse()
        if response.getheader("Content-Type") != "text/event-stream":
            return response.status, response.headers, response.read()
        lines = []
        while not (lines and lines[-1] == b"\n" and any(line.startswith(b"data:")
                                                         for line in lines)):
            lines.append(response.readline())
        return response.status, response.headers, b"".join(lines)
    finally:
        connection.close()


def post(base, action, payload, token=None, origin="same", content_type="application/json"):
    host = urllib.parse.urlsplit(base).netloc
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Cookie"] = f"cli_py_dashboard_{host.rsplit(':', 1)[1]}={token}"
    if origin is not None:
        headers["Origin"] = f"http://{host}" if origin == "same" else origin
    return ask(f"{base}/api/{action}", "POST", headers, json.dumps(payload).encode())


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def gated_job(server, name="gated.sh", before="", after=""):
    """A script that runs until the file gate exists in the test's directory."""
    gate = server.root / "gate"
    script = server.write_script(name, f"{before}while [ ! -e {gate} ]; do sleep 0.05; done\n"
                                       f"{after}")
    return script, gate


# --- the page, in Chromium ---------------------------------------------------------------

def test_the_page_lists_the_jobs_and_pauses_and_kills_and_retries(server, browser):
    server.ok("add_slave", "--slots", "2", "w1")
    gated, gate = gated_job(server)
    job_id = server.add_job(gated, "some-input")
    failing = server.add_job(server.write_script("failing.sh", "exit 3\n"))
    server.wait_for_counts(running=1, failed=1)
    base, token = open_dashboard(server)
    page = browser.new_page()
    page.goto(f"{base}/?token={token}")
    wait_until(lambda: page.evaluate(f"!!document.querySelector('a[href=\"/job/{job_id}\"]')"),
               what="the running job's row")
    # The token has left the address bar for a cookie that scripts cannot read.
    assert page.evaluate("location.href") == f"{base}/"
    assert page.evaluate("document.cookie") == ""
    shown = page.text()
    assert "some-input" in shown and "w1" in shown and "1/2" in shown
    assert "Running (1)" in shown and "1 failed" in shown
    assert page.evaluate("document.querySelectorAll('#charts svg').length") == 3

    assert page.click("#queue")
    wait_until(lambda: server.status()["paused"], what="the queue to pause")
    wait_until(lambda: "QUEUE PAUSED" in page.text(), what="the page to say so")
    wait_until(lambda: page.click("#queue[data-act=resume]"), what="the resume button")
    wait_until(lambda: not server.status()["paused"], what="the queue to resume")

    assert page.click("button[data-act=pause-worker]")
    wait_until(lambda: server.status()["slaves"][0]["state"] == "paused", what="w1 to pause")
    wait_until(lambda: page.click("button[data-act=resume-worker]"), what="its resume button")
    wait_until(lambda: server.status()["slaves"][0]["state"] == "active", what="w1 to resume")

    # A kill asks first; "no" leaves the job running.
    assert page.click(f"button[data-act=kill][data-id='{job_id}']")
    wait_until(lambda: page.click("button[data-act=kill-no]"), what="button[data-act=kill-no]")
    wait_until(lambda: page.click(f"button[data-act=kill][data-id='{job_id}']"),
               what="the kill button again")
    wait_until(lambda: f"kill job {job_id}?" in page.text(), what="the question")
    assert server.status()["counts"]["running"] == 1
    wait_until(lambda: page.click("button[data-act=kill-yes]"), what="button[data-act=kill-yes]")
    server.wait_for_counts(killed=1, running=0)

    wait_until(lambda: page.click(f"button[data-act=retry][data-id='{failing}']"),
               what="the failed job's retry button")
    wait_until(lambda: json.loads(server.ok("jobs", failing, "--json"))["attempt"] == 2,
               what="the failed job to run again")
    page.close()
    gate.touch()


def test_a_jobs_page_shows_its_attempts_and_follows_its_log(server, browser):
    server.ok("add_slave", "w1")
    talker, gate = gated_job(server, "talker.sh", before="echo first-line\n",
                             after="echo second-line; exit 4\n")
    job_id = server.add_job("--retries", "1", talker)
    server.wait_for_counts(running=1)
    base, token = open_dashboard(server)
    page = browser.new_page()
    page.goto(f"{base}/job/{job_id}?token={token}")
    wait_until(lambda: "first-line" in page.evaluate("document.getElementById('log') ? "
                                                     "document.getElementById('log').textContent"
                                                     " : ''"), what="the log's first line")
    assert page.evaluate("location.pathname") == f"/job/{job_id}"
    gate.touch()   # the first attempt fails, the retry too (the gate stays)
    wait_until(lambda: "(the job has ended)" in page.text(), what="the end of the job")
    log = page.evaluate("document.getElementById('log').textContent")
    assert log.count("second-line") == 2, log
    wait_until(lambda: "Attempts (2 ended)" in page.text(), what="both attempts")
    assert "exit 4" in page.text()
    page.close()


# --- the token, the cookie and the origin --------------------------------------------------

def test_without_the_token_nothing_is_served_and_nothing_changes(server):
    server.ok("add_slave", "w1")
    gated, gate = gated_job(server)
    job_id = server.add_job(gated)
    server.wait_for_counts(running=1)
    base, token = open_dashboard(server)
    for path in ("/", f"/job/{job_id}", "/events", "/metrics", "/api/jobs?state=running",
                 f"/api/job/{job_id}", f"/job/{job_id}/log", "/nothing-here"):
        status, headers, body = ask(base + path)
        assert status == 401, (path, status, body)
        assert token.encode() not in body
        status, _, body = ask(base + path, headers=bearer("not-the-token"))
        assert status == 403, (path, status, body)
        status, _, _ = ask(f"{base}{path}{'&' if '?' in path else '?'}token=wrong")
        assert status == 403, path
    for action, payload in (("pause", {}), ("kill", {"id": job_id})):
        assert post(base, action, payload)[0] == 401
        assert post(base, action, payload, token="wrong")[0] == 403
    # The real token is refused in a POST's query string: actions take the cookie only.
    assert ask(f"{base}/api/pause?token={token}", "POST",
               {"Origin": base, "Content-Type": "application/json"}, b"{}")[0] == 401
    status = server.status()
    assert not status["paused"] and status["counts"]["running"] == 1
    # With it: a page, and the cookie that replaces it.
    assert ask(f"{base}/metrics", headers=bearer(token))[0] == 200
    code, headers, _ = ask(f"{base}/?token={token}")
    assert code == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert f"={token};" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    gate.touch()


def test_a_cross_origin_post_is_refused(server):
    server.ok("add_slave", "w1")
    base, token = open_dashboard(server)
    for origin in ("http://evil.example", "null", f"{base}.evil.example", None):
        status, _, body = post(base, "pause", {}, token, origin=origin)
        assert status == 403 and b"Origin" in body, (origin, status, body)
    # A form's content type (what a page of another site could send without asking).
    assert post(base, "pause", {}, token, content_type="text/plain")[0] == 415
    assert not server.status()["paused"]
    # The same request from the page's own origin goes through.
    status, _, body = post(base, "pause", {}, token)
    assert status == 200 and json.loads(body)["ok"], body
    assert server.status()["paused"]
    # The server's checks answer as they answer the command line.
    status, _, body = post(base, "kill", {"id": 999}, token)
    assert status == 400 and "999" in json.loads(body)["error"]
    status, _, body = post(base, "pause", {"worker": "nosuch"}, token)
    assert status == 400 and "nosuch" in json.loads(body)["error"]


def test_the_token_file_is_owner_only_and_stop_turns_it_off(server):
    base, token = open_dashboard(server)
    token_file = server.data_dir / "dashboard.token"
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    dashboard = server.status()["dashboard"]
    assert dashboard["on"] and dashboard["running"] and dashboard["url"] == f"{base}/"
    assert token not in json.dumps(server.status()) and token not in server.ok("status")
    assert f"dashboard on {base}/" in server.ok("status")
    assert token not in (server.log_dir / "server.log").read_text()
    assert server.ok("dashboard", "--stop").strip() == "dashboard stopped; its token is deleted"
    assert not token_file.exists() and server.status()["dashboard"] == {"on": False}
    with pytest.raises(OSError):
        ask(f"{base}/")
    assert server.ok("dashboard", "--stop").strip() == "the dashboard was not on"
    # Turned on again: a new token; the old one opens nothing.
    new_base, new_token = open_dashboard(server)
    assert new_token != token
    assert ask(f"{new_base}/metrics", headers=bearer(token))[0] == 403


def test_a_port_taken_fails_with_one_line_and_changes_nothing(server):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        stderr = server.fails("dashboard", "--listen", f"127.0.0.1:{port}",
                              expect=f"cannot listen on 127.0.0.1:{port}")
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert server.status()["dashboard"] == {"on": False}
        assert not (server.data_dir / "dashboard.token").exists()
        # On, then asked to move there: it stays where it was.
        base, token = open_dashboard(server)
        server.fails("dashboard", "--listen", f"127.0.0.1:{port}", expect="cannot listen")
        assert server.status()["dashboard"]["url"] == f"{base}/"
        assert ask(f"{base}/metrics", headers=bearer(token))[0] == 200
    finally:
        taken.close()


@pytest.mark.parametrize("listen, expect", [
    ("nowhere", "is not HOST:PORT"), ("127.0.0.1:70000", "is not HOST:PORT"),
    ("example.com:8750", "is not an IP address"), ("127.0.0.1:x", "is not HOST:PORT")])
def test_bad_listen_addresses_are_refused_with_one_line(server, listen, expect):
    stderr = server.fails("dashboard", "--listen", listen, expect=expect)
    assert len(stderr.strip().splitlines()) == 1
    assert server.status()["dashboard"] == {"on": False}


def test_listening_beyond_loopback_warns(server):
    result = server.run("dashboard", "--listen", "0.0.0.0:0")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("Warning: the dashboard listens on 0.0.0.0:")
    assert "?token=" in result.stdout


def test_the_dashboard_comes_back_after_a_restart_and_after_its_helper_dies(server):
    base, token = open_dashboard(server)
    server.ok("stop")
    with pytest.raises(OSError):
        ask(f"{base}/")
    server.ok("start")
    # The same address and token: an open page reconnects by itself.
    wait_until(lambda: server.status()["dashboard"]["running"], what="the dashboard")
    assert server.status()["dashboard"]["url"] == f"{base}/"
    assert ask(f"{base}/metrics", headers=bearer(token))[0] == 200
    helper = server.status()["dashboard"]["pid"]
    os.kill(helper, signal.SIGKILL)
    wait_until(lambda: server.status()["dashboard"]["pid"] not in (None, helper),
               what="a new web server")
    assert ask(f"{base}/metrics", headers=bearer(token))[0] == 200
    log = (server.log_dir / "server.log").read_text()
    assert "the dashboard's web server stopped" in log and "a new web server starts in" in log


def test_a_server_killed_takes_its_web_server_with_it(server):
    base, token = open_dashboard(server)
    helper = server.status()["dashboard"]["pid"]
    os.kill(server.server_pid(), signal.SIGKILL)
    # Its stdin was the server's pipe: EOF ends it, and the port is free again.
    wait_until(lambda: not process_alive(helper), timeout=10, what="the web server to end")
    server.ok("start")
    wait_until(lambda: server.status()["dashboard"]["running"], what="the dashboard")
    assert ask(f"{base}/metrics", headers=bearer(token))[0] == 200


# --- data ----------------------------------------------------------------------------------

def test_metrics_parse_as_prometheus_text(server):
    server.ok("add_slave", "--slots", "3", "--gpus", "4", "--mem", "1G", "w1")
    server.add_job("--gpus", "0.5", server.write_script("gated.sh", "sleep 30\n"))
    server.add_job(server.script)
    server.add_job(server.script)
    server.add_job(server.write_script("failing.sh", "exit 3\n"))
    server.wait_for_counts(succeeded=2, failed=1, running=1)
    base, token = open_dashboard(server)
    status, headers, body = ask(f"{base}/metrics", headers=bearer(token))
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}

    def value(name, **labels):
        return next(sample.value for family in families.values() for sample in family.samples
                    if sample.name == name and sample.labels == labels)
    assert families["cli_py_jobs"].type == "gauge"
    assert value("cli_py_jobs", state="succeeded") == 2 and value("cli_py_jobs", state="failed") == 1
    assert value("cli_py_jobs", state="waiting") == 0
    assert families["cli_py_job_starts"].type == "counter"
    assert value("cli_py_job_starts_total") == 4 and value("cli_py_job_ends_total") == 3
    assert value("cli_py_worker_resource", worker="w1", resource="gpus") == 4
    assert value("cli_py_worker_resource_used", worker="w1", resource="gpus") == 0.5
    assert value("cli_py_worker_resource", worker="w1", resource="mem") == 1 << 30
    assert value("cli_py_workers", state="active", health="up") == 1
    assert value("cli_py_slots") == 3 and value("cli_py_worker_slots", worker="w1") == 3
    for name in ("cli_py_queue_wait_seconds", "cli_py_scheduling_latency_seconds"):
        assert families[name].type == "histogram"
        buckets = [sample for sample in families[name].samples if sample.name.endswith("_bucket")]
        counts = [sample.value for sample in buckets]
        assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
        assert value(f"{name}_count") == counts[-1] >= 1
    assert value("cli_py_queue_wait_seconds_count") == 4   # one wait per start
    # --metrics-open: /metrics for anyone, nothing else.
    server.ok("dashboard", "--listen", urllib.parse.urlsplit(base).netloc, "--metrics-open")
    assert ask(f"{base}/metrics")[0] == 200
    assert ask(f"{base}/")[0] == 401 and ask(f"{base}/events")[0] == 401


def test_lists_are_paged_through_the_jobs_request(server, browser):
    server.ok("pause")
    server.ok("add_job", "--array", "1-250", server.script)
    base, token = open_dashboard(server)
    status, _, body = ask(f"{base}/events", headers=bearer(token))
    snapshot = json.loads(body.split(b"event: live\ndata: ", 1)[1].split(b"\n", 1)[0])
    assert snapshot["counts"]["waiting"] == 250 and len(snapshot["waiting"]) == 100
    assert "envs" not in snapshot["waiting"][0]

    def page(offset, last=100):
        status, _, body = ask(f"{base}/api/jobs?state=waiting&last={last}&offset={offset}",
                              headers=bearer(token))
        assert status == 200, body
        return [job["id"] for job in json.loads(body)["result"]]
    assert page(0) == list(range(151, 251))
    assert page(200) == list(range(1, 51))
    assert page(100, 50) == list(range(101, 151))
    status, _, body = ask(f"{base}/api/jobs?state=nonsense", headers=bearer(token))
    assert status == 400 and "unknown state" in json.loads(body)["error"]
    # The page: 25 rows a list; pages 1 to 4 are the snapshot's, the 5th is asked for.
    page = browser.new_page()
    page.goto(f"{base}/?token={token}")
    wait_until(lambda: "Waiting (250) < page 1 of 10 >" in page.text(), what="the pager")
    for number in range(2, 6):
        assert page.click("#waiting button[data-step='1']")
        wait_until(lambda: f"page {number} of 10" in page.text(), what=f"page {number}")
    wait_until(lambda: page.evaluate("!!document.querySelector('a[href=\"/job/101\"]')"),
               what="jobs 101-125")
    shown = page.evaluate("[...document.querySelectorAll('#waiting a')].map(a => +a.textContent)")
    assert shown == list(range(101, 126))
    page.close()


def test_a_service_is_scaled_from_the_dashboard(server):
    server.ok("add_slave", "--slots", "3", "w1")
    sleeper = server.write_script("serve.sh", "exec sleep 300\n")
    server.ok("add_service", "web", "--replicas", "1", "--", sleeper)
    base, token = open_dashboard(server)
    status, _, body = post(base, "scale", {"service": "web", "replicas": 2}, token)
    assert status == 200, body
    wait_until(lambda: server.status()["counts"]["running"] == 2, what="two replicas")
    status, _, body = post(base, "scale", {"service": "web", "replicas": -1}, token)
    assert status == 400 and "replicas" in json.loads(body)["error"]
    server.ok("remove_service", "--grace", "0", "web")
