"""Measure brokest against raw pyzmq and ProcessPoolExecutor, side by side in one run.

    python benchmarks/bench.py              # three to four minutes on 2 cores
    python benchmarks/bench.py --quick      # one short round of each, for a smoke test

Timing on a small shared machine is noisy, so the variants take turns, round by round, and
every figure is reported next to raw pyzmq measured in the same rounds. Wall time is the
median call; CPU time per call is process CPU (user + system, all threads, libzmq's I/O
thread included), from getrusage() for this process and /proc/<pid>/stat for a worker, which
noise disturbs far less than wall time. Workers, echo servers and pools are processes this
script starts on 127.0.0.1 and stops by pid. It needs numpy, for the array payload only.
"""
import argparse
import json
import os
import platform
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cloudpickle
import numpy
import zmq

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import brokest  # noqa: E402
from tasks import burn_cpu, echo, touch_then_sleep  # noqa: E402

KEY = "bench-key-0123456789abcdef"
MB = 1 << 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def noop(*args):
    """A no-op defined in __main__, as in a user's script: it travels by value."""
    return None


# --- Processes this script starts, and their CPU time ---

started_processes = []


def start(arguments, env=None, stderr=subprocess.DEVNULL):
    """Start a Python process (stopped at exit by its pid) and return it."""
    process = subprocess.Popen([sys.executable, *arguments], env={**os.environ, **(env or {})},
                               stderr=stderr)
    started_processes.append(process)
    return process


def free_ports(count=1):
    """Return the first of count consecutive ports that are free on 127.0.0.1 right now."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        try:
            for port in range(first, first + count):
                socket.create_server(("127.0.0.1", port)).close()
            return first
        except OSError:
            continue


def children(pid):
    """Return the pids of a process's children."""
    return [int(child) for task in os.listdir(f"/proc/{pid}/task")
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]


def main_thread_cpu_seconds(pid):
    """Return the CPU time a process's main thread has used, to the nanosecond (schedstat)."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


def cpu_seconds(pid=None):
    """Return the CPU time a process has used (this one if pid is None), all its threads."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def start_workers(*options, key=None, processes=1):
    """Start `python brokest.py` with workers on free ports; return (addresses, worker pids).

    It logs at its default level, one line per task, to /dev/null."""
    port = free_ports(processes)
    supervisor = start([str(HERE.parent / "brokest.py"), "--port", str(port), "--processes",
                        str(processes), *options],
                       {"PYTHONPATH": str(HERE), **({"BROKEST_KEY": key} if key else {})})
    addresses = [f"tcp://127.0.0.1:{p}" for p in range(port, port + processes)]
    with brokest.Client(addresses, key=key) as client:
        list(client.map(abs, [-1] * 4 * processes))  # returns once they all answer
    return addresses, children(supervisor.pid)


def start_raw_echo():
    """Start a raw pyzmq REP process echoing every message; return (REQ socket, its pid)."""
    port = free_ports()
    process = start([__file__, "--raw-echo", str(port)])
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(f"tcp://127.0.0.1:{port}")
    raw_round_trip(sock, [b"warm up"])  # waits for the echo server to come up
    return sock, process.pid


def raw_echo_server(port):
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def raw_round_trip(sock, frames):
    sock.send_multipart(frames, copy=False)
    return sock.recv_multipart(copy=False)


def ratio(ours, reference):
    """Return the median over rounds of ours / reference, each pair measured side by side."""
    return statistics.median(a / b for a, b in zip(ours, reference))


def p99(values):
    return statistics.quantiles(values, n=100)[98]


# --- The measurements ---

