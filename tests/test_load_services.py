"""load_services: a JSON document of every service; loading it adds, changes and
removes services to match, all or nothing, and loading it again changes nothing.
load_status recreates the services of a status --json document."""
import json

from conftest import Cli, wait_until

READ_ONLY = ("running", "healthy", "restarts", "last_end", "instances")


def services(cli):
    return json.loads(cli.ok("services", "--json"))


def specs(cli):
    """The services as a document gives them: without what they are doing now."""
    return [{key: value for key, value in service.items() if key not in READ_ONLY}
            for service in services(cli)]


def live(cli):
    """{service: {replica: job id}} of the replicas running now."""
    return {service["name"]: {instance["replica"]: instance["job"]
                              for instance in service["instances"]
                              if instance["state"] == "running"}
            for service in services(cli)}


def all_running(cli, wanted):
    """WANTED ({service: replicas}) are all running: their job ids then."""
    now = live(cli)
    return now if {name: len(replicas) for name, replicas in now.items()} == wanted else None


def replica_scripts(cli):
    """Two replica scripts (the second to change a service's script) that record
    "REPLICA PORT SERVICE" in pids/JOB_ID and run for good."""
    pids = cli.root / "pids"
    pids.mkdir(exist_ok=True)
    body = f'echo "$REPLICA $PORT $SERVICE" > {pids}/$JOB_ID\nexec sleep 300\n'
    return cli.write_script("replica.sh", body), cli.write_script("other.sh", body), pids


def load(cli, document, *flags):
    """load_services of DOCUMENT (written to a file); its lines."""
    path = cli.root / "services.json"
    path.write_text(json.dumps(document))
    return cli.ok("load_services", *flags, path).splitlines()


def job(cli, job_id):
    return json.loads(cli.ok("jobs", job_id, "--json"))


def test_a_document_of_two_services_starts_both_and_loads_again_as_no_change(server):
    server.ok("add_slave", "--slots", 2, "w1", "w2")
    replica, _, pids = replica_scripts(server)
    document = [{"name": "web", "script": "replica.sh", "replicas": 2, "port": 8100,
                 "envs": {"MODE": "test"}},
                {"name": "pool", "script": str(replica), "on": ["w2"]}]
    assert load(server, document) == ["added web (2 replicas)", "added pool (1 replica)"]
    running = wait_until(lambda: all_running(server, {"web": 2, "pool": 1}),
                         what="both services to run")
    for job_id in running["web"].values():
        wait_until(lambda: (pids / str(job_id)).exists(), what="the replica to record")
    assert sorted((pids / str(job_id)).read_text().split()
                  for job_id in running["web"].values()) == \
        [["0", "8100", "web"], ["1", "8101", "web"]]
    assert job(server, running["pool"][0])["worker"] == "w2"
    assert job(server, running["web"][0])["envs"]["MODE"] == "test"
    assert job(server, running["web"][0])["script"] == str(replica)   # found as add_service does
    counts = server.status()["counts"]
    assert load(server, document) == ["no change"]
    assert live(server) == running and server.status()["counts"] == counts


