"""brokest's behaviour, one test per sentence, in the order of the README.

Every test talks to real worker processes (`python brokest.py`, started by conftest.py) on
127.0.0.1 over real sockets; faults are real too: workers are killed and frozen by their pid.
Task functions are pickled by reference: the workers import them from this file.
"""

import asyncio
import collections
import concurrent.futures
import gc
import itertools
import logging
import os
import pickle
import pty
import re
import select
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

import brokest
from conftest import (
    BROKEST,
    HERE,
    RecordingRelay,
    curve_server,
    free_port,
    free_ports,
    parent_of,
    raw_request,
    read_reply,
    send_raw_bytes,
    wait_until,
)

KEY = "test-key-5f1c2a"


def add(a, b):
    return a + b


# --- One call: queue() ---


def test_queue_returns_the_function_result(worker, make_client):
    assert make_client(worker.address).queue(add, 2, b=40) == 42


def test_module_level_queue_uses_the_workers_and_key_named_in_the_environment(start_worker):
    # the key as a file holds it, newline and all; one address without tcp://
    workers = [start_worker(env={"BROKEST_KEY": KEY}) for _ in range(2)]
    addresses = [workers[0].address, workers[1].address.removeprefix("tcp://")]
    # until both have answered: a worker whose handshake is not done yet is looked at again
    # 100 ms later, and quick calls meanwhile go to the other
    script = (
        "import os, brokest\n"
        "pids = {brokest.queue(os.getpid)}\n"
        "for _ in range(2000):\n"
        "    if len(pids) == 2:\n"
        "        break\n"
        "    pids.add(brokest.queue(os.getpid))\n"
        "print(sorted(pids))\n"
    )
    env = {
        **os.environ,
        "BROKEST_ADDRESS": ",".join(addresses),
        "BROKEST_KEY": KEY + "\n",
        "BROKEST_TIMEOUT": "10",
        "PYTHONPATH": str(HERE),
    }
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == str(sorted(w.pid for w in workers)), run.stderr


def test_importing_brokest_opens_no_socket():
    script = (
        "import os; before = len(os.listdir('/proc/self/fd')); import brokest; "
        "print(len(os.listdir('/proc/self/fd')) - before)"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True)
    assert run.stdout.strip() == "0", run.stderr


# --- Errors come home ---


def divide(a, b):
    return a / b


def call_sys_exit(code):
    sys.exit(code)


def return_a_lock():
    return threading.Lock()


def raise_with_a_lock():
    raise ValueError("holds a lock", threading.Lock())


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
    with pytest.raises(brokest.RemoteError, match="raised ValueError, which could not be pickled"):
        client.queue(raise_with_a_lock)
    with pytest.raises(brokest.RemoteError, match="in raise_with_a_lock"):
        client.queue(raise_with_a_lock)
    assert client.queue(add, 1, 1) == 2