def bench_latency(rounds, count):
    """Time single calls, taking turns; also the CPU each side spends per call."""
    raw, raw_pid = start_raw_echo()
    default_addresses, [default_pid] = start_workers()
    quiet_addresses, [quiet_pid] = start_workers("-q")
    keyed_addresses, [keyed_pid] = start_workers(key=KEY)
    default, quiet = brokest.Client(default_addresses), brokest.Client(quiet_addresses)
    keyed = brokest.Client(keyed_addresses, key=KEY)
    with_timeout = brokest.Client(default_addresses, timeout=10)
    # What raw pyzmq sends is a brokest request of the same size, so both move the same bytes.
    request = brokest.pack_message(None, os.urandom(8), cloudpickle.dumps(noop, protocol=5), ([((), {})], None))
    before = set(children(os.getpid()))
    with ProcessPoolExecutor(1) as pool:
        pool.submit(noop).result()
        [pool_pid] = set(children(os.getpid())) - before - {p.pid for p in started_processes}
        variants = {
            "raw pyzmq REQ/REP echo": (lambda: raw_round_trip(raw, request), raw_pid),
            "brokest queue(noop from __main__)": (lambda: default.queue(noop), default_pid),
            "brokest queue(noop from __main__), key": (lambda: keyed.queue(noop), keyed_pid),
            "brokest queue(noop from __main__), timeout": (lambda: with_timeout.queue(noop), default_pid),
            "brokest queue(abs), worker -q": (lambda: quiet.queue(abs, -1), quiet_pid),
            "ProcessPoolExecutor(1)": (lambda: pool.submit(noop).result(), pool_pid),
        }
        times = {name: [] for name in variants}
        round_medians = {name: [] for name in variants}
        cpu = {name: [0.0, 0.0, 0] for name in variants}  # client s, worker s, calls
        for call, _ in variants.values():
            for _ in range(200):  # warm up: connections, imports, caches
                call()
        for _ in range(rounds):
            for name, (call, pid) in variants.items():
                round_times = []
                client_before, worker_before = cpu_seconds(), cpu_seconds(pid)
                for _ in range(count):
                    started = time.perf_counter()
                    call()
                    round_times.append((time.perf_counter() - started) * 1e6)
                cpu[name][0] += cpu_seconds() - client_before
                cpu[name][1] += cpu_seconds(pid) - worker_before
                cpu[name][2] += count
                times[name] += round_times
                round_medians[name].append(statistics.median(round_times))
    for client in (default, quiet, keyed, with_timeout):
        client.shutdown()
    raw_rounds = round_medians["raw pyzmq REQ/REP echo"]
    return {name: {"median_us": statistics.median(t), "p99_us": p99(t), "calls": len(t),
                   "ratio_to_raw": ratio(round_medians[name], raw_rounds),
                   "ratio_to_pool": ratio(round_medians[name], round_medians["ProcessPoolExecutor(1)"]),
                   "client_cpu_us": cpu[name][0] / cpu[name][2] * 1e6,
                   "worker_cpu_us": cpu[name][1] / cpu[name][2] * 1e6}
            for name, t in times.items()}


def bench_throughput(rounds, tasks):
    """Time maps of no-ops over two workers, taking turns with raw pyzmq and a process pool."""
    raws = [start_raw_echo()[0], start_raw_echo()[0]]
    addresses, _ = start_workers(processes=2)
    client = brokest.Client(addresses)
    request = brokest.pack_message(None, os.urandom(8), cloudpickle.dumps(noop, protocol=5), ([((0,), {})], None))

    def raw_map():
        threads = [threading.Thread(target=lambda sock=sock: [raw_round_trip(sock, request)
                                                              for _ in range(tasks // 2)])
                   for sock in raws]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    with ProcessPoolExecutor(2) as pool:
        variants = {
            "raw pyzmq, 2 REP, 2 threads": raw_map,
            "brokest map, 2 workers": lambda: list(client.map(noop, range(tasks))),
            "brokest map, 2 workers, chunksize 100": lambda: list(client.map(noop, range(tasks), chunksize=100)),
            "ProcessPoolExecutor(2).map": lambda: list(pool.map(noop, range(tasks))),
        }
        for run in variants.values():
            run()  # warm up
        per_task = {name: [] for name in variants}
        for _ in range(rounds):
            for name, run in variants.items():
                started = time.perf_counter()
                run()
                per_task[name].append((time.perf_counter() - started) / tasks * 1e6)
    client.shutdown()
    raw = per_task["raw pyzmq, 2 REP, 2 threads"]
    return {name: {"per_task_us": statistics.median(t), "tasks_per_s": 1e6 / statistics.median(t),
                   "ratio_to_raw": ratio(t, raw)} for name, t in per_task.items()}


def bench_scaling(rounds, tasks, iterations):
    addresses, _ = start_workers(processes=2)
    seconds = {1: [], 2: []}
    for _ in range(rounds):
        for workers in (1, 2):
            with brokest.Client(addresses[:workers]) as client:
                client.queue(abs, -1)
                started = time.perf_counter()
                list(client.map(burn_cpu, [iterations] * tasks))
                seconds[workers].append(time.perf_counter() - started)
    return {"seconds_on_1_worker": statistics.median(seconds[1]),
            "seconds_on_2_workers": statistics.median(seconds[2]),
            "speed_up": ratio(seconds[1], seconds[2])}


def bench_bandwidth(rounds, megabytes):
    """Echo 100 MB of bytes and of numpy, taking turns with raw pyzmq; keyed and not."""
    raw, _ = start_raw_echo()
    addresses, [pid] = start_workers()
    keyed_addresses, _ = start_workers(key=KEY)
    client, keyed = brokest.Client(addresses), brokest.Client(keyed_addresses, key=KEY)
    payloads = {"bytes": os.urandom(megabytes * MB)}
    payloads["numpy"] = numpy.frombuffer(payloads["bytes"], dtype=numpy.float64).copy()
    results = {}
    with ProcessPoolExecutor(1) as pool:
        for kind, payload in payloads.items():
            variants = {"raw": lambda: raw_round_trip(raw, [payload]),
                        "brokest": lambda: client.queue(echo, payload),
                        "brokest, key": lambda: keyed.queue(echo, payload),
                        "ProcessPoolExecutor": lambda: pool.submit(echo, payload).result()}
            times = {name: [] for name in variants}
            for _ in range(rounds):
                for name, run in variants.items():
                    started = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - started)
            results[kind] = {name: {"seconds": statistics.median(t), "ratio_to_raw": ratio(t, times["raw"])}
                             for name, t in times.items()}
    peak_kb = int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0])
    client.shutdown()
    keyed.shutdown()
    return {**results, "payload_mb": megabytes, "worker_peak_rss_mb": peak_kb / 1024}