def test_edits_scale_replace_and_remove_services(server):
    server.ok("add_slave", "--slots", 3, "w1", "w2")
    replica, other, pids = replica_scripts(server)
    web = {"name": "web", "script": str(replica), "replicas": 2, "port": 8100}
    pool = {"name": "pool", "script": str(replica), "replicas": 1}
    load(server, [web, pool])
    before = wait_until(lambda: all_running(server, {"web": 2, "pool": 1}),
                        what="both services to run")

    pool["replicas"] = 3
    assert load(server, [web, pool]) == ["scaled pool 1 -> 3"]
    scaled = wait_until(lambda: all_running(server, {"web": 2, "pool": 3}), what="3 of pool")
    assert scaled["web"] == before["web"] and scaled["pool"][0] == before["pool"][0]

    web.update(script=str(other), port=9100)
    assert load(server, [web, pool], "--grace", "1s") == \
        ["changed web: script, port (its replicas restart)"]
    for job_id in before["web"].values():
        assert job(server, job_id)["result"] == "killed"   # ended before load_services returned
    changed = wait_until(lambda: all_running(server, {"web": 2, "pool": 3}),
                         what="web to restart")
    assert not set(changed["web"].values()) & set(before["web"].values())
    assert changed["pool"] == scaled["pool"]   # the other service is left alone
    for job_id in changed["web"].values():
        wait_until(lambda: (pids / str(job_id)).exists(), what="the new replica to record")
        assert job(server, job_id)["script"] == str(other)
    assert sorted((pids / str(job_id)).read_text().split()
                  for job_id in changed["web"].values()) == \
        [["0", "9100", "web"], ["1", "9101", "web"]]

    web["replicas"], web["enabled"] = 1, False
    assert load(server, [web], "--grace", "0") == ["scaled web 2 -> 1", "stopped web",
                                                   "removed pool"]
    assert live(server) == {"web": {}}
    for job_id in list(changed["web"].values()) + list(scaled["pool"].values()):
        assert job(server, job_id)["result"] == "killed"
    assert load(server, [dict(web, enabled=True)]) == ["started web"]
    wait_until(lambda: all_running(server, {"web": 1}), what="web to start again")


def test_what_services_json_prints_loads_back_as_no_change(server):
    server.ok("add_slave", "w1", "w2", "w3")
    replica, _, _ = replica_scripts(server)
    server.ok("add_service", "web", "--replicas", 2, "--port", 8200, "-e", "A=1", "--on",
              "w1,w2", "--prefer", "w2", "--health-cmd", "true", "--health-interval", "1m",
              "--", replica, "serve", "two words")
    server.ok("add_service", "quiet", "--exclude", "w1,w2", "--no-ssh-reuse", "--", replica)
    server.ok("stop_service", "quiet")
    load(server, [*specs(server), {"name": "checked", "script": str(replica), "port": 8300,
                                   "health": {"tcp": True}, "enabled": False}])
    wait_until(lambda: all_running(server, {"web": 2, "quiet": 0, "checked": 0}),
               what="web to run")
    running = live(server)
    saved = server.root / "saved.json"
    saved.write_text(server.ok("services", "--json"))
    assert server.ok("load_services", saved).splitlines() == ["no change"]
    elsewhere = server.root / "elsewhere"   # cwd is in the document: the client's does not count
    elsewhere.mkdir()
    assert server.ok("load_services", "-", input=saved.read_text(),
                     cwd=elsewhere).splitlines() == ["no change"]
    status = server.root / "status.json"   # a status document holds them too
    status.write_text(server.ok("status", "--json"))
    assert server.ok("load_services", status).splitlines() == ["no change"]
    assert live(server) == running


def test_a_bad_document_is_one_error_line_and_changes_nothing(server):
    server.ok("add_slave", "w1", "w2")
    replica, _, _ = replica_scripts(server)
    good = {"name": "web", "script": str(replica), "port": 8100}
    load(server, [good, dict(good, name="pool", port=None)])
    running = wait_until(lambda: all_running(server, {"web": 1, "pool": 1}),
                         what="the services to run")
    before = specs(server)
    bad_documents = [
        ("[{\"name\": \"web\",", "is not valid JSON"),
        ({"servicez": []}, "not a services document"),
        ([good, {"name": "new", "script": str(replica), "replica": 2}],
         "services[1] (new): unknown field 'replica'"),
        ([good, dict(good, port=9000)], "services[1] (web): service web is listed twice"),
        ([dict(good, port=70000)], "services[0] (web): 'port' must be a port number"),
        ([dict(good, port=65535, replicas=2)], "services[0] (web): --port 65535 with 2 "
                                               "replicas runs past port 65535"),
        ([good, {"name": "new", "script": str(replica), "on": ["w1", "nowhere"]}],
         "services[1] (new): unknown worker 'nowhere' in --on"),
        ([dict(good, replicas=3)], "services[0] (web): 3 replicas of 1 slot each do not fit"),
        ([good, {"name": "new", "script": "./missing.sh"}],
         "services[1] (new): no such script: ./missing.sh"),
        ([good, {"name": "bad name", "script": str(replica)}], "is not a service name"),
        ([{"name": "web", "script": str(replica), "envs": {"PORT": "1"}, "port": 8100}],
         "services[0] (web): -e PORT: the service sets"),
        ([{"name": "web"}], "services[0] (web): 'script' must be the path"),
        ([dict(good, health={"tcp": True, "interval": 0})], "'health' must be null"),
    ]
    path = server.root / "bad.json"
    for document, message in bad_documents:
        path.write_text(document if isinstance(document, str) else json.dumps(document))
        stderr = server.fails("load_services", path, expect=message)
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert specs(server) == before and live(server) == running, message