def test_function_from_a_module_the_worker_lacks_gets_an_error_saying_how_to_fix_it(
    worker, make_client, tmp_path, monkeypatch
):
    (tmp_path / "only_in_the_client.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_in_the_client

    client = make_client(worker.address)
    fix = r"register_pickle_by_value\(only_in_the_client\)"
    with pytest.raises(brokest.RemoteError, match=fix):
        client.queue(only_in_the_client.double, 2)
    assert client.queue(add, 1, 1) == 2


def test_module_registered_to_travel_by_value_needs_no_install_on_the_worker(
    worker, make_client, tmp_path, monkeypatch
):
    (tmp_path / "sent_by_value.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sent_by_value

    cloudpickle.register_pickle_by_value(sent_by_value)
    try:
        client = make_client(worker.address)
        assert client.queue(sent_by_value.triple, 2) == 6
        assert client.queue(list, map(sent_by_value.triple, [1])) == [3]  # as an argument too
    finally:
        cloudpickle.unregister_pickle_by_value(sent_by_value)


class Point:
    """A class from the test module, which the workers import by name."""

    def __init__(self, x):
        self.x = x


def test_lambdas_closures_and_classes_from_main_travel_by_value(worker, make_client, monkeypatch):
    offset = 10
    client = make_client(worker.address)
    assert client.queue(lambda x: x + offset, 1) == 11
    # a class of the calling script (__main__), which plain pickle would name, not send: the
    # worker's __main__ is brokest.py
    in_main = type("InMain", (), {"__module__": "__main__", "value": 7})
    monkeypatch.setattr(sys.modules["__main__"], "InMain", in_main, raising=False)
    assert client.queue(getattr, in_main(), "value") == 7
    assert client.queue(Point, 3).x == 3  # and a class the worker imports by name


# --- The worker's log ---


def test_worker_logs_each_task_at_debug_with_name_duration_and_status(start_worker, make_client):
    worker = start_worker("-v")
    client = make_client(worker.address)
    client.queue(add, 1, 2)
    with pytest.raises(ZeroDivisionError):
        client.queue(divide, 1, 0)
    assert worker.wait_for_log(r"add [\d.]+ ms ok")
    assert worker.wait_for_log(r"divide [\d.]+ ms error ZeroDivisionError")


def test_at_default_verbosity_a_worker_logs_its_lifecycle_but_no_line_per_task(
    worker, make_client
):
    assert make_client(worker.address).queue(add, 1, 2) == 3
    os.kill(worker.pid, signal.SIGTERM)
    worker.wait_for_log("stopped")
    assert not [line for line in worker.log if re.search(r"add [\d.]+ ms", line)]


# --- Large buffers travel as frames of their own ---


def echo(value):
    return value


def test_large_bytes_travel_as_their_own_frame_without_a_copy():
    payload = b"x" * (1 << 20)
    call = (b"id", [((brokest.out_of_band(payload),), {})], None)
    frames = brokest.pack(None, [b"function"], call)
    assert len(frames) == 4 and frames[3].obj is payload and len(frames[2]) < 1000


def test_numpy_arrays_travel_as_their_own_frame_without_a_copy():
    numpy = pytest.importorskip("numpy")
    array = numpy.arange(1 << 18)
    frames = brokest.pack(None, [b"function"], (b"id", [((array,), {})], None))
    assert len(frames) == 4
    assert numpy.shares_memory(array, numpy.frombuffer(frames[3], dtype=array.dtype))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_large_bytes_like_values_come_back_as_the_same_type(worker, make_client, kind):
    value = kind(os.urandom(1 << 20))
    result = make_client(worker.address).queue(echo, value)
    assert type(result) is kind and bytes(result) == bytes(value)


def test_a_function_that_closes_over_an_array_travels_whole(worker, make_client):
    numpy = pytest.importorskip("numpy")
    array = numpy.arange(1 << 16)
    assert make_client(worker.address).queue(lambda: int(array.sum())) == int(array.sum())


def test_numpy_array_comes_back_equal_and_writable(worker, make_client):
    numpy = pytest.importorskip("numpy")
    array = numpy.arange(1 << 18, dtype=numpy.float64).reshape(512, 512)
    result = make_client(worker.address).queue(echo, array)
    assert (result == array).all() and result.flags.writeable


# --- A Client of several workers: submit, map, threads ---


def identify(x):
    return os.getpid(), x


def sleep_then_return(seconds, value):
    time.sleep(seconds)
    return value


def sleep_then_return_after_touching(path, seconds, value):
    Path(path).touch()
    time.sleep(seconds)
    return value


def meet_then_return_pid(directory, expected):
    """Announce this worker in directory, wait until `expected` workers have, return the pid."""
    Path(directory, str(os.getpid())).touch()
    deadline = time.monotonic() + 10
    while len(os.listdir(directory)) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError("the other worker never started its task")
        time.sleep(0.01)
    return os.getpid()


def test_submit_returns_futures_that_work_with_as_completed(worker, make_client):
    client = make_client(worker.address)
    futures = [client.submit(add, n, 1) for n in range(5)]
    done = concurrent.futures.as_completed(futures, timeout=20)
    assert sorted(future.result() for future in done) == [1, 2, 3, 4, 5]


def test_client_works_with_asyncio_run_in_executor(worker, make_client):
    client = make_client(worker.address)

    async def main():
        return await asyncio.get_running_loop().run_in_executor(client, add, 20, 22)

    assert asyncio.run(main()) == 42


def test_map_runs_on_two_workers_at_once(two_workers, make_client, tmp_path):
    client = make_client([w.address for w in two_workers], timeout=20)
    pids = list(client.map(meet_then_return_pid, [tmp_path] * 2, [2, 2]))
    assert sorted(pids) == sorted(w.pid for w in two_workers)


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


def test_client_refuses_tasks_after_shutdown(worker):
    client = brokest.Client(worker.address)
    client.shutdown()
    with pytest.raises(RuntimeError):
        client.submit(add, 1, 2)
    with pytest.raises(RuntimeError):
        client.queue(add, 1, 2)


def test_shutdown_with_cancel_futures_cancels_what_was_not_sent(worker, make_client, tmp_path):
    # one worker busy for 1 s; five calls wait behind it
    client = make_client(worker.address)
    busy = client.submit(sleep_then_return_after_touching, tmp_path / "started", 1, "busy")
    wait_until((tmp_path / "started").exists)
    waiting = [client.submit(add, n, 0) for n in range(5)]
    client.shutdown(wait=True, cancel_futures=True)
    assert busy.result(timeout=0) == "busy"
    assert all(future.cancelled() for future in waiting)


# --- map: in order, in chunks, at any size ---


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_raises_a_task_exception_at_its_own_place(worker, make_client, chunksize):
    # the third of four calls raises; with chunksize 4 they all travel as one task
    results = make_client(worker.address).map(
        divide, [1, 2, 3, 4], [1, 1, 0, 1], chunksize=chunksize
    )
    assert next(results) == 1.0 and next(results) == 2.0
    with pytest.raises(ZeroDivisionError) as raised:
        next(results)
    assert "in divide" in str(raised.value.__cause__)


def test_map_with_chunks_returns_results_in_order(two_workers, make_client):
    client = make_client([w.address for w in two_workers], timeout=20)
    assert list(client.map(add, range(10), range(10), chunksize=3)) == [2 * n for n in range(10)]


def test_map_with_chunks_stops_at_the_shortest_iterable_and_takes_generators(worker, make_client):
    client = make_client(worker.address, timeout=20)
    results = client.map(add, (n for n in range(7)), iter([10, 20, 30, 40, 50]), chunksize=2)
    assert list(results) == [10, 21, 32, 43, 54]


def test_map_sends_its_chunks_to_all_workers_at_once(two_workers, make_client, tmp_path):
    client = make_client([w.address for w in two_workers], timeout=20)
    pids = list(client.map(meet_then_return_pid, [tmp_path] * 4, [2] * 4, chunksize=2))
    assert pids[0] == pids[1] and pids[2] == pids[3]
    assert {pids[0], pids[2]} == {w.pid for w in two_workers}


@pytest.mark.parametrize("chunksize", [0, -1])
def test_map_refuses_a_chunksize_below_one(worker, make_client, chunksize):
    with pytest.raises(ValueError, match="chunksize"):
        make_client(worker.address).map(add, [1], [2], chunksize=chunksize)


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


def count_the_run_then_sleep(path, seconds):
    with open(path, "a") as runs:
        runs.write("run\n")
    time.sleep(seconds)


@pytest.mark.parametrize(
    "buffersize, how, most", [(None, "del", 3), (2, "close", 2), (2, "del", 2)]
)
def test_a_map_closed_or_dropped_runs_no_more_chunks(
    worker, make_client, tmp_path, buffersize, how, most
):
    # one worker, so chunks run one at a time; with a buffersize the input would go on for ever
    runs = tmp_path / "runs"
    client = make_client(worker.address, timeout=20)
    length = None if buffersize else 20
    arguments = itertools.islice(itertools.repeat(runs), length), itertools.repeat(0.2)
    results = client.map(count_the_run_then_sleep, *arguments, buffersize=buffersize)
    assert next(results) is None  # the first ran; the second may be running
    if how == "close":
        results.close()
    else:
        del results  # the last reference: the generator is closed at once
    client.submit(abs, -1).result(timeout=20)  # queued behind whatever had started
    assert len(runs.read_text().splitlines()) <= most


@pytest.mark.parametrize(
    "buffersize, error, message",
    [
        (1.5, TypeError, "buffersize must be an integer or None"),
        ("2", TypeError, "buffersize must be an integer or None"),
        (0, ValueError, "buffersize must be None or > 0"),
        (-1, ValueError, "buffersize must be None or > 0"),
    ],
)
def test_map_refuses_a_buffersize_as_python_3_14_does(make_client, buffersize, error, message):
    client = make_client(f"tcp://127.0.0.1:{free_port()}")  # map() itself: no worker needed
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


def test_map_reads_buffersize_chunks_at_the_call_then_one_more_as_each_chunk_starts(
    worker, make_client
):
    read = []

    def numbers():
        for n in itertools.count():
            read.append(n)
            yield n

    results = make_client(worker.address, timeout=20).map(
        abs, numbers(), chunksize=3, buffersize=2
    )
    assert len(read) == 6  # two chunks of three, before any result was asked for
    assert next(results) == 0 and len(read) == 9  # the first chunk's results start: one more
    assert [next(results), next(results)] == [1, 2] and len(read) == 9
    assert next(results) == 3 and len(read) == 12


def numbers_then_a_failure(count):
    yield from range(count)
    raise LookupError("the input failed")


@pytest.mark.parametrize("buffersize", [None, 2])
@pytest.mark.parametrize("chunksize, before", [(1, [0, 1, 2, 3, 4]), (2, [0, 1, 2, 3])])
def test_map_raises_an_exception_of_its_input_after_the_results_of_the_chunks_before(
    worker, make_client, buffersize, chunksize, before
):
    # five numbers, then the input raises: it takes the place of the chunk it was reading
    results = make_client(worker.address, timeout=20).map(
        abs, numbers_then_a_failure(5), chunksize=chunksize, buffersize=buffersize
    )
    assert [next(results) for _ in before] == before
    with pytest.raises(LookupError, match="the input failed"):
        next(results)


class Token:
    """A result that a weak reference can follow."""


def make_token(n):
    return Token()


@pytest.mark.parametrize("buffersize", [None, 1])
def test_map_keeps_no_reference_to_a_result_it_yielded(worker, make_client, buffersize):
    # one chunk of three results: the first one yielded must be free, though the chunk is not
    client = make_client(worker.address, timeout=20)
    results = client.map(make_token, range(3), chunksize=3, buffersize=buffersize)
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
        "print(total, (peak_kb() - before) // 1024)\n"
    )
    command = [sys.executable, "-c", script, *(w.address for w in two_workers)]
    run = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=50)
    total, growth_mb = map(int, run.stdout.split())
    assert total == sum(range(3_000_000)) and growth_mb < 30


