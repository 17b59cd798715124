"""A real S3-compatible server for tests: moto in server mode, a separate process on 127.0.0.1.

Clients reach it through `Gate`, a TCP relay the tests can close and open again, so an outage of
the object store (connections refused) can be made and ended without losing the server's data.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto(port: int, log: Path) -> subprocess.Popen:
    """`moto_server` on 127.0.0.1:port, waited for until it answers."""
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("wb"),
                               stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"moto_server did not start in 60 s; see {log}")


class Gate:
    """A TCP relay from 127.0.0.1:port to the server; `close()` refuses new connections and cuts open ones."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it; close() alone would not
            except OSError:
                pass
            listener.close()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class S3Server:
    """The running server: its endpoint (through the gate), the environment for clients, new buckets."""

    def __init__(self, workdir: Path):
        self.process = start_moto(free_port(), workdir / "moto.log")
        self.gate = Gate(int(self.process.args[-1]))
        self.endpoint = f"http://127.0.0.1:{self.gate.port}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        # Past the gate, for benchmarks: the relay's threads would be part of what they measure.
        self.direct_env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.process.args[-1]}"}

    def new_bucket(self) -> str:
        import boto3

        name = f"test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials()).create_bucket(Bucket=name)
        return name

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())

    def stop(self) -> None:
        self.gate.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def environment(server: S3Server, artifacts: str, cache: Path) -> dict[str, str]:
    """A process's environment as one machine of a team would have it: the shared store, its own cache."""
    return {**os.environ, **server.env, "ARTIFACTS_DIR": artifacts, "CIFAR_PIPELINE_CACHE": str(cache)}
