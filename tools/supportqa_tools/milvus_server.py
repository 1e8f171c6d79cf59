"""A real Milvus server for tests and benchmarks, of both kinds a team may run: the Milvus
2.3.5 standalone server (PyPI `milvus`, no BM25) and milvus-lite 3.2.2's network server (BM25),
each installed into a venv of its own under the cache folder on first use, on loopback ports
of its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "supportqa"
# kind -> (what pip installs, its venv, launcher, routes the store serves on it)
KINDS = {
    "standalone-2.3.5": (["milvus==2.3.5"], CACHE / "milvus-2.3.5", "milvus-server",
                         "routes: dense"),
    "lite-3.2.2": (["milvus-lite==3.2.2", "pymilvus"], CACHE / "milvus-lite-3.2.2",
                   "milvus-lite", "routes: dense, lexical"),
}
PORT_FLAGS = ("--proxy-port", "--etcd-port", "--root-coord-port", "--proxy-internal-port",
              "--query-coord-port", "--query-node-port", "--index-coord-port",
              "--index-node-port", "--data-coord-port", "--data-node-port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(kind: str) -> Path:
    """The server's launcher, installed from PyPI into its own venv on first use."""
    packages, venv, launcher, _ = KINDS[kind]
    exe = venv / "bin" / launcher
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages], check=True,
                       timeout=900)
    return exe


class Milvus:
    """A Milvus standalone server on loopback ports of its own, which tests stop and start."""

    def __init__(self, kind: str, data: Path) -> None:
        self.kind, self.data, self.exe = kind, data, _launcher(kind)
        self.routes = KINDS[kind][3]
        if kind.startswith("lite"):
            self.ports = {"--port": _free_port()}
            self.uri = f"http://127.0.0.1:{self.ports['--port']}"
        else:
            self.ports = {flag: _free_port() for flag in PORT_FLAGS}
            self.uri = f"http://127.0.0.1:{self.ports['--proxy-port']}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 420.0) -> None:
        """Starts the server and waits until it answers. Started again on its data, Milvus
        2.3 first waits for its previous session in etcd to lapse: minutes on a busy
        machine."""
        self._wait_for_ports()
        args = ([str(self.exe), "server", "--data-dir", str(self.data), "--host", "127.0.0.1"]
                if self.kind.startswith("lite") else [str(self.exe), "--data", str(self.data)])
        for flag, port in self.ports.items():
            args += [flag, str(port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                MilvusClient(uri=self.uri, timeout=5).list_collections(timeout=5)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.exe.name} exited ({self.proc.returncode})") from None
                time.sleep(1)
        raise RuntimeError(f"Milvus not up on {self.uri} after {timeout_s} s")

    def _wait_for_ports(self, timeout_s: float = 120.0) -> None:
        """Waits until every port binds as the launcher binds it (no SO_REUSEADDR): after a
        stop, the proxy port's connections linger in TIME_WAIT for up to a minute, and a
        launcher that cannot bind a port it was given fails or moves."""
        deadline = time.monotonic() + timeout_s
        for port in self.ports.values():
            while True:
                with socket.socket() as s:
                    try:
                        s.bind(("127.0.0.1", port))
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                time.sleep(1)

    def kill(self) -> None:
        """Stops the server: SIGTERM, then SIGKILL if it hangs (it may: FACTS.md). After a
        bare SIGKILL it took minutes to come back, or came back on another port."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=60)
        self.proc = None
        # The launcher runs Milvus (copied under its data folder) in a session of its own,
        # which outlives it: stop that too, or it keeps Milvus's fixed ports (2379, 9091).
        for sig, wait_s in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 10.0)):
            pids = self._server_pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while self._server_pids() and time.monotonic() < deadline:
                time.sleep(0.5)

    def _server_pids(self) -> list[int]:
        """Processes running the Milvus binary under this server's data folder."""
        binary = str(self.data / "bin" / "milvus").encode()
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(binary):
                    pids.append(int(proc.name))
            except OSError:
                continue  # gone meanwhile
        return pids
