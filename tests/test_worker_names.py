"""Every form of worker name that add_slave takes works in the job's ssh, rsync and scp
as example_job.sh writes them: host:port, user@host:port, IPv6 ([::1], [::1]:port, bare
::1) and ssh aliases, through real sshd workers listening on 127.0.0.1 and ::1."""
import json
import re
import socket

import pytest

from conftest import CLI, wait_until


def loopback_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def w6(ssh_sandbox):
    """A worker on 127.0.0.1 and ::1; the ssh config gives ::1 its port, as a user whose
    sshd listens on a non-default port would."""
    worker = ssh_sandbox.start_worker("w6", ipv6=True)
    ssh_sandbox.add_config(f"Match host ::1\n  Port {worker.port}\n")
    return worker


@pytest.fixture(scope="module", autouse=True)
def loopback_settings(ssh_sandbox):
    """What a user's ssh config says for hosts reached by address: the sandbox's key and
    known_hosts (the aliases of the jobs' ssh config are cli.py-...)."""
    ssh_sandbox.add_config("Host 127.0.0.1 ::1 [::1] cli.py-*\n" + ssh_sandbox.host_settings())


def forms(workers, w6, user):
    names = [f"{user}@127.0.0.1:{workers[0].port}", f"127.0.0.1:{workers[1].port}", "w3"]
    if loopback_ipv6():   # (where the machine has ::1)
        names += ["[::1]", f"[::1]:{w6.port}", "::1", f"{user}@[::1]"]
    return names


def test_each_form_of_worker_name_runs_example_job_end_to_end(example_job_dirs, server,
                                                               workers, w6, ssh_sandbox):
    names = forms(workers, w6, ssh_sandbox.user)
    out = server.ok("add_slave", *names)    # with the SSH check
    assert out.count("added ") == len(names)
    slaves = {slave["ip"]: slave for slave in server.status()["slaves"]}
    assert list(slaves) == names
    example = CLI.parent / "example_job.sh"
    ids = {}
    for index, name in enumerate(names):
        data = server.root / f"input {index}.txt"
        data.write_text(f"hello from {name}\n")
        ids[name] = server.add_job("--on", name, example, data.name)
    server.ok("wait", "-q", *ids.values())
    for index, name in enumerate(names):
        result = server.root / "results" / f"input {index}.txt.out"
        assert result.read_text() == f"HELLO FROM {name.upper()}\n", name
        job = json.loads(server.ok("jobs", ids[name], "--json"))
        assert job["worker"] == name and job["result"] == "succeeded"


def test_jobs_get_where_ssh_goes_as_slave_host_port_and_user(server, workers, w6, ssh_sandbox):
    user = ssh_sandbox.user
    expected = {f"{user}@127.0.0.1:{workers[0].port}": ("127.0.0.1", workers[0].port),
                "w2": ("127.0.0.1", workers[1].port)}
    if loopback_ipv6():
        expected["::1"] = ("::1", w6.port)
    server.ok("add_slave", *expected)
    for name, (host, port) in expected.items():
        job_id = server.add_job("--on", name, server.script)
        server.ok("wait", "-q", job_id)
        env = server.record(job_id)["env"]
        assert (env["SLAVE_HOST"], env["SLAVE_PORT"], env["SLAVE_USER"]) == \
            (host, str(port), user), name
    server.fails("add_job", "-e", "SLAVE_PORT=1", server.script, expect="cannot be overridden")


def test_many_hosts_added_without_the_check_are_resolved_by_the_server(server, workers):
    """Beyond 16 hosts add_slave --skip_ssh_auth_check leaves `ssh -G` to the server's
    health checker: the alias w1 gets its HostName and Port from the ssh config."""
    server.ok("add_slave", "--skip_ssh_auth_check", "w1", "node[01-20]")

    def w1_endpoint():
        slaves = {slave["ip"]: slave for slave in server.status()["slaves"]}
        endpoint = slaves["w1"]["endpoint"]
        return endpoint if endpoint["host"] != "w1" else None
    endpoint = wait_until(w1_endpoint, what="w1 to be resolved")
    assert (endpoint["host"], endpoint["port"]) == ("127.0.0.1", workers[0].port)
    job_id = server.add_job("--on", "w1", server.script)
    server.ok("wait", "-q", job_id)
    assert server.record(job_id)["env"]["SLAVE_PORT"] == str(workers[0].port)


def test_an_alias_with_a_port_is_refused_with_what_to_write(server, workers):
    server.fails("add_slave", "w1:2222", expect="set Port 2222 in its Host entry and add it "
                                                "as w1")
    server.fails("add_slave", "--skip_ssh_auth_check", "w1:2222", expect="alias")
    assert server.status()["slaves"] == []