def bench_lost_worker():
    """Return seconds from SIGKILL and from SIGSTOP of a busy worker to WorkerLost."""
    detection = {}
    for name, signum in [("killed", signal.SIGKILL), ("frozen", signal.SIGSTOP)]:
        addresses, [pid] = start_workers()
        with tempfile.TemporaryDirectory() as directory, brokest.Client(addresses) as client:
            marker = Path(directory, "started")
            task = client.submit(touch_then_sleep, marker, 60)
            while not marker.exists():
                time.sleep(0.005)
            os.kill(pid, signum)
            started = time.perf_counter()
            try:
                task.result(timeout=30)
            except brokest.WorkerLost:
                detection[name + "_s"] = time.perf_counter() - started
        if signum == signal.SIGSTOP:
            os.kill(pid, signal.SIGKILL)
    return detection


def bench_scale(workers_up, addresses_named, tasks):
    """Open a Client of many addresses, few of them up, and run tasks over those that are."""
    addresses, _ = start_workers(processes=workers_up)
    down = [f"tcp://127.0.0.1:{free_ports()}" for _ in range(addresses_named - workers_up)]
    threads_before = len(os.listdir("/proc/self/task"))
    files_before = len(os.listdir("/proc/self/fd"))
    started = time.perf_counter()
    client = brokest.Client(addresses + down)
    opened = time.perf_counter() - started
    started = time.perf_counter()
    served = set(client.map(lambda _: os.getpid(), range(tasks)))
    ran = time.perf_counter() - started
    threads = len(os.listdir("/proc/self/task")) - threads_before
    files = len(os.listdir("/proc/self/fd")) - files_before
    client.shutdown()
    return {"addresses": addresses_named, "up": workers_up, "tasks": tasks, "open_s": opened,
            "run_s": ran, "workers_that_served": len(served), "client_threads": threads,
            "client_file_descriptors": files}


def peak_memory_kb():
    """Return this process's peak resident memory since it was exec'd (getrusage's ru_maxrss
    carries the parent's peak across exec on Linux; VmHWM does not)."""
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])


def probe_map(kind, count, chunksize, buffersize, addresses):
    """In this fresh process, time a map's first result and its end, and the peak memory it
    added; print them as JSON. kind: abs over range(count), or "200b": a no-op over count
    strings of 200 characters each, made before the clock starts."""
    items = range(count) if kind == "abs" else [os.urandom(100).hex() for _ in range(count)]
    fn = abs if kind == "abs" else noop
    if addresses == ["pool"]:
        pool = ProcessPoolExecutor(2)
        list(pool.map(abs, range(100)))
        run = lambda: pool.map(fn, items, chunksize=chunksize)  # noqa: E731
    else:
        client = brokest.Client(addresses)
        list(client.map(abs, range(100)))
        run = lambda: client.map(fn, items, chunksize=chunksize, buffersize=buffersize)  # noqa: E731
    before = peak_memory_kb()
    started = time.perf_counter()
    results = run()
    next(results)
    first = time.perf_counter() - started
    for _ in results:
        pass
    print(json.dumps({"first_s": first, "total_s": time.perf_counter() - started,
                      "peak_growth_mb": (peak_memory_kb() - before) / 1024}))