# --- Addresses ---


def test_addresses_may_be_a_comma_separated_string_or_host_port(two_workers, make_client):
    first, second = (w.address for w in two_workers)
    client = make_client(f" {first} , {second.removeprefix('tcp://')}")
    assert client.addresses == [first, second]
    assert client.queue(add, 1, 2) == 3


def test_a_port_range_names_the_workers_of_processes(start_worker, make_client, tmp_path):
    port = free_ports(3)
    workers = start_worker("--port", str(port), "--processes", "3", workers=3)
    client = make_client(f"127.0.0.1:{port}-{port + 2}", timeout=20)
    assert client.addresses == [f"tcp://127.0.0.1:{p}" for p in range(port, port + 3)]
    served = set(client.map(meet_then_return_pid, [tmp_path] * 3, [3] * 3))
    assert served == {workers.pid_on(address) for address in workers.addresses}


@pytest.mark.parametrize(
    "addresses, named",
    [
        ("tcp://127.0.0.1:9093-9090", "tcp://127.0.0.1:9093-9090"),
        ("tcp://127.0.0.1:a-b", "tcp://127.0.0.1:a-b"),
        ("127.0.0.1", "127.0.0.1"),
        ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
        ("udp://127.0.0.1:9090", "udp://127.0.0.1:9090"),
        (["127.0.0.1:9090", "a host:9091"], "a host:9091"),
    ],
)
def test_an_address_that_cannot_be_used_is_a_value_error_naming_it_and_leaves_nothing(
    addresses, named
):
    threads = threading.active_count()
    files = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match=re.escape(repr(named))):
        brokest.Client(addresses)
    assert threading.active_count() == threads and len(os.listdir("/proc/self/fd")) == files


def test_a_client_needs_at_least_one_address():
    with pytest.raises(ValueError, match="at least one worker address"):
        brokest.Client(" , ")