@pytest.mark.parametrize("name, message", [
    ("node:ssh", "invalid port"),
    ("node:0", "invalid port"),
    ("[node]:22", "IPv6"),
    ("[::1", "IPv6"),
    ("node:22:", "not an IPv6 address"),
])
def test_names_ssh_could_not_take_are_refused(server, name, message):
    server.fails("add_slave", "--skip_ssh_auth_check", name, expect=message)
    assert server.status()["slaves"] == []


def test_two_names_that_would_reach_jobs_as_one_alias_are_refused(server):
    server.ok("add_slave", "--skip_ssh_auth_check", "[fe80::1%eth0]:22")
    server.fails("add_slave", "--skip_ssh_auth_check", "fe80--1-eth0:22",
                 expect="give it a Host alias")
    assert [slave["ip"] for slave in server.status()["slaves"]] == ["[fe80::1%eth0]:22"]


# --- host lists as clusters write them --------------------------------------------

def test_host_ranges_expand_as_slurm_and_pdsh_write_them():
    import cli
    assert cli.expand_hosts(["node[01-03]", "gpu[1-2,7]", "rack[1-2]-n[8-10]"]) == [
        "node01", "node02", "node03", "gpu1", "gpu2", "gpu7",
        "rack1-n8", "rack1-n9", "rack1-n10", "rack2-n8", "rack2-n9", "rack2-n10"]
    assert cli.expand_hosts(["node[001-500]"])[-1] == "node500"
    # IPv6 brackets are not ranges.
    assert cli.expand_hosts(["[::1]", "[::1]:2222", "::1", "u@h[1-2]"]) == \
        ["[::1]", "[::1]:2222", "::1", "u@h1", "u@h2"]
    assert cli.split_host_list("a,node[1,3],[::1]:22") == ["a", "node[1,3]", "[::1]:22"]


@pytest.mark.parametrize("word,message", [
    ("node[3-1]", "malformed host range [3-1]"), ("node[1-]", "malformed host range"),
    ("node[1,,3]", "malformed host range [1,,3]"),
    ("node[1-3", "unbalanced brackets"), ("n[1-200000]", "more than 100000 hosts")])
def test_a_malformed_host_range_is_one_clear_error(word, message):
    import cli
    with pytest.raises(cli.UserError, match=re.escape(message)):
        cli.expand_hosts([word])


def test_host_ranges_work_wherever_workers_are_named(server):
    server.ok("add_slave", "--skip_ssh_auth_check", "--slots", "2", "node[001-300]", "w[1-2]")
    names = [slave["ip"] for slave in server.status()["slaves"]]
    assert len(names) == 302 and names[:2] == ["node001", "node002"] and "w2" in names
    server.fails("add_slave", "--skip_ssh_auth_check", "node[5-3]", expect="low first")
    assert len(server.status()["slaves"]) == 302   # nothing added
    server.ok("remove_slave", "node[001-300]")
    assert [slave["ip"] for slave in server.status()["slaves"]] == ["w1", "w2"]
    out = server.ok("pause", "w[1-2]")
    assert "paused w1, w2" in out and "resume 'w[1-2]'" in out
    assert {slave["state"] for slave in server.status()["slaves"]} == {"paused"}
    server.ok("resume", "w[1-2]")
    out = server.ok("edit_slave", "w[1-2]", "--slots", "3")
    assert out.count(": 3 slot(s)") == 2
    server.fails("edit_slave", "w[1-3]", "--slots", "2", expect="unknown worker 'w3'")
    assert {slave["slots"] for slave in server.status()["slaves"]} == {3}   # all or none
    job = server.add_job("--on", "w[2-2],w1", "--exclude", "w[1]", server.script)
    server.wait_for_counts(succeeded=1)
    assert server.record(job)["slave"] == "w2"


def test_a_hosts_file_gives_workers_and_their_own_slots(server):
    hosts = server.root / "cluster.txt"
    hosts.write_text("# the rack\nnode[1-3]   # three\n\n8/big1\n  2/gpu[7,9]\n")
    server.ok("add_slave", "--skip_ssh_auth_check", "--slots", "4", "--hosts-file", hosts,
              "w1")
    slots = {slave["ip"]: slave["slots"] for slave in server.status()["slaves"]}
    assert slots == {"w1": 4, "node1": 4, "node2": 4, "node3": 4, "big1": 8, "gpu7": 2,
                     "gpu9": 2}
    result = server.run("add_slave", "--skip_ssh_auth_check", "--hosts-file", "-",
                        input="more[1-2]\n")
    assert result.returncode == 0 and "added more2 (1 slot)" in result.stdout
    for text, message in (("x/node9\n", "write SLOTS/HOST"), ("n[2-1]\n", ":1: malformed"),
                          ("# nothing\n", "names no host"), ("w1\nw1\n", "named twice")):
        hosts.write_text(text)
        server.fails("add_slave", "--skip_ssh_auth_check", "--hosts-file", hosts,
                     expect=message)
    assert len(server.status()["slaves"]) == 9   # nothing added by the refused files
    server.fails("add_slave", "--skip_ssh_auth_check", expect="--hosts-file FILE")
