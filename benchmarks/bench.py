"""Measure brokest against raw pyzmq, side by side in one run; print ratios and write JSON.

    python benchmarks/bench.py              # two to three minutes on 2 cores
    python benchmarks/bench.py --quick      # one round of each, for a smoke test

Every figure is a ratio to a reference measured in the same run, interleaved round by round,
because timing on a small shared machine is noisy. Workers and echo servers are processes this
script starts on 127.0.0.1 and stops by pid. It needs numpy, for the array payload only.
"""
import argparse
import json
import os
import platform
import re
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

import numpy
import zmq

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import brokest  # noqa: E402
from tasks import burn_cpu, echo, noop, touch_then_sleep  # noqa: E402

KEY = "bench-key-0123456789abcdef"
MB = 1 << 20


def noop_in_main(*args):
    """A no-op defined in __main__: cloudpickle sends it by value, as in a user's script."""
    return None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


started_processes = []


def start(arguments, env=None):
    """Start a process (stopped at exit by its pid) and return it."""
    process = subprocess.Popen([sys.executable, *arguments], env={**os.environ, **(env or {})})
    started_processes.append(process)
    return process


def start_worker(key=None):
    """Start a brokest worker on a free port; return (process, address)."""
    port = free_port()
    env = {"PYTHONPATH": str(HERE), **({"BROKEST_KEY": key} if key else {})}
    process = start([str(HERE.parent / "brokest.py"), "--port", str(port), "-q"], env)
    return process, f"tcp://127.0.0.1:{port}"


def start_raw_echo():
    """Start a raw pyzmq REP process echoing every message; return a connected REQ socket."""
    port = free_port()
    start([__file__, "--raw-echo", str(port)])
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(f"tcp://127.0.0.1:{port}")
    raw_round_trip(sock, [b"warm up"])  # waits for the echo server to come up
    return sock


def raw_echo_server(port):
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def raw_round_trip(sock, frames):
    sock.send_multipart(frames, copy=False)
    return sock.recv_multipart(copy=False)