def bench_map_at_any_size():
    """Run the maps of the issue in fresh processes, each next to the pool where it survives."""
    addresses, _ = start_workers("-q", processes=2)
    probes = {
        "brokest map(abs, range(3,000,000), chunksize=500, buffersize=8)": ("abs", 3_000_000, 500, 8, addresses),
        "brokest map(abs, range(3,000,000), chunksize=500)": ("abs", 3_000_000, 500, None, addresses),
        "ProcessPoolExecutor(2).map(abs, range(3,000,000), chunksize=500)": ("abs", 3_000_000, 500, None, ["pool"]),
        "brokest map over 100,000 strings of 200 bytes": ("200b", 100_000, 1, None, addresses),
        "brokest map over 100,000 strings of 200 bytes, buffersize=8": ("200b", 100_000, 1, 8, addresses),
        "ProcessPoolExecutor(2).map over 100,000 strings of 200 bytes": ("200b", 100_000, 1, None, ["pool"]),
    }
    results = {}
    for name, (kind, count, chunksize, buffersize, where) in probes.items():
        output = subprocess.run([sys.executable, __file__, "--probe-map", kind, str(count), str(chunksize),
                                 str(buffersize or 0), *where], capture_output=True, text=True,
                                timeout=600, check=True).stdout
        results[name] = json.loads(output)
    return results


