"""brokest's behaviour, one test per sentence, in the order the README tells it.

Every test talks to real worker processes (`python brokest.py`) on 127.0.0.1 over real
sockets; faults are real too: workers are killed and frozen by their own pid.
The task functions below are pickled by reference, and the workers import them from this file.
"""
import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import hmac
import itertools
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import cloudpickle
import pytest
import zmq
from zmq.utils import z85

import brokest

HERE = Path(__file__).resolve().parent
KEY = "test-key-5f1c2a"
SECRET = b"argument-4be1c9d0"  # bytes a wiretap looks for
RESULT_TAG = b"-result-77e2a1"
# Calls that keep C code busy, holding the GIL, for about 4 s on the machine this was written
# on: longer than the heartbeat timeout (1.5 s).
GIL_HOLDING_COUNT = 5 * 10**8


# --- Tasks the workers run ---

def add(a, b):
    return a + b


def identify(x):
    return os.getpid(), x


def divide(a, b):
    return a / b


def return_a_lock():
    return threading.Lock()


def raise_with_a_lock():
    raise ValueError("holds a lock", threading.Lock())


def call_sys_exit(code):
    sys.exit(code)


def echo(value):
    return value


def sleep_then_return(seconds, value):
    time.sleep(seconds)
    return value


def touch_then_sleep(path, seconds):
    Path(path).touch()
    time.sleep(seconds)


def sleep_then_return_after_touching(path, seconds, value):
    Path(path).touch()
    time.sleep(seconds)
    return value


def keep_python_busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "done"


def meet_then_return_pid(directory, expected):
    """Announce this worker in directory, wait until `expected` workers have, return the pid."""
    Path(directory, str(os.getpid())).touch()
    deadline = time.monotonic() + 10
    while len(os.listdir(directory)) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError("the other worker never started its task")
        time.sleep(0.01)
    return os.getpid()


def die_the_first_time(marker):
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def count_the_run_then_fail(path):
    with open(path, "a") as runs:
        runs.write("run\n")
    raise ValueError("this task always fails")


def spin_then_note_the_finally(path):
    try:
        while True:
            pass
    finally:
        Path(path).write_text("finally ran")


def sleep_then_note_the_finally(path, seconds):
    try:
        time.sleep(seconds)
    finally:
        Path(path).write_text("finally ran")


def swallow_every_timeout(runs=None):
    if runs is not None:
        with open(runs, "a") as file:
            file.write("run\n")
    while True:
        try:
            time.sleep(60)
        except TimeoutError:
            pass


def hold_the_gil(count):
    return sum(itertools.repeat(1, count))  # C code that never returns to Python until done


def exit_at_once(code):
    os._exit(code)


def segfault():
    import ctypes
    ctypes.string_at(0)


def count_the_run_then_sleep(path, seconds):
    with open(path, "a") as runs:
        runs.write("run\n")
    time.sleep(seconds)


def tag_the_secret(value):
    return value + RESULT_TAG


def log_the_run(path):
    with open(path, "a") as runs:
        runs.write("run\n")


def record_the_run(path, tag):
    """Note tag and this worker's pid in path (one line, appended at once); return tag."""
    with open(path, "a") as runs:
        runs.write(f"{tag} {os.getpid()}\n")
    return tag


class Token:
    """A result that a weak reference can follow."""


def make_token(n):
    return Token()


def numbers_then_a_failure(count):
    yield from range(count)
    raise LookupError("the input failed")


class CreatesFileWhenUnpickled:
    """A payload whose unpickling creates a file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class RaisesWhenUnpickled:
    def __reduce__(self):
        return int, ("not a number",)


# --- Helpers and fixtures ---

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


class RecordingRelay:
    """A TCP relay on 127.0.0.1 to a worker's port, recording the bytes of each connection."""

    def __init__(self, port):
        self.port, self.listener = port, socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent, self.received = [], []  # per connection: client to worker, worker to client
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
            for source, sink, record in [(client, worker, self.sent[-1]),
                                         (worker, client, self.received[-1])]:
                threading.Thread(target=self._pump, args=(source, sink, record), daemon=True).start()

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


class WorkerProcess:
    """A `python brokest.py` supervisor on 127.0.0.1 and its workers, known from its log."""

    def __init__(self, *options, workers=1, env=None, timeout=10.0):
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "brokest.py"), *options],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, **(env or {})})
        self.log = []
        self.listening = []  # (worker pid, address), in the order the workers said so
        self.changed = threading.Condition()
        threading.Thread(target=self._read_log, daemon=True).start()
        self.wait_for_log(r"listening on", count=workers, timeout=timeout)

    def _read_log(self):
        for line in self.process.stderr:
            with self.changed:
                self.log.append(line)
                self.listening += [(int(pid), address) for pid, address in
                                   re.findall(r"worker (\d+) listening on (tcp://\S+)", line)]
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
            assert self.changed.wait_for(lambda: self.pid_on(address) != old_pid, timeout), \
                f"no new worker on {address} in {timeout} s: {self.log}"
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
    """Start worker processes (port 0 unless told) and kill whichever are left at the end."""
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


def curve_client(sock, key):
    """Make sock a CurveZMQ client of a worker whose key is key, as any conforming peer would."""
    server_secret = z85.encode(hmac.digest(key.encode(), b"brokest curve server key", "sha256"))
    sock.curve_serverkey = zmq.curve_public(server_secret)
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()


def curve_server(sock, key):
    """Make sock a CurveZMQ server holding the secret key that key derives, as a worker does."""
    sock.curve_server = True
    sock.curve_secretkey = z85.encode(hmac.digest(key.encode(), b"brokest curve server key", "sha256"))


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


# --- The basics: queue(), errors coming home ---

def test_queue_returns_the_function_result(worker, make_client):
    assert make_client(worker.address).queue(add, 2, b=40) == 42


def test_module_level_queue_uses_the_workers_and_key_named_in_the_environment(start_worker):
    workers = [start_worker(env={"BROKEST_KEY": KEY}) for _ in range(2)]
    # until both have answered: a worker whose handshake is not done yet is looked at again
    # 100 ms later, and quick calls meanwhile go to the other
    script = ("import os, brokest\n"
              "pids = {brokest.queue(os.getpid)}\n"
              "for _ in range(2000):\n"
              "    if len(pids) == 2:\n"
              "        break\n"
              "    pids.add(brokest.queue(os.getpid))\n"
              "print(sorted(pids))\n")
    env = {**os.environ, "BROKEST_ADDRESS": ",".join(w.address for w in workers),
           "BROKEST_KEY": KEY, "BROKEST_TIMEOUT": "10", "PYTHONPATH": str(HERE)}
    output = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=30, check=True).stdout
    assert output.strip() == str(sorted(w.pid for w in workers))


def test_importing_brokest_opens_no_socket():
    script = ("import os; before = len(os.listdir('/proc/self/fd')); import brokest; "
              "print(len(os.listdir('/proc/self/fd')) - before)")
    output = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True,
                            text=True, timeout=30, check=True).stdout
    assert output.strip() == "0"