def call_times(call, count):
    """Return the duration of each of count calls, in microseconds."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e6)
    return times


def interleaved(variants, rounds, count):
    """Time each variant count calls per round, taking turns; return times and round medians."""
    times = {name: [] for name in variants}
    round_medians = {name: [] for name in variants}
    for _ in range(rounds):
        for name, call in variants.items():
            round_times = call_times(call, count)
            times[name] += round_times
            round_medians[name].append(statistics.median(round_times))
    return times, round_medians


def ratio(ours, reference):
    """Return the median over rounds of ours / reference, each pair measured side by side."""
    return statistics.median(a / b for a, b in zip(ours, reference))


def p99(values):
    return statistics.quantiles(values, n=100)[98]


def bench_latency(rounds, count):
    raw = start_raw_echo()
    _, address = start_worker()
    _, keyed_address = start_worker(KEY)
    client = brokest.Client(address)
    keyed = brokest.Client(keyed_address, key=KEY)
    request = brokest.pack_message(None, os.urandom(8), (noop, (), {}))
    with ProcessPoolExecutor(1) as pool:
        variants = {
            "raw pyzmq REQ/REP echo": lambda: raw_round_trip(raw, request),
            "brokest queue(noop)": lambda: client.queue(noop),
            "brokest queue(noop), key": lambda: keyed.queue(noop),
            "brokest queue(noop from __main__)": lambda: client.queue(noop_in_main),
            "ProcessPoolExecutor(1)": lambda: pool.submit(noop).result(),
        }
        for call in variants.values():
            call_times(call, 200)  # warm up: connections, imports, caches
        times, round_medians = interleaved(variants, rounds, count)
    client.shutdown()
    keyed.shutdown()
    raw_rounds = round_medians["raw pyzmq REQ/REP echo"]
    return {name: {"median_us": statistics.median(t), "p99_us": p99(t), "calls": len(t),
                   "ratio_to_raw": ratio(round_medians[name], raw_rounds),
                   "ratio_to_pool": ratio(round_medians[name], round_medians["ProcessPoolExecutor(1)"])}
            for name, t in times.items()}


def bench_throughput(rounds, tasks):
    raws = [start_raw_echo(), start_raw_echo()]
    addresses = [start_worker()[1], start_worker()[1]]
    client = brokest.Client(addresses)
    list(client.map(noop, range(200)))
    request = brokest.pack_message(None, os.urandom(8), (noop, (0,), {}))

    def raw_map():
        def loop(sock):
            for _ in range(tasks // 2):
                raw_round_trip(sock, request)
        threads = [threading.Thread(target=loop, args=(sock,)) for sock in raws]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    per_task = {"raw pyzmq, 2 REP, 2 threads": [], "brokest map over 2 workers": []}
    for _ in range(rounds):
        for name, run in [("raw pyzmq, 2 REP, 2 threads", raw_map),
                          ("brokest map over 2 workers", lambda: list(client.map(noop, range(tasks))))]:
            started = time.perf_counter()
            run()
            per_task[name].append((time.perf_counter() - started) / tasks * 1e6)
    client.shutdown()
    results = {name: {"per_task_us": statistics.median(t), "rounds": t} for name, t in per_task.items()}
    results["ratio"] = ratio(per_task["brokest map over 2 workers"], per_task["raw pyzmq, 2 REP, 2 threads"])
    return results


def bench_scaling(rounds, tasks, iterations):
    addresses = [start_worker()[1], start_worker()[1]]
    seconds = {1: [], 2: []}
    for _ in range(rounds):
        for workers in (1, 2):
            with brokest.Client(addresses[:workers]) as client:
                client.queue(noop)
                started = time.perf_counter()
                list(client.map(burn_cpu, [iterations] * tasks))
                seconds[workers].append(time.perf_counter() - started)
    return {"seconds_on_1_worker": statistics.median(seconds[1]),
            "seconds_on_2_workers": statistics.median(seconds[2]),
            "speed_up": ratio(seconds[1], seconds[2])}


def bench_bandwidth(rounds, megabytes):
    raw = start_raw_echo()
    process, address = start_worker()
    client = brokest.Client(address)
    payloads = {"bytes": os.urandom(megabytes * MB)}
    payloads["numpy"] = numpy.frombuffer(payloads["bytes"], dtype=numpy.float64).copy()
    results = {}
    for kind, payload in payloads.items():
        times = {"raw": [], "brokest": []}
        for _ in range(rounds):
            for name, run in [("raw", lambda: raw_round_trip(raw, [payload])),
                              ("brokest", lambda: client.queue(echo, payload))]:
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        results[kind] = {"raw_s": statistics.median(times["raw"]),
                         "brokest_s": statistics.median(times["brokest"]),
                         "ratio": ratio(times["brokest"], times["raw"])}
    peak_kb = int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{process.pid}/status").read_text())[1])
    client.shutdown()
    return {**results, "payload_mb": megabytes, "worker_peak_rss_mb": peak_kb / 1024}


def bench_lost_worker():
    """Return seconds from SIGKILL and from SIGSTOP of a busy worker to WorkerLost."""
    detection = {}
    for name, signum in [("killed", signal.SIGKILL), ("frozen", signal.SIGSTOP)]:
        process, address = start_worker()
        with tempfile.TemporaryDirectory() as directory, brokest.Client(address) as client:
            marker = Path(directory, "started")
            task = client.submit(touch_then_sleep, marker, 60)
            while not marker.exists():
                time.sleep(0.005)
            process.send_signal(signum)
            started = time.perf_counter()
            try:
                task.result(timeout=30)
            except brokest.WorkerLost:
                detection[name + "_s"] = time.perf_counter() - started
        process.send_signal(signal.SIGCONT)
    return detection


def report(results):
    """Print every target's ratio as a Markdown table (the README's performance table)."""
    latency, throughput = results["latency"], results["throughput"]
    raw = latency["raw pyzmq REQ/REP echo"]["median_us"]
    pool = latency["ProcessPoolExecutor(1)"]["median_us"]
    rows = []
    for name, figures in latency.items():
        if not name.startswith("raw"):
            target = "<= 1.5, below ProcessPoolExecutor" if name.startswith("brokest") else ""
            rows.append((f"latency, {name}", f"{figures['median_us']:.0f} us median, "
                         f"{figures['p99_us']:.0f} us p99", f"raw {raw:.0f} us",
                         figures["ratio_to_raw"], target))
    for name, figures in latency.items():
        if name.startswith("brokest"):
            rows.append((f"latency, {name} / ProcessPoolExecutor(1)", f"{figures['median_us']:.0f} us",
                         f"{pool:.0f} us", figures["ratio_to_pool"], "< 1"))
    ours = throughput["brokest map over 2 workers"]["per_task_us"]
    raw_task = throughput["raw pyzmq, 2 REP, 2 threads"]["per_task_us"]
    rows.append(("throughput, map of 10,000 no-ops over 2 workers", f"{ours:.0f} us per task",
                 f"raw, 2 threads: {raw_task:.0f} us", throughput["ratio"], "<= 1.5"))
    scaling = results["scaling"]
    rows.append(("scaling, CPU-bound map: 1 worker / 2 workers",
                 f"{scaling['seconds_on_2_workers']:.2f} s", f"{scaling['seconds_on_1_worker']:.2f} s",
                 scaling["speed_up"], ">= 1.8"))
    bandwidth = results["bandwidth"]
    for kind in ("bytes", "numpy"):
        figures = bandwidth[kind]
        rows.append((f"bandwidth, {bandwidth['payload_mb']} MB {kind} echoed", f"{figures['brokest_s'] * 1000:.0f} ms",
                     f"raw copy=False: {figures['raw_s'] * 1000:.0f} ms",
                     figures["ratio"], "<= 1.5"))
    rows.append(("worker peak RSS / payload", f"{bandwidth['worker_peak_rss_mb']:.0f} MB",
                 f"{bandwidth['payload_mb']} MB", bandwidth["worker_peak_rss_mb"] / bandwidth["payload_mb"],
                 "<= 3"))
    lost = results["lost_worker"]
    rows.append(("killed worker -> WorkerLost", f"{lost['killed_s'] * 1000:.0f} ms", "", None, "< 5 s"))
    rows.append(("frozen worker -> WorkerLost", f"{lost['frozen_s']:.2f} s", "", None, "< 10 s"))
    print("\n| measure | brokest | reference | ratio | target |\n| --- | --- | --- | --- | --- |")
    for name, figures, reference, ratio, target in rows:
        print(f"| {name} | {figures} | {reference} | {'' if ratio is None else f'{ratio:.2f}'} | {target} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke test")
    parser.add_argument("--json", default=str(HERE / "results.json"), help="where to write results")
    args = parser.parse_args()
    if args.raw_echo:
        return raw_echo_server(args.raw_echo)
    scale = 1 if args.quick else 5
    try:
        results = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                       f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}",
            "latency": bench_latency(rounds=4 * scale, count=250),
            "throughput": bench_throughput(rounds=scale, tasks=10_000),
            "scaling": bench_scaling(rounds=max(1, scale - 2), tasks=8,
                                     iterations=1_000_000 if args.quick else 3_000_000),
            "bandwidth": bench_bandwidth(rounds=scale, megabytes=100),
            "lost_worker": bench_lost_worker(),
        }
    finally:
        for process in started_processes:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()
    print(results["machine"])
    report(results)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