# --- Timeouts and lost workers ---


def touch_then_sleep(path, seconds):
    Path(path).touch()
    time.sleep(seconds)


def keep_python_busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "done"


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


@pytest.mark.parametrize("how, within", [(signal.SIGKILL, 5), (signal.SIGSTOP, 10)])
def test_a_killed_or_frozen_worker_raises_worker_lost_within_seconds(
    worker, make_client, tmp_path, how, within
):
    client = make_client(worker.address)  # no timeout
    task = client.submit(touch_then_sleep, tmp_path / "started", 60)
    wait_until((tmp_path / "started").exists)
    os.kill(worker.pid, how)
    with pytest.raises(brokest.WorkerLost):
        task.result(timeout=within)


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


def test_call_with_no_worker_waits_saying_what_to_check_until_one_comes_up(
    start_worker, make_client, caplog
):
    port = free_port()
    task = make_client(f"tcp://127.0.0.1:{port}").submit(add, 1, 2)  # no timeout
    with caplog.at_level(logging.WARNING, logger="brokest"):
        waiting = f"waiting for a worker to come up at tcp://127.0.0.1:{port}"
        wait_until(lambda: waiting in caplog.text)
    assert "started there" in caplog.text and "--host" in caplog.text
    start_worker("--port", str(port))
    assert task.result(timeout=10) == 3


def test_worker_restarted_on_the_same_port_is_used_again(start_worker, make_client):
    first = start_worker()
    client = make_client(first.address, timeout=10)
    assert client.queue(identify, 0)[0] == first.pid
    first.stop()
    second = start_worker("--port", first.address.rsplit(":", 1)[1])
    assert client.queue(identify, 0)[0] == second.pid


def die_the_first_time(marker):
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def count_the_run_then_fail(path):
    with open(path, "a") as runs:
        runs.write("run\n")
    raise ValueError("this task always fails")


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


# --- Time limits: a worker survives its tasks ---


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


@pytest.mark.parametrize(
    "task, args",
    [(spin_then_note_the_finally, ()), (sleep_then_note_the_finally, (60,))],
    ids=["python-loop", "sleep"],
)
def test_task_past_the_timeout_is_stopped_inside_and_the_worker_serves_on(
    worker, make_client, tmp_path, task, args
):
    client = make_client(worker.address, timeout=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="time limit"):  # the worker's own TimeoutError
        client.queue(task, tmp_path / "finally", *args)
    assert time.monotonic() - started < 2
    assert (tmp_path / "finally").read_text() == "finally ran"
    started = time.monotonic()
    assert client.queue(identify, 0)[0] == worker.pid  # the same process, at once
    assert time.monotonic() - started < 1


def test_worker_time_limit_stops_tasks_of_a_client_without_a_timeout(
    start_worker, make_client, tmp_path
):
    worker = start_worker("--time-limit", "1")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        make_client(worker.address).queue(sleep_then_note_the_finally, tmp_path / "finally", 60)
    assert time.monotonic() - started < 2
    assert make_client(worker.address).queue(add, 1, 2) == 3


@pytest.mark.parametrize(
    "task, args",
    [(swallow_every_timeout, ()), (hold_the_gil, (10**11,))],
    ids=["swallows-timeout-error", "stuck-in-c-code"],
)
def test_task_that_runs_on_past_its_limit_is_killed_and_its_port_serves_again(
    worker, make_client, task, args
):
    client = make_client(worker.address, timeout=1)
    started = time.monotonic()
    old_pid = worker.pid
    with pytest.raises((TimeoutError, brokest.WorkerLost)):
        client.queue(task, *args)
    new_pid = worker.wait_for_new_worker(worker.address, old_pid)
    assert client.queue(identify, 0)[0] == new_pid
    assert time.monotonic() - started < 1 + 4  # within 4 s of the limit
    assert worker.wait_for_log(f"worker {old_pid} on port .* ran past its hard time limit")
    assert worker.wait_for_log(f"line \\d+ in {task.__name__}")  # faulthandler: where it was
    assert worker.wait_for_log(f"worker {old_pid} on port .* was killed by SIGABRT")


def test_stubborn_task_raises_timeout_error_and_is_never_retried(worker, make_client, tmp_path):
    # the client gives up at its timeout + 0.5 s, before the worker is ended (limit + 2 s) and
    # before that loss could look like a WorkerLost worth retrying
    runs = tmp_path / "runs"
    old_pid = worker.pid
    with pytest.raises(TimeoutError):
        make_client(worker.address, timeout=1, retries=2).queue(swallow_every_timeout, runs)
    worker.wait_for_new_worker(worker.address, old_pid)  # it was ended, as it should be
    assert runs.read_text() == "run\n"


def test_task_holding_the_gil_without_a_limit_runs_to_its_end(worker, make_client):
    # longer than the heartbeat timeout (about 4 s where this was written); libzmq's I/O
    # thread answers heartbeats meanwhile
    count = 5 * 10**8
    assert make_client(worker.address).queue(hold_the_gil, count) == count


def test_task_that_timed_out_is_never_retried(worker, make_client, tmp_path):
    client = make_client(worker.address, timeout=0.5, retries=2)
    with pytest.raises(TimeoutError):
        client.queue(count_the_run_then_sleep, tmp_path / "runs", 60)
    assert (tmp_path / "runs").read_text() == "run\n"