def test_load_status_recreates_the_services_in_a_fresh_data_dir(server, ssh_sandbox, tmp_path):
    server.ok("add_slave", "--slots", 2, "w1", "w2")
    replica, _, pids = replica_scripts(server)
    load(server, [{"name": "web", "script": str(replica), "replicas": 2, "port": 8100,
                   "on": ["w1"], "envs": {"MODE": "saved"}},
                  {"name": "off", "script": str(replica), "enabled": False}])
    wait_until(lambda: all_running(server, {"web": 2, "off": 0}), what="web to run")
    saved = tmp_path / "status.json"
    saved.write_text(server.ok("status", "--json"))
    wanted = specs(server)
    server.ok("stop")   # the replicas keep running, under the old data dir

    (tmp_path / "fresh").mkdir()
    fresh = Cli(tmp_path / "fresh", ssh_sandbox.env())
    try:
        fresh.ok("start")
        loaded = fresh.run("load_status", saved)
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.splitlines() == ["loaded 2 worker(s) and 0 waiting job(s)",
                                              "added off (1 replica, stopped)",
                                              "added web (2 replicas)"]   # by name
        assert specs(fresh) == wanted
        running = wait_until(lambda: all_running(fresh, {"web": 2, "off": 0}),
                             what="web to run in the fresh data dir")
        assert fresh.status()["counts"]["running"] == 2   # only the replicas the services started
        for job_id in running["web"].values():
            assert job(fresh, job_id)["worker"] == "w1"
            assert job(fresh, job_id)["envs"]["MODE"] == "saved"
        assert fresh.ok("load_status", saved).splitlines() == \
            ["loaded 2 worker(s) and 0 waiting job(s)"]
        assert live(fresh) == running
    finally:
        fresh.run("stop")
        fresh.end_leftover_jobs()


def test_load_status_checks_the_services_against_the_documents_workers(server, tmp_path):
    server.ok("add_slave", "w1", "w2")
    replica, _, _ = replica_scripts(server)
    server.ok("add_service", "web", "--on", "w2", "--", replica)
    running = wait_until(lambda: all_running(server, {"web": 1}), what="web to run")
    document = server.status()
    w1 = next(slave for slave in document["slaves"] if slave["ip"] == "w1")
    document["slaves"] = [w1]
    document["services"][0]["port"] = 8100
    path = tmp_path / "status.json"
    path.write_text(json.dumps(document))
    # Without w2 (busy: it would drain) the changed service could run nowhere.
    server.fails("load_status", path, expect="services[0] (web): every worker in --on is "
                                             "excluded or being removed")
    assert [slave["ip"] for slave in server.status()["slaves"]] == ["w1", "w2"]
    assert live(server) == running and services(server)[0]["port"] is None
    # w3 is not registered yet, but the document brings it.
    document["slaves"].append(dict(w1, ip="w3"))
    document["services"][0]["on"] = ["w3"]
    path.write_text(json.dumps(document))
    assert server.ok("load_status", path).splitlines() == \
        ["loaded 2 worker(s) and 0 waiting job(s)", "changed web: port, on (its replicas restart)"]
    assert job(server, running["web"][0])["result"] == "killed"
    moved = wait_until(lambda: all_running(server, {"web": 1}), what="web to start on w3")
    assert job(server, moved["web"][0])["worker"] == "w3"
    wait_until(lambda: [slave["ip"] for slave in server.status()["slaves"]] == ["w1", "w3"],
               what="w2 to go once its replica ended")
