"""One SSH configuration for the add-time check, the health checks and the jobs:
start --ssh-config, ProxyJump and ProxyCommand workers, and host keys checked as
OpenSSH checks them, all through real sshd workers."""
import json
import subprocess

import pytest

from conftest import wait_until


def slaves(cli):
    return {slave["ip"]: slave for slave in cli.status()["slaves"]}


def checked_after(cli, name, moment):
    """The worker's status once a health check newer than MOMENT has run."""
    def newer():
        slave = slaves(cli)[name]
        return slave if slave["checked_at"] and slave["checked_at"] > moment else None
    return wait_until(newer, timeout=30, what=f"a new health check of {name}")


def without_config_variable(cli):
    env = dict(cli.env)
    env.pop("CLI_PY_SSH_CONFIG")
    return env


REACH = """set -e
ssh "$SLAVE_IP" "echo reached \\$(hostname)"
"""


def test_the_queues_ssh_config_serves_checks_health_checks_and_jobs(cli, ssh_sandbox, workers):
    # rwport exists only in queue.conf (through an Include): nothing else knows it.
    hosts = cli.root / "hosts.conf"
    hosts.write_text(f"Host rwport\n  HostName 127.0.0.1\n  Port {workers[1].port}\n"
                     + ssh_sandbox.host_settings())
    queue_config = cli.root / "queue.conf"
    queue_config.write_text(f"Include {hosts}\nInclude {ssh_sandbox.config}\n")
    env = without_config_variable(cli)
    cli.ok("start", "--ssh-config", queue_config, "--check-interval", "1s", env=env)
    cli.ok("add_slave", "rwport", env=env)
    assert checked_after(cli, "rwport", "")["health"] == "up"
    script = cli.write_script("reach.sh", REACH)
    job_id = cli.add_job("--on", "rwport", script, env=env)
    cli.ok("wait", "-q", job_id, env=env)
    assert (cli.log_dir / f"job_{job_id}.txt").read_text().startswith("reached ")

    # Remembered across restarts.
    cli.ok("stop", env=env)
    cli.ok("start", "--check-interval", "1s", env=env)
    moment = slaves(cli)["rwport"]["checked_at"] or ""
    assert checked_after(cli, "rwport", moment)["health"] == "up"
    job_id = cli.add_job("--on", "rwport", script, env=env)
    cli.ok("wait", "-q", job_id, env=env)


def test_cli_py_ssh_config_must_name_the_servers_config(server, tmp_path):
    other = tmp_path / "other.conf"
    other.write_text("Host rwport\n  Port 1\n")
    env = dict(server.env, CLI_PY_SSH_CONFIG=str(other))
    server.fails("add_slave", "w1", env=env, expect="start --ssh-config")
    assert slaves(server) == {}


@pytest.mark.parametrize("text, message", [
    (None, "cannot read it"),
    ("Hots w1\n", "Bad configuration option"),
    ("Include /nonexistent/*.conf\nHost x\n  Port notaport\n", "line 3: Bad port"),
])
def test_a_bad_ssh_config_is_refused_at_start(cli, text, message):
    path = cli.root / "bad.conf"
    if text is not None:
        path.write_text(text)
    cli.fails("start", "--ssh-config", path, env=without_config_variable(cli), expect=message)
    assert cli.server_pid() is None


@pytest.fixture(scope="module")
def proxied(ssh_sandbox, workers):
    """rwjump and rwproxy reach w3's sshd through w1, as ProxyJump and ProxyCommand."""
    target = workers[2].port
    ssh_sandbox.add_config(
        f"Host rwjump\n  HostName 127.0.0.1\n  Port {target}\n  ProxyJump w1\n"
        + ssh_sandbox.host_settings()
        + f"Host rwproxy\n  HostName 127.0.0.1\n  Port {target}\n"
          f"  ProxyCommand ssh -W %h:%p w1\n" + ssh_sandbox.host_settings())
    return ["rwjump", "rwproxy"]


def test_proxyjump_and_proxycommand_workers_are_checked_and_run_jobs(cli, workers, proxied):
    cli.ok("start", "--check-interval", "1s")
    through = workers[0].connections()
    cli.ok("add_slave", *proxied)
    assert workers[0].connections() - through >= 2    # both went through w1
    for name in proxied:
        slave = checked_after(cli, name, "")
        assert slave["health"] == "up" and slave["check_reason"] is None, slave
        later = checked_after(cli, name, slave["checked_at"])
        assert later["health"] == "up"
    script = cli.write_script("reach.sh", REACH)
    ids = [cli.add_job("--on", name, script) for name in proxied]
    cli.ok("wait", "-q", *ids)