def bench_pool(rounds, calls):
    """Time limits, recycling and SIGHUP: worker CPU, calls per second, hand-over."""
    # Worker CPU per no-op task with a time limit and without, taking turns in alternating
    # order; the worker's main thread, where the limit's work is done, to the nanosecond.
    addresses, [pid] = start_workers("-q")
    limited, unlimited = brokest.Client(addresses, timeout=60), brokest.Client(addresses)
    cpu = {"limit": [], "none": []}
    for client in (limited, unlimited) * 3:
        for _ in range(500):
            client.queue(abs, -1)
    for round in range(2 * rounds):
        turns = (("limit", limited), ("none", unlimited))
        for name, client in turns if round % 2 else turns[::-1]:
            before = main_thread_cpu_seconds(pid)
            for _ in range(calls):
                client.queue(abs, -1)
            cpu[name].append((main_thread_cpu_seconds(pid) - before) / calls * 1e6)
    limited.shutdown()
    unlimited.shutdown()
    results = {"time_limit_extra_worker_cpu_us": statistics.median(cpu["limit"]) - statistics.median(cpu["none"]),
               "worker_cpu_us_without_limit": statistics.median(cpu["none"])}
    # Calls per second over two workers, recycled every 100 tasks or never; map of no-ops.
    for name, options in (("never", ()), ("every 100 tasks", ("--max-tasks", "100"))):
        addresses, _ = start_workers("-q", *options, processes=2)
        with brokest.Client(addresses) as client:
            list(client.map(abs, range(200)))
            started = time.perf_counter()
            list(client.map(abs, range(5000)))
            results[f"calls_per_s_recycled_{name}"] = 5000 / (time.perf_counter() - started)
    results.update(bench_sighup())
    results.update(bench_close_instant(clients=4, seconds=20 * max(1, rounds // 5)))
    return results


def bench_sighup():
    """SIGHUP under a stream of calls and one 2 s task: time until every port has a new
    process that answered, calls that failed, and whether the 2 s task's result came back."""
    addresses, old_pids = start_workers("-q", processes=2)
    supervisor = started_processes[-1]
    with brokest.Client(addresses, timeout=30) as client:
        stop, answered, failed = threading.Event(), [], []

        def stream():
            while not stop.is_set():
                try:
                    answered.append(client.queue(os.getpid))
                except Exception as error:  # counted, not raised: the figure is how many
                    failed.append(error)

        with tempfile.TemporaryDirectory() as directory:
            slow = client.submit(touch_then_sleep, Path(directory, "started"), 2)
            while not Path(directory, "started").exists():
                time.sleep(0.005)
            streamer = threading.Thread(target=stream)
            streamer.start()
            time.sleep(0.2)
            sent = time.perf_counter()
            os.kill(supervisor.pid, signal.SIGHUP)
            while len(set(answered[-50:]) - set(old_pids)) < 2 and time.perf_counter() - sent < 30:
                time.sleep(0.01)
            handed_over = time.perf_counter() - sent
            slow_ok = slow.result(timeout=30) is None
            stop.set()
            streamer.join()
    supervisor.terminate()  # its workers stop with it
    return {"sighup_all_ports_new_s": handed_over, "sighup_calls": len(answered),
            "sighup_failed_calls": len(failed), "sighup_running_task_returned": slow_ok}


def bench_close_instant(clients, seconds):
    """Clients that call, then think for 50-200 ms (about the drain time), on workers that
    retire every 3 tasks, without retries: how many calls meet the close instant (WorkerLost)."""
    addresses, _ = start_workers("-q", "--max-tasks", "3", processes=2)
    calls, lost = [0] * clients, [0] * clients

    def caller(n):
        rng, ends = random.Random(n), time.monotonic() + seconds
        with brokest.Client(addresses, timeout=30) as client:
            while time.monotonic() < ends:
                try:
                    client.queue(abs, -1)
                except brokest.WorkerLost:
                    lost[n] += 1
                calls[n] += 1
                time.sleep(rng.uniform(0.05, 0.2))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"stress_calls": sum(calls), "stress_worker_lost": sum(lost), "stress_clients": clients,
            "stress_seconds": seconds}


# --- Report ---

def report(results):
    """Print every target's figures and ratio as a Markdown table (the README's table)."""
    latency, throughput, bandwidth = results["latency"], results["throughput"], results["bandwidth"]
    raw = latency["raw pyzmq REQ/REP echo"]
    rows = [("latency, raw pyzmq REQ/REP round trip", f"{raw['median_us']:.0f} us median, "
             f"{raw['p99_us']:.0f} us p99", "", None, "")]
    targets = {"brokest queue(noop from __main__)": "<= 1.3 (1.5), below ProcessPoolExecutor",
               "brokest queue(noop from __main__), key": "<= 1.5"}
    for name, figures in latency.items():
        if not name.startswith("raw"):
            rows.append((f"latency, {name}", f"{figures['median_us']:.0f} us median, "
                         f"{figures['p99_us']:.0f} us p99", f"{figures['ratio_to_pool']:.2f} x pool",
                         figures["ratio_to_raw"], targets.get(name, "")))
    for name, figures in latency.items():
        target = "raw + 30 us each" if name == "brokest queue(noop from __main__)" else ""
        rows.append((f"CPU per call, {name}", f"client {figures['client_cpu_us']:.0f} us, "
                     f"worker {figures['worker_cpu_us']:.0f} us",
                     f"raw: {raw['client_cpu_us']:.0f} us, {raw['worker_cpu_us']:.0f} us", None, target))
    raw_map = throughput["raw pyzmq, 2 REP, 2 threads"]
    for name, figures in throughput.items():
        target = {"brokest map, 2 workers": "<= 1.3 (1.5)"}.get(name, "")
        rows.append((f"map of 10,000 no-ops, {name}", f"{figures['per_task_us']:.0f} us per task, "
                     f"{figures['tasks_per_s']:.0f}/s", f"raw {raw_map['per_task_us']:.0f} us",
                     figures["ratio_to_raw"], target))
    one, hundred = throughput["brokest map, 2 workers"], throughput["brokest map, 2 workers, chunksize 100"]
    rows.append(("map, chunksize 100 / chunksize 1 speed-up", "", "", one["per_task_us"] / hundred["per_task_us"],
                 ">= 4"))
    scaling = results["scaling"]
    rows.append(("CPU-bound map: 1 worker / 2 workers", f"{scaling['seconds_on_2_workers']:.2f} s",
                 f"{scaling['seconds_on_1_worker']:.2f} s", scaling["speed_up"], ">= 1.8"))
    for kind in ("bytes", "numpy"):
        raw_s = bandwidth[kind]["raw"]["seconds"]
        for name, figures in bandwidth[kind].items():
            if name != "raw":
                target = {("bytes", "brokest"): "<= 1.5", ("numpy", "brokest"): "<= 1.2"}.get((kind, name), "")
                rows.append((f"{bandwidth['payload_mb']} MB {kind} echoed, {name}",
                             f"{figures['seconds'] * 1000:.0f} ms", f"raw {raw_s * 1000:.0f} ms",
                             figures["ratio_to_raw"], target))
    rows.append(("worker peak RSS / payload", f"{bandwidth['worker_peak_rss_mb']:.0f} MB",
                 f"{bandwidth['payload_mb']} MB", bandwidth["worker_peak_rss_mb"] / bandwidth["payload_mb"], "<= 3"))
    lost = results["lost_worker"]
    rows.append(("killed worker -> WorkerLost", f"{lost['killed_s'] * 1000:.0f} ms", "", None, "< 5 s"))
    rows.append(("frozen worker -> WorkerLost", f"{lost['frozen_s']:.2f} s", "", None, "< 10 s"))
    scale = results["scale"]
    rows.append((f"Client of {scale['addresses']} addresses, {scale['up']} up: open, then {scale['tasks']} tasks",
                 f"{scale['open_s']:.2f} s, then {scale['run_s']:.2f} s on {scale['workers_that_served']} workers",
                 f"{scale['client_threads']} threads, {scale['client_file_descriptors']} fds", None, "seconds"))
    for name, figures in results["map_at_any_size"].items():
        rows.append((name, f"first result {figures['first_s']:.2f} s, all {figures['total_s']:.1f} s",
                     f"client peak memory +{figures['peak_growth_mb']:.0f} MB", None, ""))
    pool = results["pool"]
    rows.append(("worker CPU per no-op task: with a time limit minus without",
                 f"{pool['time_limit_extra_worker_cpu_us']:+.1f} us",
                 f"{pool['worker_cpu_us_without_limit']:.0f} us without (main thread)", None, "<= 15 us"))
    rows.append(("map of 5,000 abs over 2 workers, --max-tasks 100",
                 f"{pool['calls_per_s_recycled_every 100 tasks']:.0f} calls/s",
                 f"never recycled: {pool['calls_per_s_recycled_never']:.0f} calls/s",
                 pool["calls_per_s_recycled_every 100 tasks"] / pool["calls_per_s_recycled_never"], ""))
    rows.append(("SIGHUP under a call stream and a 2 s task",
                 f"new processes on both ports in {pool['sighup_all_ports_new_s']:.2f} s, "
                 f"{pool['sighup_failed_calls']} of {pool['sighup_calls']} calls failed",
                 f"2 s task returned: {pool['sighup_running_task_returned']}", None, "no call fails"))
    rows.append((f"{pool['stress_clients']} Clients thinking 50-200 ms, --max-tasks 3, no retries, "
                 f"{pool['stress_seconds']} s", f"{pool['stress_worker_lost']} WorkerLost in {pool['stress_calls']} calls",
                 f"{pool['stress_worker_lost'] / max(1, pool['stress_calls']):.2%}", None, "measured"))
    print("\n| measure | brokest | reference | ratio to raw | target |\n| --- | --- | --- | --- | --- |")
    for name, figures, reference, ratio_to_raw, target in rows:
        shown = "" if ratio_to_raw is None else f"{ratio_to_raw:.2f}"
        print(f"| {name} | {figures} | {reference} | {shown} | {target} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--probe-map", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke test")
    parser.add_argument("--json", default=str(HERE / "results.json"), help="where to write results")
    args = parser.parse_args()
    if args.raw_echo:
        return raw_echo_server(args.raw_echo)
    if args.probe_map:
        kind, count, chunksize, buffersize, *addresses = args.probe_map
        return probe_map(kind, int(count), int(chunksize), int(buffersize) or None, addresses)
    scale = 1 if args.quick else 5
    try:
        results = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                       f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}",
            "latency": bench_latency(rounds=4 * scale, count=500),
            "throughput": bench_throughput(rounds=scale, tasks=10_000),
            "scaling": bench_scaling(rounds=max(1, scale - 2), tasks=8,
                                     iterations=1_000_000 if args.quick else 3_000_000),
            "bandwidth": bench_bandwidth(rounds=scale, megabytes=100),
            "lost_worker": bench_lost_worker(),
            "scale": bench_scale(workers_up=100, addresses_named=1000, tasks=1000),
            "map_at_any_size": bench_map_at_any_size(),
            "pool": bench_pool(rounds=scale, calls=1000),
        }
    finally:
        for process in started_processes:  # each supervisor takes its workers with it
            process.terminate()
        for process in started_processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    print(results["machine"])
    report(results)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
