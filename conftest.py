"""What test_brokest.py starts and talks to: real worker processes, and a few raw sockets.

Workers are `python brokest.py` processes on 127.0.0.1, port 0 unless a test asks for one,
known from their log; each is stopped by its own pid at the end of the test.
"""

import contextlib
import hmac
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

import brokest

HERE = Path(__file__).resolve().parent
BROKEST = str(HERE / "brokest.py")


def wait_until(predicate, timeout=10.0):
    """Return once predicate() is true; fail the test if it is not within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s in vain for {predicate}")
        time.sleep(0.01)


def free_port():
    """Return a port the OS says is free on 127.0.0.1 (for tests that need a port up front)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_ports(count):
    """Return the first of count consecutive ports that are free on 127.0.0.1 right now."""
    for _ in range(100):
        first = free_port()
        probes = []
        try:
            for port in range(first, first + count):
                probes.append(socket.create_server(("127.0.0.1", port)))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    pytest.fail(f"found no {count} free ports in a row")


def children_of(pid):
    """Return the pids of a running process's children."""
    tasks = os.listdir(f"/proc/{pid}/task")
    return [
        int(child)
        for t in tasks
        for child in Path(f"/proc/{pid}/task/{t}/children").read_text().split()
    ]


def parent_of(pid):
    """Return the parent pid of a running process, or None when it is not running."""
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return None
    return None if state == "Z" else int(parent)


class WorkerProcess:
    """A brokest supervisor on 127.0.0.1 and its workers, known from its log.

    It runs in a session of its own, without a controlling terminal, as under systemd: so
    SIGHUP means a rolling restart, also when the tests run from a terminal."""

    def __init__(self, *options, workers=1, env=None, command=None, timeout=10.0, **popen):
        self.process = subprocess.Popen(
            [*(command or [sys.executable, BROKEST]), *options],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            **popen,
        )
        self.log = []
        self.listening = []  # (worker pid, address), in the order the workers said so
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()
        ready = r"listening on" if workers else "serving ports"
        self.wait_for_log(ready, count=workers or 1, timeout=timeout)

    def _read_log(self):
        for line in self.process.stderr:
            with self.changed:
                self.log.append(line)
                for pid, address in re.findall(r"worker (\d+) listening on (tcp://\S+)", line):
                    self.listening.append((int(pid), address))
                self.changed.notify_all()

    def wait_for_log(self, pattern, count=1, timeout=10.0):
        """Return the log lines matching pattern, once there are count of them."""

        def matching():
            return [line for line in self.log if re.search(pattern, line)]

        with self.changed:
            found = self.changed.wait_for(lambda: len(matching()) >= count, timeout)
            lines = matching()
        assert found, f"no {count} log lines matching {pattern!r} in {timeout} s: {self.log}"
        return lines

    def wait_for_exit(self, timeout=10.0):
        """Return the supervisor's exit status, once its log (and its workers') has ended."""
        status = self.process.wait(timeout)
        self.reader.join(timeout)
        return status

    @property
    def addresses(self):
        return list(dict.fromkeys(address for _, address in self.listening))

    @property
    def address(self):
        return self.addresses[0]

    def pid_on(self, address):
        """Return the pid of the worker that last said it listens on address."""
        with self.changed:
            return [pid for pid, listening_on in self.listening if listening_on == address][-1]

    @property
    def pid(self):
        """The pid of the (first) worker process, which runs the tasks."""
        return self.pid_on(self.address)

    def wait_for_new_worker(self, address, old_pid, timeout=10.0):
        """Return the pid of the worker that replaced old_pid on address."""
        with self.changed:
            replaced = self.changed.wait_for(lambda: self.pid_on(address) != old_pid, timeout)
        assert replaced, f"no new worker on {address} in {timeout} s: {self.log}"
        return self.pid_on(address)

    def stop(self):
        """Kill the supervisor and every worker it started, each by its pid."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)  # it starts no new worker meanwhile
            for pid in children_of(self.process.pid):
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
        self.process.wait(10)


@pytest.fixture
def start_worker():
    """Start supervisors with their workers (port 0 unless told) and kill what is left."""
    started = []

    def start(*options, **kwargs):
        if "--port" not in options:
            options += ("--port", "0")
        started.append(WorkerProcess(*options, **kwargs))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def worker(start_worker):
    return start_worker()


@pytest.fixture
def two_workers(start_worker):
    return start_worker(), start_worker()


@pytest.fixture
def make_client():
    """Make Clients and shut them all down at the end."""
    clients = []

    def make(*args, **kwargs):
        clients.append(brokest.Client(*args, **kwargs))
        return clients[-1]

    yield make
    for client in clients:
        client.shutdown(cancel_futures=True)


def curve_secret(key):
    """Return the worker's CURVE secret key for key, as the protocol derives it."""
    return z85.encode(hmac.digest(key.encode(), b"brokest curve server key", "sha256"))


def curve_client(sock, key):
    """Make sock a CurveZMQ client of a worker whose key is key, as any conforming peer would."""
    sock.curve_serverkey = zmq.curve_public(curve_secret(key))
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()


def curve_server(sock, key):
    """Make sock a CurveZMQ server holding the secret key that key derives, as a worker does."""
    sock.curve_server = True
    sock.curve_secretkey = curve_secret(key)


def raw_request(address, frames, timeout_ms=5000, key=None):
    """Send frames on a fresh REQ socket and return the reply's frames, or None if none came."""
    with zmq.Context.instance().socket(zmq.REQ) as sock:
        sock.linger = 0
        if key:
            curve_client(sock, key)
        sock.connect(address)
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return sock.recv_multipart()


def read_reply(frames, key=None):
    """Return (request id, retiring, outcomes) of a worker's reply frames, verified."""
    body, *buffers = brokest.verified(key and key.encode(), frames, count=1)
    return brokest.unpickle(body, buffers)


class RecordingRelay:
    """A TCP relay on 127.0.0.1 to a worker's port, recording the bytes of each connection."""

    def __init__(self, port):
        self.port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = []  # per connection: client to worker
        self.received = []  # per connection: worker to client
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            worker = socket.create_connection(("127.0.0.1", self.port))
            self.sent.append(bytearray())
            self.received.append(bytearray())
            pumps = [(client, worker, self.sent[-1]), (worker, client, self.received[-1])]
            for source, sink, record in pumps:
                threading.Thread(
                    target=self._pump, args=(source, sink, record), daemon=True
                ).start()

    @staticmethod
    def _pump(source, sink, record):
        try:
            while data := source.recv(1 << 16):
                record += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()

    def close(self):
        self.listener.close()


def send_raw_bytes(port, data):
    """Send data on a new TCP connection to port; return what came back until it closed.

    The first 64 bytes go as a ZMTP greeting does, in its two steps, each after the peer's
    answer: libzmq takes a recorded session that way, not in one piece."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        answer = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError, TimeoutError):
            for start, end, expected in [(0, 11, 11), (11, 64, 64), (64, len(data), None)]:
                connection.sendall(data[start:end])
                while expected is None or len(answer) < expected:
                    chunk = connection.recv(1 << 16)
                    if not chunk:
                        return answer
                    answer += chunk
        return answer
