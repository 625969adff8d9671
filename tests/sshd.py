"""Real OpenSSH servers on loopback ports, reached through an isolated client identity.

Shared by the pytest fixtures (conftest.py) and the benchmarks in bench/, so this
module must not import pytest.

OpenSSH's `ssh` finds ~/.ssh through the passwd entry and ignores $HOME, so the
sandbox puts an `ssh` shim first on PATH that adds `-F <sandbox config>`; rsync
and job scripts pick it up from PATH.  Fabric/paramiko expand `~` through $HOME,
so env() also points HOME at the sandbox.  The real ~/.ssh is never read or written.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time

READY_TIMEOUT = 10.0  # seconds for a fresh sshd to answer with an SSH banner
START_ATTEMPTS = 3  # fresh ports to try when another process grabs the chosen one first


class PortInUseError(RuntimeError):
    pass


class SshSandbox:
    """An SSH identity in a temp dir: fake HOME with .ssh/config, an ed25519 client key, known_hosts; sshd servers on loopback."""

    def __init__(self, root: pathlib.Path):
        self._sshd = _require("sshd", "openssh-server", extra_path="/usr/sbin:/usr/local/sbin")
        _require("ssh-keygen", "openssh-client")
        self._sshd_options = _version_specific_sshd_options(self._sshd)
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self._workers: list[SshWorker] = []
        self._listeners: list[socket.socket] = []

        self.root = pathlib.Path(root)
        self.home = self.root / "home"
        self.ssh_dir = self.home / ".ssh"
        self.config = self.ssh_dir / "config"
        self.client_key = self.ssh_dir / "id_ed25519"
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.bin_dir = self.root / "bin"

        self.ssh_dir.mkdir(mode=0o700, parents=True)
        _keygen(self.client_key)
        self.config.touch(mode=0o600)
        self.known_hosts.touch(mode=0o600)
        self.bin_dir.mkdir()
        self._write_ssh_shim()

    def _write_ssh_shim(self) -> None:
        search_path = os.pathsep.join(
            d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d != str(self.bin_dir)
        )
        real_ssh = shutil.which("ssh", path=search_path)
        if real_ssh is None:
            raise RuntimeError("ssh client not found: apt-get install openssh-client")
        shim = self.bin_dir / "ssh"
        shim.write_text(
            f'#!/bin/sh\nexec {shlex.quote(os.path.abspath(real_ssh))} -F {shlex.quote(str(self.config))} "$@"\n'
        )
        shim.chmod(0o755)

    def start_worker(self, alias: str, authorized: bool = True,
                     extra_config: tuple[str, ...] = (), ipv6: bool = False) -> SshWorker:
        """An sshd on 127.0.0.1 (and ::1 if IPV6) with a Host ALIAS entry and known host keys."""
        if ipv6:
            extra_config = ("ListenAddress ::1", *extra_config)
        worker_dir = self.root / f"sshd-{alias}"
        worker_dir.mkdir()
        _keygen(worker_dir / "host_ed25519_key")
        client_pubkey = self.client_key.with_suffix(".pub").read_text()
        (worker_dir / "authorized_keys").write_text(client_pubkey if authorized else "")
        if os.geteuid() == 0:
            # Privilege separation chroot; an unprivileged sshd does not use it.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

        for attempt in range(1, START_ATTEMPTS + 1):
            worker = SshWorker(alias, _free_port(), worker_dir, self._sshd,
                               self._sshd_options + list(extra_config))
            try:
                worker.start()
                break
            except PortInUseError:
                if attempt == START_ATTEMPTS:
                    raise
        self._workers.append(worker)

        self._add_host(alias, "127.0.0.1", worker.port)
        self.trust(worker, "127.0.0.1")
        if ipv6:
            self.trust(worker, "::1")
        return worker

    def trust(self, worker: SshWorker, host: str) -> None:
        """Record WORKER's host key in known_hosts for HOST (at its port), as ssh would."""
        key_type, key_blob = (worker.dir / "host_ed25519_key.pub").read_text().split()[:2]
        with self.known_hosts.open("a") as known_hosts:
            known_hosts.write(f"[{host}]:{worker.port} {key_type} {key_blob}\n")

    def add_config(self, text: str) -> None:
        """Append TEXT (Host or Match entries) to the sandbox's ssh config."""
        with self.config.open("a") as config:
            config.write(text)

    def host_settings(self) -> str:
        """The per-host settings every sandbox Host entry has (user, key, known_hosts)."""
        return (f"  User {self.user}\n"
                f"  IdentityFile {self.client_key}\n"
                f"  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {self.known_hosts}\n"
                f"  StrictHostKeyChecking yes\n"
                f"  BatchMode yes\n"
                f"  ConnectTimeout 5\n")

    def add_alias(self, alias: str, hostname: str, port: int) -> None:
        """Config-only host, e.g. a free port (connection refused) or 'no-such-host.invalid'."""
        self._add_host(alias, hostname, port)

    def _add_host(self, alias: str, hostname: str, port: int) -> None:
        self.add_config(f"Host {alias}\n  HostName {hostname}\n  Port {port}\n"
                        + self.host_settings())

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        # Paramiko offers every agent key before ours (allow_agent defaults to on),
        # which can exhaust sshd's MaxAuthTries and lets the user's real identity leak in.
        env.pop("SSH_AUTH_SOCK", None)
        env["HOME"] = str(self.home)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
        env["CLI_PY_SSH_CONFIG"] = str(self.config)
        return env

    def refusing_port(self) -> int:
        """Port on 127.0.0.1 that refuses connections until close(): bound, never listening,
        so that no other process (another test's sshd, under xdist) can take it meanwhile."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._listeners.append(sock)
        return sock.getsockname()[1]

    def silent_listener(self) -> int:
        """Port that completes the TCP handshake but never sends a byte (banner/connect timeouts)."""
        # The kernel completes handshakes for queued connections without accept(),
        # so a listening socket nobody accepts on is enough: no thread needed.
        sock = socket.create_server(("127.0.0.1", 0), backlog=socket.SOMAXCONN)
        self._listeners.append(sock)
        return sock.getsockname()[1]

    def closing_listener(self) -> int:
        """Port that accepts each connection and closes it at once (not an SSH server)."""
        import threading
        sock = socket.create_server(("127.0.0.1", 0))
        self._listeners.append(sock)

        def serve() -> None:
            while True:
                try:
                    connection, _ = sock.accept()
                except OSError:
                    return   # closed by close()
                connection.close()
        threading.Thread(target=serve, daemon=True).start()
        return sock.getsockname()[1]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()

    def __enter__(self) -> SshSandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SshWorker:
    """One sshd on 127.0.0.1:<port>, configured and logged in its own directory."""

    def __init__(self, alias: str, port: int, dir: pathlib.Path, sshd: str, extra_options: list[str]):
        self.alias = alias
        self.port = port
        self.dir = dir
        self.log = dir / "sshd.log"
        self.home = dir / "home"
        self.home.mkdir(mode=0o700, exist_ok=True)
        self._proc: subprocess.Popen | None = None
        config = dir / "sshd_config"
        config.write_text("\n".join(self._config_lines() + extra_options) + "\n")
        self._argv = [sshd, "-D", "-e", "-f", str(config)]

    def _config_lines(self) -> list[str]:
        return [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.dir / 'host_ed25519_key'}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            # PAM session modules (pam_loginuid) fail in containers, and an unprivileged
            # sshd cannot use PAM anyway.  Without PAM, a root sshd refuses accounts
            # whose shadow password starts with '!' (e.g. the locked root of Ubuntu).
            "UsePAM no",
            # authorized_keys lives under /tmp, which StrictModes rejects as world-writable.
            "StrictModes no",
            # Tests and benchmarks open many connections at once; the defaults
            # (MaxStartups 10:30:100, MaxSessions 10) would randomly drop some.
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            # INFO logs one "Accepted publickey" line per connection: see connections().
            "LogLevel INFO",
            "Subsystem sftp internal-sftp",
            # Sessions get an empty HOME, so that login shells read no ~/.bashrc of
            # this machine's (pyenv's there costs 100 ms a login, serialised on a
            # lock that an outage test can leave stale for 60 s).
            f"SetEnv HOME={self.home}",
        ]

    def new_host_key(self, keep_connections: bool = False) -> None:
        """Reinstall: a new host key, and sshd restarted (its connections dropped); or,
        with KEEP_CONNECTIONS, reloaded (SIGHUP), so that open connections stay."""
        if not keep_connections:
            self.stop()
        for suffix in ("", ".pub"):
            (self.dir / f"host_ed25519_key{suffix}").unlink()
        _keygen(self.dir / "host_ed25519_key")
        if not keep_connections:
            self.start()
            return
        old_log = self.log.read_text(errors="replace").count("Server listening")
        os.kill(self._proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + READY_TIMEOUT
        while self.log.read_text(errors="replace").count("Server listening") <= old_log:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd {self.alias!r} did not come back after SIGHUP")
            time.sleep(0.02)

    def connections(self) -> int:
        """How many SSH connections this sshd has accepted (logged in) so far."""
        if not self.log.exists():
            return 0
        return self.log.read_text(errors="replace").count("Accepted publickey for ")

    @property
    def pid(self) -> int | None:
        """None while stopped."""
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Start sshd (again) on this worker's port; a no-op while it is running."""
        if self._proc and self._proc.poll() is None:
            return
        log_offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

        deadline = time.monotonic() + READY_TIMEOUT
        # A banner alone could come from another process that won the race for the
        # port, so our sshd must also still be alive.
        while not (_sends_ssh_banner(self.port) and self._proc.poll() is None):
            if self._proc.poll() is not None:
                returncode, self._proc = self._proc.returncode, None
                with self.log.open("rb") as log:
                    log.seek(log_offset)
                    output = log.read().decode(errors="replace").strip()
                error = PortInUseError if "Address already in use" in output else RuntimeError
                raise error(f"sshd {self.alias!r} on port {self.port} exited with {returncode}: {output}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"sshd {self.alias!r} sent no SSH banner on port {self.port} within {READY_TIMEOUT}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill sshd together with its live connections, like a host outage."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # sshd calls setsid() for every connection, so connection handlers and
            # the commands they run escape a process-group kill and would outlive
            # the listener.  Freeze the listener so it forks no new ones, kill its
            # whole tree, then the listener itself.
            os.kill(proc.pid, signal.SIGSTOP)
            for pid in _descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
        proc.wait()


def _require(program: str, package: str, extra_path: str = "") -> str:
    path = shutil.which(program) or (extra_path and shutil.which(program, path=extra_path))
    if not path:
        raise RuntimeError(f"{program} not found: apt-get install {package}")
    # sshd refuses to run unless started by absolute path (it re-execs itself).
    return os.path.abspath(path)


def _keygen(path: pathlib.Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sshd-sandbox-{path.name}", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _version_specific_sshd_options(sshd: str) -> list[str]:
    # sshd before 9.8 has no -V but prints its version with the usage message.
    output = subprocess.run([sshd, "-V"], capture_output=True, text=True)
    version = re.search(r"OpenSSH_(\d+)\.(\d+)", output.stdout + output.stderr)
    if version and (int(version[1]), int(version[2])) >= (9, 8):
        # Every client here is 127.0.0.1; penalties for failed auth (authorized=False
        # workers) and pre-auth disconnects (readiness probes) would lock all tests out.
        return ["PerSourcePenalties no"]
    return []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sends_ssh_banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            banner = sock.recv(256)
            # Identifying ourselves keeps sshd from logging every probe as a failed key exchange.
            sock.sendall(b"SSH-2.0-readiness-probe\r\n")
            return banner.startswith(b"SSH-")
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the parenthesised command name: state, ppid, ...
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process exited while we were scanning
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, pending = [], [pid]
    while pending:
        kids = children.get(pending.pop(), [])
        found += kids
        pending += kids
    return found
