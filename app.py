"""brokest in one page: queue() a function, see an exception come home, map() a job over workers.

python app.py                                          # starts two local workers of its own
python app.py --address tcp://127.0.0.1:9090,tcp://127.0.0.1:9091   # uses running workers
"""

import argparse
import os
import socket
import subprocess
import sys
import time

import brokest


def count_primes(start, stop):
    """Count the primes in [start, stop) by trial division: slow on purpose, all CPU."""
    return sum(all(n % d for d in range(2, int(n**0.5) + 1)) for n in range(max(start, 2), stop))


def start_local_workers(count):
    """Start count workers on ports the OS says are free; return their processes and addresses."""
    ports = []
    for _ in range(count):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    workers = [
        subprocess.Popen([sys.executable, brokest.__file__, "--port", str(port), "-q"])
        for port in ports
    ]
    return workers, [f"tcp://127.0.0.1:{port}" for port in ports]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="comma-separated worker addresses (default: start two)")
    args = parser.parse_args()
    if args.address:
        workers, addresses = [], args.address.split(",")
    else:
        workers, addresses = start_local_workers(2)
    os.environ["BROKEST_ADDRESS"] = ",".join(addresses)  # what brokest.queue() reads
    try:
        # 1. queue(): the function and its arguments go to a worker, the result comes back.
        print("primes below 100:", brokest.queue(count_primes, 0, 100))

        # 2. An exception raised on the worker is raised here, with the worker's traceback.
        try:
            brokest.queue(count_primes, 0, "ten")
        except TypeError as error:
            print("came home from the worker:", repr(error))

        # 3. Client.map runs chunks of a CPU-bound job on every worker at once.
        chunks = [(start, start + 20_000) for start in range(0, 360_000, 20_000)]
        started = time.perf_counter()
        here = sum(count_primes(start, stop) for start, stop in chunks)
        one_process = time.perf_counter() - started
        print(f"primes below 360,000 in this process: {here} in {one_process:.2f} s")
        with brokest.Client(addresses, timeout=60) as client:
            print(f"on {len(addresses)} workers: ", end="", flush=True)
            started, total = time.perf_counter(), 0
            for count in client.map(count_primes, *zip(*chunks)):
                total += count
                print(".", end="", flush=True)  # one dot per chunk, as results come in
            on_workers = time.perf_counter() - started
        print(f" {total} in {on_workers:.2f} s, {one_process / on_workers:.1f}x one process")
    finally:
        for worker in workers:
            worker.terminate()  # each finishes its task, closes its socket and exits
            worker.wait()


if __name__ == "__main__":
    main()