@pytest.mark.cpu_cost
def test_a_time_limit_costs_the_worker_at_most_15_microseconds_of_cpu_per_task():
    # Worker.answer(), the worker's whole handling of a request, on the same no-op request
    # with and without a time limit, in turns of alternating order, in this process's main
    # thread (where SIGALRM's handler runs), timed by its own CPU clock: no scheduling noise.
    worker = brokest.Worker(port=0)
    function = cloudpickle.dumps(abs)
    requests = {
        name: brokest.pack(None, [function], (b"id", [((-1,), {})], limit))
        for name, limit in [("limit", 60.0), ("none", None)]
    }
    per_task = {name: [] for name in requests}
    previous = signal.signal(signal.SIGALRM, brokest.raise_time_limit)
    try:
        for turn in range(10):
            for name in ["limit", "none"] if turn % 2 else ["none", "limit"]:
                started = time.thread_time()
                for _ in range(2000):
                    worker.answer(requests[name])
                per_task[name].append((time.thread_time() - started) / 2000)
    finally:
        signal.signal(signal.SIGALRM, previous)
    extra = statistics.median(per_task["limit"]) - statistics.median(per_task["none"])
    assert extra < 15e-6, f"a time limit costs {extra * 1e6:.1f} us of worker CPU per task"


# --- Keys: CurveZMQ and signatures ---

SECRET = b"argument-4be1c9d0"  # bytes a wiretap looks for
RESULT_TAG = b"-result-77e2a1"


def tag_the_secret(value):
    return value + RESULT_TAG


def log_the_run(path):
    with open(path, "a") as runs:
        runs.write("run\n")