def test_task_exception_is_raised_with_the_remote_traceback(worker, make_client):
    with pytest.raises(ZeroDivisionError) as raised:
        make_client(worker.address).queue(divide, 1, 0)
    assert raised.value.args == ("division by zero",)
    assert isinstance(raised.value.__cause__, brokest.RemoteTraceback)
    assert "in divide" in str(raised.value.__cause__)


def test_worker_keeps_serving_after_a_task_fails(worker, make_client):
    client = make_client(worker.address)
    with pytest.raises(ZeroDivisionError):
        client.queue(divide, 1, 0)
    assert client.queue(divide, 1, 4) == 0.25


def test_sys_exit_in_a_task_is_raised_at_the_caller_and_never_ends_the_worker(worker, make_client):
    client = make_client(worker.address)
    with pytest.raises(SystemExit) as raised:
        client.queue(call_sys_exit, 3)
    assert raised.value.code == 3
    assert client.queue(add, 1, 1) == 2


def test_unpicklable_result_raises_remote_error_and_the_worker_keeps_serving(worker, make_client):
    client = make_client(worker.address)
    with pytest.raises(brokest.RemoteError, match="result of type lock could not be pickled"):
        client.queue(return_a_lock)
    assert client.queue(add, 1, 1) == 2


def test_unpicklable_exception_raises_remote_error_with_its_traceback(worker, make_client):
    client = make_client(worker.address)
    with pytest.raises(brokest.RemoteError, match="raised ValueError, which could not be pickled") as raised:
        client.queue(raise_with_a_lock)
    assert "in raise_with_a_lock" in str(raised.value)
    assert client.queue(add, 1, 1) == 2