@pytest.fixture
def rekeyed(ssh_sandbox):
    """A worker of its own, whose host key the test changes."""
    worker = ssh_sandbox.start_worker(f"wk{len(ssh_sandbox._workers)}")
    return worker


def test_a_changed_host_key_is_named_and_keeps_the_worker_down_until_fixed(cli, ssh_sandbox,
                                                                          rekeyed):
    name = rekeyed.alias
    cli.ok("start", "--check-interval", "1s")
    cli.ok("add_slave", name)
    before = checked_after(cli, name, "")
    assert before["health"] == "up"
    rekeyed.new_host_key()
    slave = wait_until(lambda: slaves(cli)[name]["health"] == "down" and slaves(cli)[name],
                       timeout=30, what="the worker to go down")
    reason = slave["check_reason"]
    lookup = f"[127.0.0.1]:{rekeyed.port}"
    assert f"host key of {name} changed" in reason, reason
    assert f"ssh-keygen -R '{lookup}' -f {ssh_sandbox.known_hosts}" in reason, reason
    job_id = cli.add_job("--on", name, cli.script)
    assert json.loads(cli.ok("jobs", job_id, "--json"))["state"] == "waiting"
    # A new add of the same host says so too, and adds nothing.
    ssh_sandbox.add_alias(f"{name}-again", "127.0.0.1", rekeyed.port)
    cli.fails("add_slave", f"{name}-again", expect="changed")
    assert f"{name}-again" not in slaves(cli)

    subprocess.run(["ssh-keygen", "-R", lookup, "-f", str(ssh_sandbox.known_hosts)],
                   check=True, capture_output=True)
    ssh_sandbox.trust(rekeyed, "127.0.0.1")
    wait_until(lambda: slaves(cli)[name]["health"] == "up", timeout=30,
               what="the worker to come back")
    cli.ok("wait", "-q", job_id)


def test_unknown_host_keys_follow_stricthostkeychecking_and_hashed_entries_count(
        server, ssh_sandbox, workers, tmp_path):
    port = workers[1].port
    hashed = tmp_path / "hashed_known_hosts"
    hashed.write_text(ssh_sandbox.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert "127.0.0.1" not in hashed.read_text()
    settings = ssh_sandbox.host_settings()
    ssh_sandbox.add_config(
        f"Host rwunknown rwnew\n  HostName 127.0.0.1\n  Port {port}\n"
        f"  HostKeyAlias never-seen-{port}\n"
        + "Host rwnew\n  StrictHostKeyChecking accept-new\n"
        + f"Host rwhashed\n  HostName 127.0.0.1\n  Port {port}\n"
          f"  UserKnownHostsFile {hashed}\n" + settings
        + "Host rwunknown rwnew\n" + settings)
    server.fails("add_slave", "rwunknown", expect=f"host key of never-seen-{port} is not known")
    server.ok("add_slave", "rwnew", "rwhashed")
    assert set(slaves(server)) == {"rwnew", "rwhashed"}


def test_a_known_hosts_file_with_lines_ssh_would_skip_is_read_as_ssh_reads_it(
        server, ssh_sandbox, workers, tmp_path):
    """A truncated key, bytes that are not UTF-8, a marker line: ssh skips them, and so
    must the check, not crash on them."""
    messy = tmp_path / "messy_known_hosts"
    messy.write_bytes(b"node1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOM\n"
                      b"# caf\xe9 \xff\xfe\n"
                      b"@cert-authority *.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA\n"
                      + ssh_sandbox.known_hosts.read_bytes())
    ssh_sandbox.add_config(f"Host rwmessy\n  HostName 127.0.0.1\n  Port {workers[0].port}\n"
                           f"  UserKnownHostsFile {messy}\n" + ssh_sandbox.host_settings())
    assert "added rwmessy" in server.ok("add_slave", "rwmessy")


def test_tokens_in_identityfile_are_expanded_as_ssh_expands_them(server, ssh_sandbox, workers,
                                                                 tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "id_127.0.0.1").write_bytes(ssh_sandbox.client_key.read_bytes())
    (keys / "id_127.0.0.1").chmod(0o600)
    ssh_sandbox.add_config(
        f"Host rwtoken\n  HostName 127.0.0.1\n  Port {workers[1].port}\n"
        f"  IdentityFile {keys}/id_%h\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {ssh_sandbox.known_hosts}\n  StrictHostKeyChecking yes\n")
    assert "added rwtoken" in server.ok("add_slave", "rwtoken")