class CreatesFileWhenUnpickled:
    """A payload whose unpickling creates a file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize(
    "client_key, worker_key",
    [("not the key", KEY), (None, KEY), (KEY, None)],
    ids=["wrong-key", "no-key", "keyed-client-unkeyed-worker"],
)
def test_mismatched_keys_fail_the_handshake_quickly_and_nothing_runs(
    start_worker, make_client, tmp_path, client_key, worker_key
):
    worker = start_worker(env={"BROKEST_KEY": worker_key} if worker_key else {})
    started = time.monotonic()
    with pytest.raises(brokest.AuthenticationError, match="do both ends use the same key"):
        make_client(worker.address, key=client_key).queue(Path.touch, tmp_path / "ran")
    assert time.monotonic() - started < 5  # without a timeout
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


def test_a_key_means_the_same_with_surrounding_whitespace_at_both_ends(
    start_worker, make_client, tmp_path
):
    # the key file as an editor saves it; the client reads it with its newline
    (tmp_path / "key").write_text(f"  {KEY}\n")
    worker = start_worker("--key-file", str(tmp_path / "key"))
    client = make_client(worker.address, key=(tmp_path / "key").read_text(), timeout=10)
    assert client.queue(add, 1, 2) == 3
    assert make_client(worker.address, key=KEY.encode(), timeout=10).queue(add, 2, 2) == 4
    assert brokest.Worker(key=f"\t{KEY} \n").key == KEY.encode()


@pytest.mark.parametrize(
    "signature",
    [b"", b"\x00" * 32, b"wrong signature", "signed with another key"],
    ids=["empty", "zeros", "garbage", "another-key"],
)
def test_request_with_a_bad_signature_is_never_unpickled(
    start_worker, make_client, tmp_path, signature
):
    worker = start_worker(env={"BROKEST_KEY": KEY})
    marker = tmp_path / "unpickled"
    frames = brokest.pack(b"another key", [pickle.dumps(add)], CreatesFileWhenUnpickled(marker))
    if isinstance(signature, bytes):
        frames[0] = signature
    request_id, _, [(kind, message)] = read_reply(
        raw_request(worker.address, frames, key=KEY), KEY
    )
    assert request_id is None and kind == "error" and "signature did not verify" in message
    assert not marker.exists()
    assert make_client(worker.address, key=KEY, timeout=10).queue(add, 1, 2) == 3


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
def test_rogue_worker_cannot_make_a_keyed_client_unpickle_its_reply(
    make_client, tmp_path, signature
):
    # a REP socket holding the worker's CURVE key answers with a badly signed malicious pickle
    marker = tmp_path / "unpickled"
    rogue = zmq.Context.instance().socket(zmq.REP)
    rogue.linger = 0
    curve_server(rogue, KEY)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")

    def answer_once():
        rogue.recv_multipart()
        rogue.send_multipart([signature, pickle.dumps(CreatesFileWhenUnpickled(marker))])

    thread = threading.Thread(target=answer_once)
    thread.start()
    try:
        with pytest.raises(brokest.AuthenticationError):
            make_client(f"tcp://127.0.0.1:{port}", key=KEY, timeout=10).queue(add, 1, 2)
    finally:
        thread.join(timeout=10)
        rogue.close()
    assert not marker.exists()


@pytest.mark.parametrize("key", [None, KEY], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("size", [0, 1 << 20], ids=["small", "1-MB"])
def test_the_wire_shows_arguments_results_and_names_only_without_a_key(
    start_worker, make_client, key, size
):
    worker = start_worker(env={"BROKEST_KEY": key} if key else {})
    argument = SECRET + os.urandom(size)
    relay = RecordingRelay(int(worker.address.rsplit(":", 1)[1]))
    try:
        client = make_client(relay.address, key=key, timeout=10)
        assert client.queue(tag_the_secret, argument).endswith(RESULT_TAG)
    finally:
        relay.close()
    wire = b"".join(relay.sent + relay.received)
    seen = [SECRET in wire, b"tag_the_secret" in wire, RESULT_TAG in wire]
    assert seen == [not key] * 3
    assert len(wire) > len(argument)


@pytest.mark.parametrize("size", [0, 1 << 20], ids=["small", "1-MiB"])
def test_recorded_request_sent_again_on_new_connections_runs_nothing(
    start_worker, make_client, tmp_path, size
):
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
    replay = threading.Thread(target=send_raw_bytes, args=(port, bytes(relay.sent[0])))
    replay.daemon = True
    replay.start()
    wait_until(lambda: (tmp_path / "runs").read_text() == "run\nrun\n")


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "unkeyed"])
def test_client_is_served_again_each_time_its_worker_is_replaced(
    start_worker, make_client, tmp_path, key
):
    worker = start_worker(env={"BROKEST_KEY": key} if key else {})
    client = make_client(worker.address, key=key, timeout=10)  # never told the key is wrong
    for turn in range(3):
        old_pid = worker.pid
        busy = client.submit(touch_then_sleep, tmp_path / str(turn), 60)
        wait_until((tmp_path / str(turn)).exists)
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(brokest.WorkerLost):
            busy.result(timeout=5)
        assert client.queue(identify, turn)[0] == worker.wait_for_new_worker(
            worker.address, old_pid
        )


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
    env = {k: v for k, v in os.environ.items() if k != "BROKEST_KEY"}
    run = subprocess.run(
        [sys.executable, BROKEST, "--host", "0.0.0.0"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 2
    assert "--key-file" in run.stderr and "--insecure" in run.stderr


@pytest.mark.skipif(
    not (shutil.which("unshare") and shutil.which("ip")),
    reason="needs unshare and ip for a private network namespace",
)
def test_cli_serves_a_public_host_with_insecure():
    # in a network namespace of its own, 0.0.0.0 reaches nobody but this test
    script = (
        "import subprocess, sys, brokest\n"
        f"worker = subprocess.Popen([sys.executable, {BROKEST!r}, '--host', "
        "'0.0.0.0', '--port', '0', '--insecure'], stderr=subprocess.PIPE, text=True)\n"
        "line = next(line for line in worker.stderr if 'listening on' in line)\n"
        "port = line.rsplit(':', 1)[1].strip()\n"
        "print(brokest.Client('tcp://127.0.0.1:' + port, timeout=5).queue(abs, -7))\n"
        "worker.terminate(); worker.wait(5)\n"
    )
    unshare = ["unshare", "--net", "--map-root-user", "sh", "-c"]
    command = [*unshare, f'ip link set lo up && exec "{sys.executable}" -c "$0"', script]
    run = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=HERE)
    if run.returncode and "Operation not permitted" in run.stderr:
        pytest.skip("this machine does not allow network namespaces")
    assert run.stdout.strip() == "7", run.stderr


# --- The command line: a supervisor and its workers ---


def exit_at_once(code):
    os._exit(code)


def segfault():
    import ctypes

    ctypes.string_at(0)


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


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_stops_the_supervisor_and_every_worker_cleanly(
    start_worker, make_client, processes
):
    workers = start_worker("--processes", str(processes), workers=processes)
    client = make_client(workers.addresses, timeout=10)
    pids = {client.queue(identify, n)[0] for n in range(4 * processes)}
    assert len(pids) == processes
    workers.process.send_signal(signal.SIGTERM)
    assert workers.wait_for_exit() == 0
    assert workers.wait_for_log("SIGTERM: stopping")
    assert len(workers.wait_for_log("stopped", count=processes)) == processes
    assert all(parent_of(pid) is None for pid in pids)


def test_stop_may_run_again_inside_itself_as_a_second_signal_handler_would():
    # a signal that comes while its handler runs runs the handler again, at whatever line the
    # first had reached: here, at every line. A handler that took a lock would wait for itself.
    worker = brokest.Worker(port=0)
    reentered = []

    def stop_again_at_every_line(frame, event, arg):
        if event == "line" and len(reentered) < 20:
            reentered.append(frame.f_code.co_name)
            worker.stop()
        return stop_again_at_every_line

    sys.settrace(stop_again_at_every_line)
    try:
        worker.stop()
    finally:
        sys.settrace(None)
    assert reentered  # it did run inside itself, and came back


def test_supervisor_logs_its_pid_and_ports_when_it_starts(start_worker):
    workers = start_worker("--processes", "2", workers=2)
    [line] = workers.wait_for_log(r"supervisor \d+ serving ports")
    assert f"supervisor {workers.process.pid} serving ports" in line
    assert all(address.rsplit(":", 1)[1] in line for address in workers.addresses)


def test_a_quiet_pool_on_port_0_still_says_which_port_it_took(start_worker, make_client):
    workers = start_worker("-q", workers=0)
    [line] = workers.wait_for_log(r"serving ports \[\d+\]")
    port = re.search(r"serving ports \[(\d+)\]", line)[1]
    assert make_client(f"127.0.0.1:{port}", timeout=10).queue(add, 1, 2) == 3
    assert not [line for line in workers.log if "listening" in line]


def test_the_installed_command_imports_task_modules_from_the_working_directory(
    start_worker, make_client, tmp_path, monkeypatch
):
    # the console script pip writes runs with its bin folder as sys.path[0]
    (tmp_path / "task_next_to_me.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "brokest"
    script.write_text("import sys\nfrom brokest import main\nsys.exit(main())\n")
    env = {"PYTHONPATH": str(HERE)}
    workers = start_worker(command=[sys.executable, str(script)], cwd=tmp_path, env=env)
    monkeypatch.syspath_prepend(str(tmp_path))
    import task_next_to_me

    assert make_client(workers.address, timeout=10).queue(task_next_to_me.double, 21) == 42


def test_cli_help_exits_zero():
    run = subprocess.run([sys.executable, BROKEST, "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--processes" in run.stdout


def test_a_port_that_cannot_be_bound_ends_the_cli_with_status_2_naming_it():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, BROKEST, "--port", str(port)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr


@pytest.mark.parametrize("option", ["--max-tasks", "--max-memory", "--processes"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_count_below_one_ends_the_cli_with_status_2(option, value):
    command = [sys.executable, BROKEST, "--port", "0", option, value]
    run = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "must be at least 1" in run.stderr


@pytest.mark.parametrize(
    "how, logged",
    [
        ("os._exit", "exited with status 3"),
        ("segfault", "was killed by SIGSEGV"),
        ("SIGKILL", "was killed by SIGKILL"),
    ],
)
def test_dead_worker_is_replaced_on_its_port_and_its_sibling_is_untouched(
    start_worker, make_client, tmp_path, how, logged
):
    workers = start_worker("--processes", "2", workers=2)
    doomed, sibling = workers.addresses
    doomed_pid = workers.pid_on(doomed)
    sibling_pid = workers.pid_on(sibling)
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


# --- Running a pool for months: recycling, SIGHUP, forks ---


def record_the_run(path, tag):
    """Note tag and this worker's pid in path (one line, appended at once); return tag."""
    with open(path, "a") as runs:
        runs.write(f"{tag} {os.getpid()}\n")
    return tag


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
def test_max_tasks_1_serves_each_call_in_a_fresh_process_without_delay(
    start_worker, make_client, key
):
    # keyed: each successor is reached through a CurveZMQ handshake of its own
    workers = start_worker("--max-tasks", "1", env={"BROKEST_KEY": key} if key else {})
    client = make_client(workers.address, key=key, timeout=10)
    started = time.monotonic()
    pids = [client.queue(os.getpid) for _ in range(12)]
    assert len(set(pids)) == 12
    assert time.monotonic() - started < 8
    retired = r"worker \d+ on port \d+ retired; starting another"
    assert workers.wait_for_log(retired, count=12)