def test_function_from_a_module_the_worker_lacks_gets_an_error_saying_how_to_fix_it(
        worker, make_client, tmp_path, monkeypatch):
    (tmp_path / "only_in_the_client.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_in_the_client
    client = make_client(worker.address)
    with pytest.raises(brokest.RemoteError, match=r"register_pickle_by_value\(only_in_the_client\)"):
        client.queue(only_in_the_client.double, 2)
    assert client.queue(add, 1, 1) == 2


def test_module_registered_to_travel_by_value_needs_no_install_on_the_worker(
        worker, make_client, tmp_path, monkeypatch):
    (tmp_path / "sent_by_value.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sent_by_value
    cloudpickle.register_pickle_by_value(sent_by_value)
    try:
        assert make_client(worker.address).queue(sent_by_value.triple, 2) == 6
    finally:
        cloudpickle.unregister_pickle_by_value(sent_by_value)


def test_lambdas_and_closures_travel_by_value(worker, make_client):
    offset = 10
    client = make_client(worker.address)
    assert client.queue(lambda x: x + offset, 1) == 11


def test_worker_logs_one_line_per_task_with_name_duration_and_status(worker, make_client):
    client = make_client(worker.address)
    client.queue(add, 1, 2)
    with pytest.raises(ZeroDivisionError):
        client.queue(divide, 1, 0)
    assert worker.wait_for_log(r"add [\d.]+ ms ok")
    assert worker.wait_for_log(r"divide [\d.]+ ms error ZeroDivisionError")


# --- Large buffers ---

def test_large_bytes_travel_as_their_own_frame_without_a_copy():
    payload = b"x" * (1 << 20)
    frames = brokest.pack_message(None, b"id", b"", ([((brokest.out_of_band(payload),), {})], None))
    assert len(frames) == 5 and frames[4].obj is payload and len(frames[3]) < 1000


def test_numpy_arrays_travel_as_their_own_frame_without_a_copy():
    numpy = pytest.importorskip("numpy")
    array = numpy.arange(1 << 18)
    frames = brokest.pack_message(None, b"id", b"", ([((array,), {})], None))
    assert len(frames) == 5
    assert numpy.shares_memory(array, numpy.frombuffer(frames[4], dtype=array.dtype))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_large_bytes_like_values_come_back_as_the_same_type(worker, make_client, kind):
    value = kind(os.urandom(1 << 20))
    result = make_client(worker.address).queue(echo, value)
    assert type(result) is kind and bytes(result) == bytes(value)


def test_numpy_array_comes_back_equal_and_writable(worker, make_client):
    numpy = pytest.importorskip("numpy")
    array = numpy.arange(1 << 18, dtype=numpy.float64).reshape(512, 512)
    result = make_client(worker.address).queue(echo, array)
    assert (result == array).all() and result.flags.writeable


# --- Several workers: submit, map, threads ---

def test_map_runs_on_two_workers_at_once(two_workers, make_client, tmp_path):
    client = make_client([w.address for w in two_workers], timeout=20)
    pids = list(client.map(meet_then_return_pid, [tmp_path] * 2, [2, 2]))
    assert sorted(pids) == sorted(w.pid for w in two_workers)


def test_submit_returns_futures_that_work_with_as_completed(worker, make_client):
    client = make_client(worker.address)
    futures = [client.submit(add, n, 1) for n in range(5)]
    done = concurrent.futures.as_completed(futures, timeout=20)
    assert sorted(future.result() for future in done) == [1, 2, 3, 4, 5]


def test_map_raises_a_task_exception_at_its_place_in_the_results(worker, make_client):
    results = make_client(worker.address).map(divide, [1, 2, 3], [1, 0, 1])
    assert next(results) == 1
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_client_refuses_tasks_after_shutdown(worker):
    client = brokest.Client(worker.address)
    client.shutdown()
    with pytest.raises(RuntimeError):
        client.submit(add, 1, 2)


def test_client_works_with_asyncio_run_in_executor(worker, make_client):
    client = make_client(worker.address)

    async def main():
        return await asyncio.get_running_loop().run_in_executor(client, add, 20, 22)

    assert asyncio.run(main()) == 42


def test_addresses_may_be_a_comma_separated_string(two_workers, make_client):
    client = make_client(" , ".join(w.address for w in two_workers))
    assert client.addresses == [w.address for w in two_workers]


def test_slow_task_does_not_block_the_other_workers(two_workers, make_client):
    # two workers; one is stuck on a slow task while 20 quick ones arrive
    client = make_client([w.address for w in two_workers])
    slow = client.submit(sleep_then_return, 3, "slow")
    quick = [client.submit(add, n, 0) for n in range(20)]
    concurrent.futures.wait(quick, timeout=2.5)
    assert [future.result(timeout=0) for future in quick] == list(range(20))
    assert not slow.done()


def test_many_threads_share_one_client_and_lose_nothing(two_workers, make_client):
    # 8 threads x 500 calls on one Client over two workers
    client = make_client([w.address for w in two_workers], timeout=30)

    def calls(thread):
        return [client.queue(identify, (thread, n)) for n in range(500)]

    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        results = [r for batch in threads.map(calls, range(8), timeout=60) for r in batch]
    assert sorted(x for _, x in results) == [(t, n) for t in range(8) for n in range(500)]
    assert {pid for pid, _ in results} == {w.pid for w in two_workers}


def test_map_with_chunks_returns_results_in_order(two_workers, make_client):
    client = make_client([w.address for w in two_workers], timeout=20)
    assert list(client.map(add, range(10), range(10), chunksize=3)) == [2 * n for n in range(10)]


def test_map_with_chunks_stops_at_the_shortest_iterable_and_takes_generators(worker, make_client):
    client = make_client(worker.address, timeout=20)
    results = client.map(add, (n for n in range(7)), iter([10, 20, 30, 40, 50]), chunksize=2)
    assert list(results) == [10, 21, 32, 43, 54]


def test_map_with_chunks_raises_an_exception_at_its_own_place(worker, make_client):
    # one chunk holds all four calls; the third raises
    results = make_client(worker.address).map(divide, [1, 2, 3, 4], [1, 1, 0, 1], chunksize=4)
    assert next(results) == 1.0 and next(results) == 2.0
    with pytest.raises(ZeroDivisionError) as raised:
        next(results)
    assert "in divide" in str(raised.value.__cause__)


def test_map_sends_its_chunks_to_all_workers_at_once(two_workers, make_client, tmp_path):
    client = make_client([w.address for w in two_workers], timeout=20)
    pids = list(client.map(meet_then_return_pid, [tmp_path] * 4, [2] * 4, chunksize=2))
    assert pids[0] == pids[1] and pids[2] == pids[3]
    assert {pids[0], pids[2]} == {w.pid for w in two_workers}


@pytest.mark.parametrize("buffersize", [None, 1])
def test_map_timeout_counts_from_the_call_for_all_results(worker, make_client, buffersize):
    # one worker runs calls of 0.1, 1 and 3 s in turn: the first two are back well before
    # the 2 s timeout, the third is not. Counted from the last result, it would end at 3.1 s.
    client = make_client(worker.address)
    client.queue(echo, 0)  # the worker imports this module now, not during the map
    started = time.monotonic()
    results = client.map(sleep_then_return, [0.1, 1, 3], "abc", timeout=2, buffersize=buffersize)
    assert next(results) == "a" and next(results) == "b"
    with pytest.raises(TimeoutError):
        next(results)
    assert 2 <= time.monotonic() - started < 2.9


def test_map_that_is_not_read_to_the_end_runs_no_more_chunks(worker, make_client, tmp_path):
    # one worker, twenty 0.2 s calls; the caller takes one result and drops the rest
    runs = tmp_path / "runs"
    client = make_client(worker.address, timeout=20)
    results = client.map(count_the_run_then_sleep, [runs] * 20, [0.2] * 20)
    assert next(results) is None
    del results  # closing the iterator cancels the calls not yet sent
    client.submit(abs, -1).result(timeout=20)  # queued after them all: they ran or were cancelled
    assert len(runs.read_text().splitlines()) <= 3


@pytest.mark.parametrize("chunksize", [0, -1])
def test_map_refuses_a_chunksize_below_one(worker, make_client, chunksize):
    with pytest.raises(ValueError, match="chunksize"):
        make_client(worker.address).map(add, [1], [2], chunksize=chunksize)


# --- Large and endless inputs: map's buffersize ---

@pytest.mark.parametrize("buffersize, error, message", [
    (1.5, TypeError, "buffersize must be an integer or None"),
    ("2", TypeError, "buffersize must be an integer or None"),
    (0, ValueError, "buffersize must be None or > 0"),
    (-1, ValueError, "buffersize must be None or > 0")])
def test_map_refuses_a_buffersize_as_python_3_14_does(make_client, buffersize, error, message):
    client = make_client(f"tcp://127.0.0.1:{free_port()}")  # raised by map() itself: no worker needed
    with pytest.raises(error, match=re.escape(message)):
        client.map(abs, [1], buffersize=buffersize)


@pytest.mark.parametrize("buffersize", [1, 2, 4, 8])
def test_map_with_a_buffersize_returns_results_in_order(two_workers, make_client, buffersize):
    client = make_client([w.address for w in two_workers], timeout=20)
    results = client.map(add, range(50), range(100, 200), chunksize=3, buffersize=buffersize)
    assert list(results) == [n + 100 + n for n in range(50)]


@pytest.mark.parametrize("chunksize", [1, 7])
def test_map_with_a_buffersize_takes_an_endless_input(two_workers, make_client, chunksize):
    client = make_client([w.address for w in two_workers], timeout=20)
    results = client.map(abs, itertools.count(), chunksize=chunksize, buffersize=2)
    assert list(itertools.islice(results, 40)) == list(range(40))
    results.close()


def test_map_reads_buffersize_chunks_at_the_call_then_one_more_as_each_chunk_starts(worker, make_client):
    read = []

    def numbers():
        for n in itertools.count():
            read.append(n)
            yield n

    results = make_client(worker.address, timeout=20).map(abs, numbers(), chunksize=3, buffersize=2)
    assert len(read) == 6  # two chunks of three, before any result was asked for
    assert next(results) == 0 and len(read) == 9  # the first chunk's results start: one more
    assert [next(results), next(results)] == [1, 2] and len(read) == 9
    assert next(results) == 3 and len(read) == 12


@pytest.mark.parametrize("how", ["close", "del"])
def test_a_buffered_map_closed_or_dropped_runs_no_more_chunks(worker, make_client, tmp_path, how):
    # one worker, so chunks run one at a time; the input would go on for ever
    runs = tmp_path / "runs"
    client = make_client(worker.address, timeout=20)
    results = client.map(count_the_run_then_sleep, itertools.repeat(runs), itertools.repeat(0.2),
                         buffersize=2)
    assert next(results) is None  # three chunks were sent: the first ran, the second may run
    if how == "close":
        results.close()
    else:
        del results  # the last reference: the generator is closed at once
    client.submit(abs, -1).result(timeout=20)  # queued behind whatever had started
    assert len(runs.read_text().splitlines()) <= 2


@pytest.mark.parametrize("buffersize", [None, 2])
@pytest.mark.parametrize("chunksize, before", [(1, [0, 1, 2, 3, 4]), (2, [0, 1, 2, 3])])
def test_map_raises_an_exception_of_its_input_after_the_results_of_the_chunks_before(
        worker, make_client, buffersize, chunksize, before):
    # five numbers, then the input raises: it takes the place of the chunk it was reading
    results = make_client(worker.address, timeout=20).map(
        abs, numbers_then_a_failure(5), chunksize=chunksize, buffersize=buffersize)
    assert [next(results) for _ in before] == before
    with pytest.raises(LookupError, match="the input failed"):
        next(results)


@pytest.mark.parametrize("buffersize", [None, 1])
def test_map_keeps_no_reference_to_a_result_it_yielded(worker, make_client, buffersize):
    # one chunk of three results: the first one yielded must be free, though the chunk is not
    results = make_client(worker.address, timeout=20).map(make_token, range(3), chunksize=3,
                                                            buffersize=buffersize)
    first = weakref.ref(next(results))
    gc.collect()
    assert first() is None
    assert isinstance(next(results), Token)


def test_a_buffered_map_of_millions_of_items_keeps_the_client_memory_flat(two_workers):
    # in a fresh process, whose peak memory (VmHWM; ru_maxrss would start at pytest's) is its
    # own: 3,000,000 items, 4 chunks ahead
    script = (
        "import sys, brokest\n"
        "def peak_kb():\n"
        "    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
        "client = brokest.Client(sys.argv[1:])\n"
        "list(client.map(abs, range(10_000), chunksize=1000))\n"
        "before = peak_kb()\n"
        "total = sum(client.map(abs, range(3_000_000), chunksize=3000, buffersize=4))\n"
        "print(total, (peak_kb() - before) // 1024)\n")
    output = subprocess.run([sys.executable, "-c", script, *(w.address for w in two_workers)],
                            cwd=HERE, capture_output=True, text=True, timeout=50, check=True).stdout
    total, growth_mb = map(int, output.split())
    assert total == sum(range(3_000_000)) and growth_mb < 30


def test_client_of_a_thousand_workers_dispatches_to_the_hundred_that_are_up(start_worker):
    # libzmq's default context allows 1,023 sockets; each connection takes three. The tasks
    # need no import on the workers: a hundred workers importing this test module at once
    # would keep two cores busy for half a minute.
    workers = start_worker("--processes", "100", workers=100, timeout=60)
    up = workers.addresses
    down = [f"tcp://127.0.0.1:{free_port()}" for _ in range(900)]
    started = time.monotonic()
    client = brokest.Client(up + down, timeout=30)
    try:
        assert time.monotonic() - started < 5
        assert list(client.map(time.sleep, [0.05] * 1000, timeout=60)) == [None] * 1000
        served = set(client.map(lambda _: os.getpid(), range(1000), timeout=60))
        assert served <= {workers.pid_on(address) for address in up} and len(served) > 50
    finally:
        client.shutdown()


# --- Worker lifecycle and command line ---

def test_stop_from_another_thread_ends_start_and_frees_the_port(make_client):
    worker = brokest.Worker(port=0)
    thread = threading.Thread(target=worker.start)
    thread.start()
    wait_until(lambda: worker.address)
    assert make_client(worker.address, timeout=10).queue(add, 1, 2) == 3
    worker.stop()
    thread.join(timeout=2)
    assert not thread.is_alive()
    # the port is free again: a new worker listens on it
    again = brokest.Worker(port=int(worker.address.rsplit(":", 1)[1]))
    thread = threading.Thread(target=again.start)
    thread.start()
    try:
        assert make_client(worker.address, timeout=10).queue(add, 2, 2) == 4
    finally:
        again.stop()
        thread.join(timeout=2)


def test_sigterm_stops_the_worker_cleanly(worker):
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=5) == 0
    assert worker.wait_for_log("stopped")


def test_cli_processes_starts_n_workers_and_sigterm_stops_them_all(start_worker, make_client):
    workers = start_worker("--processes", "2", workers=2)
    client = make_client(workers.addresses, timeout=10)
    pids = {client.queue(identify, 0)[0] for _ in range(4)}
    assert len(pids) == 2
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(timeout=10) == 0
    assert len(workers.wait_for_log("stopped", count=2)) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_cli_help_exits_zero():
    result = subprocess.run([sys.executable, str(HERE / "brokest.py"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--processes" in result.stdout


# --- Timeouts and lost workers ---

def test_timeout_raises_timeout_error_and_the_client_stays_usable(worker, make_client):
    client = make_client(worker.address, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.queue(sleep_then_return, 1.3, "late")
    assert time.monotonic() - started < 1.5
    # the late reply to the abandoned request is never taken for this one's
    assert client.queue(echo, "fresh") == "fresh"


def test_waiting_for_a_busy_worker_does_not_count_against_the_timeout(worker, make_client):
    # one worker, timeout 1 s, three threads calling with 0.7 s tasks: the last waits 1.4 s
    client = make_client(worker.address, timeout=1.0)
    with concurrent.futures.ThreadPoolExecutor(3) as callers:
        calls = [callers.submit(client.queue, sleep_then_return, 0.7, n) for n in range(3)]
        assert [call.result(timeout=10) for call in calls] == [0, 1, 2]


def test_killed_worker_raises_worker_lost_within_seconds(worker, make_client, tmp_path):
    client = make_client(worker.address)  # no timeout
    task = client.submit(touch_then_sleep, tmp_path / "started", 60)
    wait_until((tmp_path / "started").exists)
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(brokest.WorkerLost):
        task.result(timeout=5)


def test_frozen_worker_raises_worker_lost_within_ten_seconds(worker, make_client, tmp_path):
    client = make_client(worker.address)  # no timeout
    task = client.submit(touch_then_sleep, tmp_path / "started", 60)
    wait_until((tmp_path / "started").exists)
    os.kill(worker.pid, signal.SIGSTOP)
    with pytest.raises(brokest.WorkerLost):
        task.result(timeout=10)


def test_long_task_holding_the_worker_busy_is_not_taken_for_a_dead_worker(worker, make_client):
    # the task keeps the worker's Python busy for longer than twice the heartbeat timeout
    busy_seconds = 2.5 * brokest.HEARTBEAT_TIMEOUT_MS / 1000
    assert make_client(worker.address).queue(keep_python_busy, busy_seconds) == "done"


def test_call_with_no_worker_listening_times_out(make_client):
    client = make_client(f"tcp://127.0.0.1:{free_port()}", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.queue(add, 1, 2)
    assert time.monotonic() - started < 1.5


def test_call_with_no_worker_waits_with_a_warning_until_one_comes_up(
        start_worker, make_client, caplog):
    port = free_port()
    task = make_client(f"tcp://127.0.0.1:{port}").submit(add, 1, 2)  # no timeout
    with caplog.at_level(logging.WARNING, logger="brokest"):
        wait_until(lambda: f"waiting for a worker to come up at tcp://127.0.0.1:{port}" in caplog.text)
    start_worker("--port", str(port))
    assert task.result(timeout=10) == 3


def test_worker_restarted_on_the_same_port_is_used_again(start_worker, make_client):
    first = start_worker()
    client = make_client(first.address, timeout=10)
    assert client.queue(identify, 0)[0] == first.pid
    first.stop()
    second = start_worker("--port", first.address.rsplit(":", 1)[1])
    assert client.queue(identify, 0)[0] == second.pid


def test_retries_send_a_lost_task_to_another_worker(two_workers, make_client, tmp_path):
    client = make_client([w.address for w in two_workers], retries=1)
    pids = {w.pid: w for w in two_workers}
    survivor = client.queue(die_the_first_time, tmp_path / "died")
    assert survivor in pids
    [died] = [w for pid, w in pids.items() if pid != survivor]
    assert died.wait_for_log("was killed by SIGKILL")


def test_task_that_raised_is_never_retried(two_workers, make_client, tmp_path):
    client = make_client([w.address for w in two_workers], retries=2)
    with pytest.raises(ValueError):
        client.queue(count_the_run_then_fail, tmp_path / "runs")
    assert (tmp_path / "runs").read_text() == "run\n"


# --- A worker survives its tasks: time limits and supervision ---

@pytest.mark.parametrize("task, args", [(spin_then_note_the_finally, ()),
                                        (sleep_then_note_the_finally, (60,))],
                         ids=["python-loop", "sleep"])
def test_task_past_the_timeout_is_stopped_inside_and_the_worker_serves_on(
        worker, make_client, tmp_path, task, args):
    client = make_client(worker.address, timeout=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="time limit"):  # the worker's own TimeoutError
        client.queue(task, tmp_path / "finally", *args)
    assert time.monotonic() - started < 2
    assert (tmp_path / "finally").read_text() == "finally ran"
    started = time.monotonic()
    assert client.queue(identify, 0)[0] == worker.pid  # the same process, at once
    assert time.monotonic() - started < 1


def test_worker_time_limit_stops_tasks_of_a_client_without_a_timeout(start_worker, make_client,
                                                                     tmp_path):
    worker = start_worker("--time-limit", "1")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        make_client(worker.address).queue(sleep_then_note_the_finally, tmp_path / "finally", 60)
    assert time.monotonic() - started < 2
    assert make_client(worker.address).queue(add, 1, 2) == 3


@pytest.mark.parametrize("task, args", [(swallow_every_timeout, ()),
                                        (hold_the_gil, (10**11,))],
                         ids=["swallows-timeout-error", "stuck-in-c-code"])
def test_task_that_runs_on_past_its_limit_is_killed_and_its_port_serves_again(
        worker, make_client, task, args):
    client = make_client(worker.address, timeout=1)
    started, old_pid = time.monotonic(), worker.pid
    with pytest.raises((TimeoutError, brokest.WorkerLost)):
        client.queue(task, *args)
    new_pid = worker.wait_for_new_worker(worker.address, old_pid)
    assert client.queue(identify, 0)[0] == new_pid
    assert time.monotonic() - started < 1 + 4  # within 4 s of the limit
    assert worker.wait_for_log(f"worker {old_pid} on port .* ran past its hard time limit; aborting it")
    assert worker.wait_for_log(f"line \\d+ in {task.__name__}")  # faulthandler: where it was stuck
    assert worker.wait_for_log(f"worker {old_pid} on port .* was killed by SIGABRT")


def test_stubborn_task_raises_timeout_error_and_is_never_retried(worker, make_client, tmp_path):
    # the client gives up at its timeout + 0.5 s, before the worker is ended (limit + 2 s) and
    # before that loss could look like a WorkerLost worth retrying
    runs, old_pid = tmp_path / "runs", worker.pid
    with pytest.raises(TimeoutError):
        make_client(worker.address, timeout=1, retries=2).queue(swallow_every_timeout, runs)
    worker.wait_for_new_worker(worker.address, old_pid)  # it was ended, as it should be
    assert runs.read_text() == "run\n"


def test_task_holding_the_gil_without_a_limit_runs_to_its_end(worker, make_client):
    # longer than the heartbeat timeout; libzmq's I/O thread answers heartbeats meanwhile
    assert make_client(worker.address).queue(hold_the_gil, GIL_HOLDING_COUNT) == GIL_HOLDING_COUNT


def test_task_that_timed_out_is_never_retried(worker, make_client, tmp_path):
    client = make_client(worker.address, timeout=0.5, retries=2)
    with pytest.raises(TimeoutError):
        client.queue(count_the_run_then_sleep, tmp_path / "runs", 60)
    assert (tmp_path / "runs").read_text() == "run\n"


@pytest.mark.parametrize("how, logged", [("os._exit", "exited with status 3"),
                                         ("segfault", "was killed by SIGSEGV"),
                                         ("SIGKILL", "was killed by SIGKILL")])
def test_dead_worker_is_replaced_on_its_port_and_its_sibling_is_untouched(
        start_worker, make_client, tmp_path, how, logged):
    workers = start_worker("--processes", "2", workers=2)
    doomed, sibling = workers.addresses
    doomed_pid, sibling_pid = workers.pid_on(doomed), workers.pid_on(sibling)
    client = make_client(doomed)
    if how == "SIGKILL":
        task = client.submit(touch_then_sleep, tmp_path / "started", 60)
        wait_until((tmp_path / "started").exists)
        os.kill(doomed_pid, signal.SIGKILL)
    else:
        task = client.submit(exit_at_once, 3) if how == "os._exit" else client.submit(segfault)
    with pytest.raises(brokest.WorkerLost):
        task.result(timeout=5)
    lost = time.monotonic()
    new_pid = workers.wait_for_new_worker(doomed, doomed_pid)
    assert make_client(doomed, timeout=5).queue(identify, 0)[0] == new_pid
    assert time.monotonic() - lost < 2
    assert make_client(sibling, timeout=5).queue(identify, 0)[0] == sibling_pid
    assert workers.wait_for_log(f"worker {doomed_pid} on port {doomed.rsplit(':', 1)[1]} {logged}")


def test_workers_of_a_killed_supervisor_exit_by_themselves(start_worker):
    workers = start_worker("--processes", "2", workers=2)
    pids = [workers.pid_on(address) for address in workers.addresses]
    workers.process.kill()  # SIGKILL: the supervisor can neither stop nor replace them
    wait_until(lambda: all(parent_of(pid) is None for pid in pids), timeout=8)


def test_a_port_that_cannot_be_bound_ends_the_cli_with_status_2_naming_it():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(HERE / "brokest.py"), "--port", str(port)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_a_port_range_names_the_workers_of_processes(start_worker, make_client, tmp_path):
    port = free_ports(3)
    workers = start_worker("--port", str(port), "--processes", "3", workers=3)
    client = make_client(f"tcp://127.0.0.1:{port}-{port + 2}", timeout=20)
    assert client.addresses == [f"tcp://127.0.0.1:{p}" for p in range(port, port + 3)]
    pids = list(client.map(sleep_then_return, [0.3] * 9, range(9)))
    assert pids == list(range(9))
    assert len(workers.wait_for_log(r"sleep_then_return [\d.]+ ms ok", count=9)) == 9
    served = {line.split("brokest[")[1].split("]")[0] for line in workers.log
              if "sleep_then_return" in line}
    assert served == {str(workers.pid_on(address)) for address in workers.addresses}


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:9093-9090", "tcp://127.0.0.1:a-b"])
def test_a_malformed_port_range_is_a_value_error(address):
    with pytest.raises(ValueError, match="port range"):
        brokest.Client(address)


# --- A pool that runs for months: recycling, rolling restarts, forks ---

def test_supervisor_logs_its_pid_and_ports_when_it_starts(start_worker):
    workers = start_worker("--processes", "2", workers=2)
    [line] = workers.wait_for_log(r"supervisor \d+ serving ports")
    assert f"supervisor {workers.process.pid} serving ports" in line
    assert all(address.rsplit(":", 1)[1] in line for address in workers.addresses)


def test_recycled_workers_lose_no_call_and_run_none_twice(start_worker, make_client, tmp_path):
    # two Clients, 300 calls each, on two workers that retire after 7 tasks; no retries
    workers = start_worker("--processes", "2", "--max-tasks", "7", workers=2)
    runs = tmp_path / "runs"

    def record(tag):  # sent by value: a fresh worker has nothing to import for it
        with open(runs, "a") as file:
            file.write(f"{tag} {os.getpid()}\n")
        return tag

    def calls(client, name):
        return list(client.map(record, [f"{name}-{n}" for n in range(300)], timeout=120))

    clients = [make_client(workers.addresses, timeout=30) for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as callers:
        results = list(callers.map(calls, clients, "ab"))
    assert results == [[f"{name}-{n}" for n in range(300)] for name in "ab"]
    tags, pids = zip(*(line.split() for line in runs.read_text().splitlines()))
    assert sorted(tags) == sorted(results[0] + results[1])  # each call ran exactly once
    assert max(collections.Counter(pids).values()) <= 7 and len(set(pids)) >= 600 // 7


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
def test_max_tasks_1_serves_each_call_in_a_fresh_process_without_delay(start_worker, make_client, key):
    # keyed: each successor is reached through a CurveZMQ handshake of its own
    workers = start_worker("--max-tasks", "1", env={"BROKEST_KEY": key} if key else {})
    client = make_client(workers.address, key=key, timeout=10)
    started = time.monotonic()
    pids = [client.queue(os.getpid) for _ in range(12)]
    assert len(set(pids)) == 12
    assert time.monotonic() - started < 8
    assert workers.wait_for_log(r"worker \d+ on port \d+ retired; starting another in 0.0 s", count=12)


def test_max_memory_recycles_a_worker_that_grew_past_it_and_keeps_one_that_did_not(
        start_worker, make_client):
    workers = start_worker("--max-memory", "150")
    client = make_client(workers.address, timeout=20)

    def allocate(megabytes):  # sent by value: nothing to import
        return len(b"x" * (megabytes << 20)) and os.getpid()

    first = client.queue(allocate, 1)
    assert client.queue(allocate, 1) == first  # far below the limit: the same process serves on
    assert client.queue(allocate, 200) == first  # above it: the process retires after this task
    assert client.queue(allocate, 1) != first
    assert workers.wait_for_log(f"worker {first} retiring after 3 tasks, peak memory")


@pytest.mark.parametrize("option", ["--max-tasks", "--max-memory"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_tasks_or_memory_below_one_ends_the_cli_with_status_2(option, value):
    result = subprocess.run([sys.executable, str(HERE / "brokest.py"), "--port", "0", option, value],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "must be at least 1" in result.stderr


def test_sighup_restarts_every_worker_after_its_task_and_no_call_fails(start_worker, make_client,
                                                                       tmp_path):
    # two workers: one runs a 2 s task, the other a stream of quick calls, when SIGHUP comes
    workers = start_worker("--processes", "2", workers=2)
    old_pids = {address: workers.pid_on(address) for address in workers.addresses}
    client = make_client(workers.addresses, timeout=30)
    slow = client.submit(sleep_then_return_after_touching, tmp_path / "started", 2, "slow")
    wait_until((tmp_path / "started").exists)
    answered, stop = [], threading.Event()

    def stream():
        while not stop.is_set():
            answered.append(client.queue(os.getpid))

    with concurrent.futures.ThreadPoolExecutor(1) as streamer:
        streaming = streamer.submit(stream)
        wait_until(lambda: len(answered) > 10)
        workers.process.send_signal(signal.SIGHUP)
        new_pids = {workers.wait_for_new_worker(address, pid) for address, pid in old_pids.items()}
        wait_until(lambda: new_pids & set(answered[-5:]))  # the stream goes on, on new processes
        stop.set()
        streaming.result(timeout=10)  # raises what any call of the stream raised
    assert slow.result(timeout=10) == "slow"
    assert workers.process.poll() is None  # the supervisor stays


def test_sighup_makes_the_workers_import_a_changed_module_afresh(start_worker, make_client, tmp_path,
                                                                 monkeypatch):
    module = tmp_path / "task_that_changes.py"
    module.write_text("def version():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import task_that_changes
    workers = start_worker(env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}",
                                "PYTHONDONTWRITEBYTECODE": "1"})
    client = make_client(workers.address, timeout=10)
    assert client.queue(task_that_changes.version) == 1
    module.write_text("def version():\n    return 2\n")
    old_pid = workers.pid
    workers.process.send_signal(signal.SIGHUP)
    workers.wait_for_new_worker(workers.address, old_pid)
    assert client.queue(task_that_changes.version) == 2


def test_a_worker_sent_sigterm_loses_none_of_the_requests_queued_at_it(start_worker, make_client,
                                                                        tmp_path):
    # one worker runs a 1 s task; three other Clients queue a call each behind it; no retries
    workers = start_worker()
    old_pid, runs = workers.pid, tmp_path / "runs"
    busy = make_client(workers.address).submit(sleep_then_return_after_touching,
                                               tmp_path / "started", 1, "busy")
    wait_until((tmp_path / "started").exists)
    queued = [make_client(workers.address).submit(record_the_run, runs, n) for n in range(3)]
    os.kill(old_pid, signal.SIGTERM)
    assert busy.result(timeout=10) == "busy"  # the running task finishes and answers
    assert sorted(call.result(timeout=20) for call in queued) == [0, 1, 2]
    new_pid = workers.wait_for_new_worker(workers.address, old_pid)
    assert sorted(runs.read_text().splitlines()) == [f"{n} {new_pid}" for n in range(3)]  # once each
    assert workers.wait_for_log(f"worker {old_pid} on port \\d+ retired")


FORKED_QUEUE = """
import multiprocessing, brokest

def remote_abs(n):
    return brokest.queue(abs, n)

print(remote_abs(-1))
with multiprocessing.get_context("fork").Pool(2) as pool:
    print(pool.map(remote_abs, [-2, -3, -4]))
"""


def test_queue_works_in_processes_forked_after_the_parent_used_it(worker):
    result = subprocess.run([sys.executable, "-c", FORKED_QUEUE], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "BROKEST_ADDRESS": worker.address})
    assert result.stdout.splitlines() == ["1", "[2, 3, 4]"], result.stderr


FORKED_CLIENT = """
import os, sys, brokest
client = brokest.Client(sys.argv[1], timeout=10)
print(client.queue(abs, -1))
child = os.fork()
if child == 0:
    try:
        {call}
    except RuntimeError as error:
        print("the child:", error)
    os._exit(0)
os.waitpid(child, 0)
print(client.queue(abs, -3))
"""


@pytest.mark.parametrize("call", ["client.queue(abs, -2)", "client.submit(abs, -2).result(5)",
                                  "list(client.map(abs, [-2]))"])
def test_a_client_carried_into_a_forked_child_says_to_make_one_there(worker, call):
    result = subprocess.run([sys.executable, "-c", FORKED_CLIENT.format(call=call), worker.address],
                            capture_output=True, text=True, timeout=60, cwd=HERE)
    lines = result.stdout.splitlines()
    assert lines[0] == "1" and lines[2] == "3", result.stderr
    assert lines[1].startswith("the child: this Client was made in process")
    assert lines[1].endswith("make a Client in this process")


@pytest.mark.cpu_cost
def test_a_time_limit_costs_the_worker_at_most_15_microseconds_of_cpu_per_task():
    # Worker.answer(), the worker's whole handling of a request, on the same no-op request
    # with and without a time limit, in turns of alternating order, in this process's main
    # thread (where SIGALRM's handler runs), timed by its own CPU clock: no scheduling noise.
    worker, function = brokest.Worker(port=0), cloudpickle.dumps(abs)
    requests = {name: brokest.pack_message(None, b"id", function, ([((-1,), {})], limit))
                for name, limit in [("limit", 60.0), ("none", None)]}
    per_task = {name: [] for name in requests}
    previous = signal.signal(signal.SIGALRM, brokest.raise_time_limit)
    try:
        for round in range(10):
            for name in ["limit", "none"] if round % 2 else ["none", "limit"]:
                started = time.thread_time()
                for _ in range(2000):
                    worker.answer(requests[name])
                per_task[name].append((time.thread_time() - started) / 2000)
    finally:
        signal.signal(signal.SIGALRM, previous)
    extra = statistics.median(per_task["limit"]) - statistics.median(per_task["none"])
    assert extra < 15e-6, f"a time limit costs {extra * 1e6:.1f} us of worker CPU per task"


# --- Bad input never kills a worker ---

@pytest.mark.parametrize("frames", [
    [b"garbage"],
    [b"", b"request-id", pickle.dumps(add)],
    [b"", b"request-id", pickle.dumps(add), pickle.dumps(([((1, 2), {})], None))[:-5]],
    [b"", b"request-id", pickle.dumps(add), pickle.dumps(RaisesWhenUnpickled())],
    [b"", b"request-id", pickle.dumps(add), pickle.dumps("not a call")],
    [b"", b"request-id", pickle.dumps(RaisesWhenUnpickled()), pickle.dumps(([((1, 2), {})], None))],
    [b"", b"request-id", pickle.dumps(add), pickle.dumps(([((1, 2), {})], "soon"))],
], ids=["one-garbage-frame", "too-few-frames", "truncated-pickle", "raises-while-loading",
        "not-a-call", "function-raises-while-loading", "time-limit-not-a-number"])
def test_bad_request_gets_an_error_reply_and_the_worker_keeps_serving(worker, make_client, frames):
    request_id, _, [(kind, message)] = brokest.unpack_message(None, raw_request(worker.address, frames))
    assert kind == "error" and message.startswith("request rejected")
    assert worker.wait_for_log("rejected a request")
    assert make_client(worker.address, timeout=10).queue(add, 1, 2) == 3


# --- Keys and signatures ---

@pytest.mark.parametrize("signature", [b"", b"\x00" * 32, b"wrong signature"])
def test_request_with_a_bad_signature_is_never_unpickled(start_worker, make_client, tmp_path,
                                                         signature):
    worker = start_worker(env={"BROKEST_KEY": KEY})
    marker = tmp_path / "unpickled"
    reply = raw_request(worker.address, [signature, b"id", pickle.dumps(add),
                                         pickle.dumps(CreatesFileWhenUnpickled(marker))], key=KEY)
    _, _, [(kind, message)] = brokest.unpack_message(KEY.encode(), reply)
    assert kind == "error" and "signature did not verify" in message
    assert not marker.exists()
    assert make_client(worker.address, key=KEY, timeout=10).queue(add, 1, 2) == 3


def test_request_signed_with_another_key_is_never_unpickled(start_worker, tmp_path):
    worker = start_worker(env={"BROKEST_KEY": KEY})
    marker = tmp_path / "unpickled"
    forged = brokest.pack_message(b"another key", b"id", pickle.dumps(add), CreatesFileWhenUnpickled(marker))
    _, _, [(kind, message)] = brokest.unpack_message(KEY.encode(), raw_request(worker.address, forged, key=KEY))
    assert kind == "error" and "signature did not verify" in message
    assert not marker.exists()


@pytest.mark.parametrize("client_key, worker_key", [("not the key", KEY), (None, KEY), (KEY, None)],
                         ids=["wrong-key", "no-key", "keyed-client-unkeyed-worker"])
def test_mismatched_keys_fail_the_handshake_quickly_and_nothing_runs(
        start_worker, make_client, tmp_path, client_key, worker_key):
    worker = start_worker(env={"BROKEST_KEY": worker_key} if worker_key else {})
    started = time.monotonic()
    with pytest.raises(brokest.AuthenticationError, match="do both ends use the same key"):
        make_client(worker.address, key=client_key).queue(Path.touch, tmp_path / "ran")  # no timeout
    assert time.monotonic() - started < 5
    assert not (tmp_path / "ran").exists()
    # the worker serves on, for a client with the right key
    assert make_client(worker.address, key=worker_key, timeout=10).queue(add, 1, 2) == 3


def test_submit_and_map_fail_the_same_way_with_the_wrong_key(start_worker, make_client):
    worker = start_worker(env={"BROKEST_KEY": KEY})
    client = make_client(worker.address, key="not the key")
    with pytest.raises(brokest.AuthenticationError):
        client.submit(add, 1, 2).result(timeout=5)
    with pytest.raises(brokest.AuthenticationError):
        list(client.map(add, [1], [2], timeout=5))


def test_key_file_sets_the_worker_key_with_whitespace_stripped(start_worker, make_client, tmp_path):
    (tmp_path / "key").write_text(f"  {KEY}\n")
    worker = start_worker("--key-file", str(tmp_path / "key"))
    assert make_client(worker.address, key=KEY.encode()).queue(add, 1, 2) == 3


def test_impostor_without_the_key_never_receives_a_keyed_clients_request(make_client):
    # a plain REP socket posing as a worker, listening where the client expects its worker
    impostor = zmq.Context.instance().socket(zmq.REP)
    impostor.linger = 0
    port = impostor.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(brokest.AuthenticationError):
            make_client(f"tcp://127.0.0.1:{port}", key=KEY).queue(add, 1, 2)  # no timeout
        assert not impostor.poll(500)
    finally:
        impostor.close()


@pytest.mark.parametrize("signature", [b"", b"\x00" * 32])
def test_rogue_worker_cannot_make_a_keyed_client_unpickle_its_reply(make_client, tmp_path, signature):
    # a REP socket holding the worker's CURVE key answers with a badly signed malicious pickle
    marker = tmp_path / "unpickled"
    rogue = zmq.Context.instance().socket(zmq.REP)
    rogue.linger = 0
    curve_server(rogue, KEY)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")

    def answer_once():
        request = rogue.recv_multipart()
        rogue.send_multipart([signature, request[1], b"", pickle.dumps(CreatesFileWhenUnpickled(marker))])

    thread = threading.Thread(target=answer_once)
    thread.start()
    try:
        with pytest.raises(brokest.AuthenticationError):
            make_client(f"tcp://127.0.0.1:{port}", key=KEY, timeout=10).queue(add, 1, 2)
    finally:
        thread.join(timeout=10)
        rogue.close()
    assert not marker.exists()


@pytest.mark.parametrize("argument", [SECRET, SECRET * (1 << 20 // len(SECRET))],
                         ids=["small", "1-MB"])
def test_without_a_key_the_wire_shows_arguments_and_results(worker, make_client, argument):
    relay = RecordingRelay(int(worker.address.rsplit(":", 1)[1]))
    try:
        assert make_client(relay.address, timeout=10).queue(tag_the_secret, argument).endswith(RESULT_TAG)
    finally:
        relay.close()
    assert SECRET in b"".join(relay.sent) and b"tag_the_secret" in b"".join(relay.sent)
    assert RESULT_TAG in b"".join(relay.received)


@pytest.mark.parametrize("argument", [SECRET, SECRET * (1 << 20 // len(SECRET))],
                         ids=["small", "1-MB"])
def test_with_a_key_the_wire_shows_no_argument_result_or_function_name(start_worker, make_client,
                                                                       argument):
    worker = start_worker(env={"BROKEST_KEY": KEY})
    relay = RecordingRelay(int(worker.address.rsplit(":", 1)[1]))
    try:
        client = make_client(relay.address, key=KEY, timeout=10)
        assert client.queue(tag_the_secret, argument).endswith(RESULT_TAG)
    finally:
        relay.close()
    wire = b"".join(relay.sent + relay.received)
    assert len(wire) > len(argument)
    assert SECRET not in wire and RESULT_TAG not in wire and b"tag_the_secret" not in wire


@pytest.mark.parametrize("size", [0, 1 << 20], ids=["small", "1-MiB"])
def test_recorded_request_sent_again_on_new_connections_runs_nothing(start_worker, make_client,
                                                                     tmp_path, size):
    worker = start_worker(env={"BROKEST_KEY": KEY})
    port = int(worker.address.rsplit(":", 1)[1])
    relay = RecordingRelay(port)
    try:
        make_client(relay.address, key=KEY, timeout=10).queue(log_the_run, tmp_path / "runs")
    finally:
        relay.close()
    [recorded] = relay.sent
    recorded += os.urandom(size)  # a 1 MiB argument would have followed; CurveZMQ refuses first
    for _ in range(2):
        send_raw_bytes(port, bytes(recorded))  # returns once the worker has hung up on us
    assert make_client(worker.address, key=KEY, timeout=10).queue(add, 1, 2) == 3
    assert (tmp_path / "runs").read_text() == "run\n"


def test_without_a_key_a_recorded_request_does_run_again(worker, make_client, tmp_path):
    # the control for the test above: the recording and the replay are real
    port = int(worker.address.rsplit(":", 1)[1])
    relay = RecordingRelay(port)
    try:
        make_client(relay.address, timeout=10).queue(log_the_run, tmp_path / "runs")
    finally:
        relay.close()
    threading.Thread(target=send_raw_bytes, args=(port, bytes(relay.sent[0])), daemon=True).start()
    wait_until(lambda: (tmp_path / "runs").read_text() == "run\nrun\n")


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "unkeyed"])
def test_client_is_served_again_each_time_its_worker_is_replaced(start_worker, make_client,
                                                                 tmp_path, key):
    worker = start_worker(env={"BROKEST_KEY": key} if key else {})
    client = make_client(worker.address, key=key, timeout=10)  # never told the key is wrong
    for round in range(3):
        old_pid = worker.pid
        busy = client.submit(touch_then_sleep, tmp_path / str(round), 60)
        wait_until((tmp_path / str(round)).exists)
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(brokest.WorkerLost):
            busy.result(timeout=5)
        assert client.queue(identify, round)[0] == worker.wait_for_new_worker(worker.address, old_pid)


def test_worker_serves_on_after_failed_handshakes_and_garbage(start_worker, make_client):
    worker = start_worker(env={"BROKEST_KEY": KEY})
    port = int(worker.address.rsplit(":", 1)[1])
    send_raw_bytes(port, b"GET / HTTP/1.0\r\n\r\n")
    send_raw_bytes(port, os.urandom(4096))
    for wrong in ["not the key", None]:
        with pytest.raises(brokest.AuthenticationError):
            make_client(worker.address, key=wrong).queue(add, 1, 2)
    assert make_client(worker.address, key=KEY, timeout=10).queue(add, 1, 2) == 3
    assert worker.process.poll() is None and len(worker.listening) == 1  # never restarted


def test_worker_refuses_a_public_host_without_a_key():
    with pytest.raises(ValueError, match="--insecure"):
        brokest.Worker(host="0.0.0.0")
    brokest.Worker(host="0.0.0.0", key=KEY)
    brokest.Worker(host="0.0.0.0", insecure=True)


def test_cli_refuses_a_public_host_without_a_key_and_says_what_to_do():
    result = subprocess.run([sys.executable, str(HERE / "brokest.py"), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "BROKEST_KEY"})
    assert result.returncode == 2
    assert "--key-file" in result.stderr and "--insecure" in result.stderr


@pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("ip")),
                    reason="needs unshare and ip for a private network namespace")
def test_cli_serves_a_public_host_with_insecure():
    # in a network namespace of its own, 0.0.0.0 reaches nobody but this test
    script = (
        "import subprocess, sys, brokest\n"
        f"worker = subprocess.Popen([sys.executable, {str(HERE / 'brokest.py')!r}, '--host', "
        "'0.0.0.0', '--port', '0', '--insecure'], stderr=subprocess.PIPE, text=True)\n"
        "line = next(line for line in worker.stderr if 'listening on' in line)\n"
        "port = line.rsplit(':', 1)[1].strip()\n"
        "print(brokest.Client('tcp://127.0.0.1:' + port, timeout=5).queue(abs, -7))\n"
        "worker.terminate(); worker.wait(5)\n")
    result = subprocess.run(
        ["unshare", "--net", "--map-root-user", "sh", "-c",
         f'ip link set lo up && exec "{sys.executable}" -c "$0"', script],
        capture_output=True, text=True, timeout=30, cwd=HERE)
    if result.returncode and "Operation not permitted" in result.stderr:
        pytest.skip("this machine does not allow network namespaces")
    assert result.stdout.strip() == "7", result.stderr


# --- The demo ---

def test_app_runs_out_of_the_box():
    result = subprocess.run([sys.executable, str(HERE / "app.py")], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "primes below 100: 25" in result.stdout and "TypeError" in result.stdout


def test_app_stops_its_workers_on_ctrl_c():
    app = subprocess.Popen([sys.executable, str(HERE / "app.py")], stdout=subprocess.PIPE,
                           text=True, stdin=subprocess.DEVNULL)
    try:
        first_line = app.stdout.readline()  # its workers answered the first queue()
        assert first_line.startswith("primes below 100")
        workers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                   if parent_of(pid) == app.pid]
        assert len(workers) == 2
        app.send_signal(signal.SIGINT)
        app.wait(timeout=30)
    finally:
        app.kill()
        app.wait()
    # orphans would live on under another parent: the workers must be gone altogether
    try:
        wait_until(lambda: all(parent_of(pid) is None for pid in workers))
    finally:
        for pid in filter(parent_of, workers):
            os.kill(pid, signal.SIGKILL)


def children_of(pid):
    """Return the pids of a running process's children."""
    return [int(child) for task in os.listdir(f"/proc/{pid}/task")
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]


def parent_of(pid):
    """Return the parent pid of a running process, or None when it is not running."""
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return None
    return None if state == "Z" else int(parent)