def test_max_memory_recycles_a_worker_that_grew_past_it_and_keeps_one_that_did_not(
    start_worker, make_client
):
    workers = start_worker("--max-memory", "150")
    client = make_client(workers.address, timeout=20)

    def allocate(megabytes):  # sent by value: nothing to import
        return len(b"x" * (megabytes << 20)) and os.getpid()

    first = client.queue(allocate, 1)
    assert client.queue(allocate, 1) == first  # far below the limit: the same process serves on
    assert client.queue(allocate, 200) == first  # above it: the process retires after this task
    assert client.queue(allocate, 1) != first
    assert workers.wait_for_log(f"worker {first} retiring after 3 tasks, peak memory")


def test_a_worker_sent_sigterm_loses_none_of_the_requests_queued_at_it(
    start_worker, make_client, tmp_path
):
    # one worker runs a 1 s task; three other Clients queue a call each behind it; no retries
    workers = start_worker()
    old_pid = workers.pid
    runs = tmp_path / "runs"
    busy = make_client(workers.address).submit(
        sleep_then_return_after_touching, tmp_path / "started", 1, "busy"
    )
    wait_until((tmp_path / "started").exists)
    queued = [make_client(workers.address).submit(record_the_run, runs, n) for n in range(3)]
    os.kill(old_pid, signal.SIGTERM)
    assert busy.result(timeout=10) == "busy"  # the running task finishes and answers
    assert sorted(call.result(timeout=20) for call in queued) == [0, 1, 2]
    new_pid = workers.wait_for_new_worker(workers.address, old_pid)
    assert sorted(runs.read_text().splitlines()) == [f"{n} {new_pid}" for n in range(3)]
    assert workers.wait_for_log(f"worker {old_pid} on port \\d+ retired")


def test_sighup_without_a_terminal_restarts_every_worker_after_its_task_and_no_call_fails(
    start_worker, make_client, tmp_path
):
    # started as systemd would (a session of its own); two workers: one runs a 2 s task, the
    # other a stream of quick calls, when SIGHUP comes
    workers = start_worker("--processes", "2", workers=2)
    old_pids = {address: workers.pid_on(address) for address in workers.addresses}
    client = make_client(workers.addresses, timeout=30)
    slow = client.submit(sleep_then_return_after_touching, tmp_path / "started", 2, "slow")
    wait_until((tmp_path / "started").exists)
    answered = []
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            answered.append(client.queue(os.getpid))

    with concurrent.futures.ThreadPoolExecutor(1) as streamer:
        streaming = streamer.submit(stream)
        wait_until(lambda: len(answered) > 10)
        workers.process.send_signal(signal.SIGHUP)
        assert workers.wait_for_log("SIGHUP: restarting every worker")
        new_pids = {workers.wait_for_new_worker(address, pid) for address, pid in old_pids.items()}
        wait_until(lambda: new_pids & set(answered[-5:]))  # the stream goes on, on new processes
        stop.set()
        streaming.result(timeout=10)  # raises what any call of the stream raised
    assert slow.result(timeout=10) == "slow"
    assert workers.process.poll() is None  # the supervisor stays


def test_sighup_makes_the_workers_import_a_changed_module_afresh(
    start_worker, make_client, tmp_path, monkeypatch
):
    module = tmp_path / "task_that_changes.py"
    module.write_text("def version():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import task_that_changes

    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}", "PYTHONDONTWRITEBYTECODE": "1"}
    workers = start_worker(env=env)
    client = make_client(workers.address, timeout=10)
    assert client.queue(task_that_changes.version) == 1
    module.write_text("def version():\n    return 2\n")
    old_pid = workers.pid
    workers.process.send_signal(signal.SIGHUP)
    workers.wait_for_new_worker(workers.address, old_pid)
    assert client.queue(task_that_changes.version) == 2


@pytest.mark.skipif(not shutil.which("nohup"), reason="needs nohup")
def test_sighup_ignored_when_the_pool_starts_stays_ignored(start_worker):
    # nohup python brokest.py: SIGHUP, then SIGTERM. Were SIGHUP handled, its handler would
    # run first (signals are taken in order of their numbers) and say so in the log.
    workers = start_worker(command=["nohup", sys.executable, BROKEST])
    old_pid = workers.pid
    workers.process.send_signal(signal.SIGHUP)
    workers.process.send_signal(signal.SIGTERM)
    assert workers.wait_for_exit() == 0
    assert workers.wait_for_log("SIGTERM: stopping")
    assert not [line for line in workers.log if "SIGHUP" in line]
    assert workers.pid == old_pid and parent_of(old_pid) is None


def test_closing_the_terminal_stops_the_pool_and_leaves_nothing_running():
    # the supervisor in a session of its own whose controlling terminal is a pseudo-terminal,
    # as a shell in a terminal window starts it; then the window closes (its master side)
    master, terminal = pty.openpty()
    take_the_terminal = (
        "import os, sys\n"
        "fd = os.open(os.ttyname(0), os.O_RDWR)  # a session leader opening a tty takes it\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    command = [sys.executable, "-c", take_the_terminal, BROKEST, "--port", "0", "--processes", "2"]
    supervisor = subprocess.Popen(
        command, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True
    )
    os.close(terminal)
    try:
        log = b""
        deadline = time.monotonic() + 15
        while log.count(b"listening on") < 2 and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                log += os.read(master, 1 << 16)
        workers = [int(pid) for pid in re.findall(rb"worker (\d+) listening on", log)]
        assert len(workers) == 2, log
        os.close(master)  # the kernel sends SIGHUP to the session's leader: the supervisor
        master = None
        assert supervisor.wait(timeout=10) == 0
        wait_until(lambda: all(parent_of(pid) is None for pid in workers))
    finally:
        if master is not None:
            os.close(master)
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


FORKED_QUEUE = """
import multiprocessing, brokest

def remote_abs(n):
    return brokest.queue(abs, n)

print(remote_abs(-1))
with multiprocessing.get_context("fork").Pool(2) as pool:
    print(pool.map(remote_abs, [-2, -3, -4]))
"""


def test_queue_works_in_processes_forked_after_the_parent_used_it(worker):
    env = {**os.environ, "BROKEST_ADDRESS": worker.address}
    command = [sys.executable, "-c", FORKED_QUEUE]
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE, timeout=60)
    assert run.stdout.splitlines() == ["1", "[2, 3, 4]"], run.stderr


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


@pytest.mark.parametrize(
    "call",
    ["client.queue(abs, -2)", "client.submit(abs, -2).result(5)", "list(client.map(abs, [-2]))"],
)
def test_a_client_carried_into_a_forked_child_says_to_make_one_there(worker, call):
    command = [sys.executable, "-c", FORKED_CLIENT.format(call=call), worker.address]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=HERE)
    lines = run.stdout.splitlines()
    assert lines[0] == "1" and lines[2] == "3", run.stderr
    assert lines[1].startswith("the child: a Client of process")
    assert lines[1].endswith("make a Client in this process")


# --- Bad input never kills a worker ---


class RaisesWhenUnpickled:
    def __reduce__(self):
        return int, ("not a number",)


CALL = pickle.dumps((b"id", [((1, 2), {})], None))


@pytest.mark.parametrize(
    "frames",
    [
        [b"garbage"],
        [b"", pickle.dumps(add)],
        [b"", pickle.dumps(add), CALL[:-5]],
        [b"", pickle.dumps(add), pickle.dumps(RaisesWhenUnpickled())],
        [b"", pickle.dumps(add), pickle.dumps("not a call")],
        [b"", pickle.dumps(RaisesWhenUnpickled()), CALL],
        [b"", pickle.dumps(add), pickle.dumps((b"id", [((1, 2), {})], "soon"))],
    ],
    ids=[
        "one-garbage-frame",
        "too-few-frames",
        "truncated-pickle",
        "raises-while-loading",
        "not-a-call",
        "function-raises-while-loading",
        "time-limit-not-a-number",
    ],
)
def test_bad_request_gets_an_error_reply_and_the_worker_keeps_serving(worker, make_client, frames):
    request_id, _, [(kind, message)] = read_reply(raw_request(worker.address, frames))
    assert request_id is None and kind == "error" and message.startswith("request rejected")
    assert worker.wait_for_log("rejected a request")
    assert make_client(worker.address, timeout=10).queue(add, 1, 2) == 3


def test_a_well_formed_request_made_by_hand_is_answered(worker):
    # the wire layout, as the module docstring draws it
    frames = [b"", cloudpickle.dumps(add), CALL]
    assert read_reply(raw_request(worker.address, frames)) == (b"id", False, [("result", 3)])


# --- The demo ---


def test_app_runs_out_of_the_box():
    command = [sys.executable, str(HERE / "app.py")]
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert run.returncode == 0, run.stderr
    assert "primes below 100: 25" in run.stdout and "TypeError" in run.stdout


def test_app_stops_its_workers_on_ctrl_c():
    command = [sys.executable, str(HERE / "app.py")]
    app = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        first_line = app.stdout.readline()  # its workers answered the first queue()
        assert first_line.startswith("primes below 100")
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        workers = [pid for pid in pids if parent_of(pid) == app.pid]
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
