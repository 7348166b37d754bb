"""brokest: run a Python function in another process, or on another machine, over ZeroMQ.

    from brokest import queue
    words = queue(count_words, "book.txt")   # runs on a worker, returns count_words's result
    # a worker was started first with:  python brokest.py

The wire protocol is one round trip per task, from a client's REQ socket to a worker's REP
socket. Requests and replies have the same frames:

  Client (REQ)                                          Worker (REP)
  queue(fn, *args, **kwargs)
    [signature][request id][pickle (fn, args, kwargs)][buffer]...  -->  verify, unpickle, run fn
    <--  [signature][request id][pickle outcome][buffer]...             outcome of running fn

  signature   HMAC-SHA256(key, each later frame's length as 8 bytes big-endian, then its bytes);
              an empty frame when there is no key
  request id  8 random bytes, fresh for every task; the reply echoes them
  pickle      protocol 5: plain pickle where everything can be found by name, cloudpickle
              (code by value) where not; large buffers (numpy arrays, big bytes) leave the
              pickle and travel as [buffer] frames of their own, without being copied
  outcome     ("result", value) | ("exception", (exception, traceback text)) | ("error", message)

What can go wrong, and what the caller sees:
  fn raises            the same exception, the worker's traceback as its __cause__
  the worker can't     RemoteError saying why: bad signature, malformed message, unpicklable
  run or answer it     result or exception, a module the worker lacks
  the worker dies      WorkerLost (a ConnectionError), sent again first if retries > 0
  timeout passes       TimeoutError; the client replaces its socket and stays usable

A message whose signature does not verify is never unpickled, on either side.
A dead or frozen worker surfaces as WorkerLost within seconds, even with no timeout.
Shipping pickled code means both ends must trust each other: a worker runs whatever a key
holder sends it, and a client unpickles whatever its worker answers.
"""
import argparse
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import cloudpickle
import zmq

# Named "brokest", not __name__, so that logging is configured the same way whether this
# file is imported or run as `python brokest.py` (where __name__ is "__main__").
log = logging.getLogger("brokest")

DEFAULT_ADDRESS = "tcp://127.0.0.1:9090"
# How often a client pings its worker, and how long a silent worker may stay quiet before we
# call it lost. The worker's libzmq I/O thread answers pings even while a task holds the GIL,
# so a long task is never mistaken for a dead worker; a frozen one is noticed in about 2 s.
HEARTBEAT_INTERVAL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500
# How long a serving worker waits for a request before it checks whether stop() was called.
STOP_CHECK_MS = 100
# How long a call waits for a worker to come up before it says so in the log.
WAITING_WARNING_S = 3.0
# Bytes-like arguments and results this large travel as frames of their own; smaller ones are
# cheaper to copy into the pickle than to send separately.
OUT_OF_BAND_MIN_BYTES = 64 * 1024
# Poll flags as plain ints: arithmetic on pyzmq's flag enums costs microseconds per call.
POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)


# --- Errors the caller sees ---

class RemoteError(Exception):
    """The worker could not run or answer the request; the message says why."""


class AuthenticationError(RemoteError):
    """A message's signature did not verify: the two ends do not share the same key."""


class WorkerLost(ConnectionError):
    """The worker died, froze, or dropped the connection while the task was in flight."""


class RemoteTraceback(Exception):
    """The worker's traceback text, attached to a task's exception as its __cause__."""

    def __str__(self):
        return self.args[0]


# --- Wire protocol ---

def sign(key, frames):
    """Return the signature of frames under key, or b"" when there is no key."""
    if key is None:
        return b""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for frame in frames:
        # Signing each length too means no bytes can slide across a frame boundary unseen.
        mac.update(len(frame).to_bytes(8, "big"))
        mac.update(frame)
    return mac.digest()


def pack_message(key, request_id, payload):
    """Return the signed frames of a message carrying payload, its large buffers as frames."""
    body, buffers = dumps(payload)
    frames = [request_id, body, *(buffer.raw() for buffer in buffers)]
    return [sign(key, frames), *frames]


def dumps(payload):
    """Return the protocol-5 pickle of payload and the buffers it left out of band."""
    # Plain pickle is several times faster than cloudpickle, and writes the same bytes when
    # everything in payload can be found by name on the other side. When it cannot (a lambda,
    # a nested function, anything from __main__, a module registered to go by value), pickle
    # fails or names __main__, and cloudpickle sends that code by value instead.
    if not cloudpickle.list_registry_pickle_by_value():
        buffers = []
        try:
            body = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
            if b"__main__" not in body:
                return body, buffers
        except (pickle.PicklingError, TypeError, AttributeError):
            pass
    buffers = []
    return cloudpickle.dumps(payload, protocol=5, buffer_callback=buffers.append), buffers


def unpack_message(key, frames):
    """Return (request id, payload) of a message, unpickled only if its signature verifies."""
    if len(frames) < 3:
        raise RemoteError(f"malformed message: {len(frames)} frames, expected at least 3")
    signature, request_id, body, *buffers = frames
    # Verify before unpickling: unpickling can run arbitrary code. compare_digest takes the
    # same time wherever the bytes differ, so timing does not reveal the right signature.
    if not hmac.compare_digest(signature, sign(key, frames[1:])):
        raise AuthenticationError("signature did not verify: do both ends use the same key?")
    try:
        return bytes(request_id), pickle.loads(body, buffers=buffers)
    except ModuleNotFoundError as error:  # something was pickled by reference to a module
        raise RemoteError(f"could not unpickle the message: {error!r}; install {error.name} "
                          f"where it is unpickled, or send it by value: call cloudpickle."
                          f"register_pickle_by_value({error.name}) before sending") from None
    except (Exception, SystemExit) as error:
        raise RemoteError(f"could not unpickle the message: {error!r}") from None


def receive(socket):
    """Return the frames of the next message on socket, as buffers sharing ZeroMQ's memory."""
    return [frame.buffer for frame in socket.recv_multipart(copy=False)]


class _OutOfBand:
    """A large bytes, bytearray or memoryview, pickled as a buffer that travels as its own frame."""

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        # pickle copies bytes into the pickle and refuses memoryviews; a PickleBuffer goes
        # out of band. Rebuilt by bytes(), bytearray() or memoryview(), so no brokest class
        # needs to exist on the other side.
        return type(self.data), (pickle.PickleBuffer(self.data),)


def out_of_band(value):
    """Return value wrapped to travel out of band if it is a large bytes-like, else value."""
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) >= OUT_OF_BAND_MIN_BYTES:
        return _OutOfBand(value)
    return value


def run_task(fn, args, kwargs):
    """Return the outcome of fn(*args, **kwargs): its result, or its exception and traceback."""
    try:
        return "result", out_of_band(fn(*args, **kwargs))
    except BaseException as exception:  # SystemExit too: a task never ends its worker
        return "exception", (exception, "".join(traceback.format_exception(exception)))


def unpicklable_outcome(outcome, error):
    """Return the error outcome that replaces an outcome which could not be pickled."""
    kind, value = outcome
    if kind == "result":
        return "error", f"the result of type {type(value).__name__} could not be pickled: {error!r}"
    exception, remote_traceback = value
    return "error", (f"the task raised {type(exception).__name__}, which could not be pickled "
                     f"({error!r}); its traceback on the worker:\n{remote_traceback}")


def outcome_status(outcome):
    """Return how a task ended, as the worker logs it: "ok" or "error <exception type>"."""
    kind, value = outcome
    if kind == "result":
        return "ok"
    return f"error {type(value[0]).__name__ if kind == 'exception' else 'RemoteError'}"


def result_of(outcome):
    """Return the result an outcome carries, or raise the exception or RemoteError it carries."""
    kind, value = outcome
    if kind == "result":
        return value
    if kind == "exception":
        exception, remote_traceback = value
        exception.__cause__ = RemoteTraceback(remote_traceback)
        raise exception
    raise RemoteError(value)


def as_key(key):
    """Return key as bytes (a str is UTF-8 encoded), or None when there is no key."""
    return (key.encode() if isinstance(key, str) else key) or None


def is_loopback(host):
    """Return whether host is reachable only from this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# --- Worker ---

class Worker:
    """Serves tasks on a REP socket: receives a call, runs it, answers with its outcome.

    host, port: where to listen; port 0 picks a free port, shown in `address` once bound.
    key: the shared secret (str or bytes) every request must be signed with.
    insecure: allow a host other than loopback without a key (anyone reaching it can run code).
    max_message_size: the largest frame accepted, in bytes; a peer sending a larger one is
        disconnected by ZeroMQ before the frame is read into memory.
    """

    def __init__(self, host="127.0.0.1", port=9090, *, key=None, insecure=False,
                 max_message_size=None):
        self.key = as_key(key)
        if self.key is None and not insecure and not is_loopback(host):
            raise ValueError(f"refusing to listen on {host} without a key: anyone reaching it "
                             "could run any code as this user. Pass --key-file F (key=...), or "
                             "--insecure (insecure=True) to accept the risk")
        self.host, self.port, self.max_message_size = host, port, max_message_size
        self.address = None
        self._stopping = threading.Event()

    def start(self):
        """Bind, then serve requests until stop(), SIGINT or SIGTERM; a running task finishes first."""
        # A context of its own: closing a socket frees its port later, in the background;
        # terminating its context waits until that is done, so the port is free on return.
        context = zmq.Context()
        socket = context.socket(zmq.REP)
        socket.linger = 0
        socket.rcvtimeo = STOP_CHECK_MS
        if self.max_message_size:
            socket.maxmsgsize = self.max_message_size
        try:
            with stop_on_signals(self.stop):  # before we say we listen: a signal may follow
                socket.bind(f"tcp://{self.host}:{self.port or '*'}")
                self.address = socket.last_endpoint.decode()
                log.info("worker %d listening on %s", os.getpid(), self.address)
                while not self._stopping.is_set():
                    try:
                        request = receive(socket)
                    except zmq.Again:
                        continue
                    socket.send_multipart(self.answer(request), copy=False)
        finally:
            socket.close()
            context.term()
        log.info("worker %d on %s stopped", os.getpid(), self.address)

    def stop(self):
        """Make start() return within about STOP_CHECK_MS; callable from any thread, once."""
        self._stopping.set()

    def answer(self, request):
        """Return the reply to one request's frames; a bad request gets an error reply."""
        started = time.perf_counter()
        request_id = bytes(request[1]) if len(request) > 1 else b""
        try:
            request_id, (fn, args, kwargs) = unpack_message(self.key, request)
        except Exception as error:
            log.warning("rejected a request: %s", error)
            return pack_message(self.key, request_id, ("error", f"request rejected: {error}"))
        outcome = run_task(fn, args, kwargs)
        try:
            reply = pack_message(self.key, request_id, outcome)
        except Exception as error:
            outcome = unpicklable_outcome(outcome, error)
            reply = pack_message(self.key, request_id, outcome)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %.1f ms %s", getattr(fn, "__qualname__", type(fn).__qualname__),
                     (time.perf_counter() - started) * 1000, outcome_status(outcome))
        return reply


@contextlib.contextmanager
def stop_on_signals(stop):
    """Within the block, SIGINT and SIGTERM call stop(); only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda *_: stop()) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- Client ---

class Connection:
    """One REQ socket to one worker: used by one thread at a time, renewed after a failure."""

    def __init__(self, address):
        self.address = address
        self.open()

    def open(self):
        """Open a fresh REQ socket to the worker, with heartbeats and a disconnect monitor."""
        self.socket = zmq.Context.instance().socket(zmq.REQ)
        self.socket.linger = 0     # closing drops an unsent request at once, never blocks
        self.socket.immediate = 1  # a request waits for a live connection instead of a queue
        self.socket.heartbeat_ivl = HEARTBEAT_INTERVAL_MS
        self.socket.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS
        # A REQ socket never says that its worker went away; its monitor does.
        self.disconnects = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self.disconnects, zmq.POLLIN)
        self.socket.connect(self.address)

    def close(self):
        """Close the socket and its monitor."""
        self.socket.disable_monitor()
        self.disconnects.close()
        self.socket.close()

    def is_ready(self):
        """Return whether a worker is connected, so that a request can be sent at once."""
        return bool(self.socket.get(zmq.EVENTS) & POLLOUT)

    def round_trip(self, request, timeout):
        """Send a request's frames and return the reply's; raise WorkerLost or TimeoutError."""
        while self.disconnects.get(zmq.EVENTS) & POLLIN:
            self.disconnects.recv_multipart()  # from before this request: the worker is back
        try:
            self.socket.send_multipart(request, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise WorkerLost(f"the worker at {self.address} went away before the task was sent")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ms = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
            ready = dict(self.poller.poll(wait_ms))
            if self.socket in ready:
                return receive(self.socket)
            lost = self.disconnects in ready
            if lost or (deadline is not None and time.monotonic() >= deadline):
                # REQ sockets only allow send and receive in strict turns, so after a lost or
                # abandoned request this one is stuck: close it and open a fresh one (the
                # Guide's "Lazy Pirate"). A late reply goes to the closed socket, never to us.
                self.close()
                self.open()
                if lost:
                    raise WorkerLost(f"lost the connection to the worker at {self.address} "
                                     "while the task was in flight")
                raise TimeoutError(f"no reply from the worker at {self.address} within {timeout} s")


class Client(Executor):
    """Runs tasks on workers, each worker at most one task at a time; safe to share among threads.

    addresses: one address, a list, or a comma-separated string ("tcp://host:port").
    timeout: seconds a task may take on a worker (from sending it to its reply); None = no limit.
    key: the shared secret (str or bytes) messages are signed with; None = unsigned.
    retries: how often a task is sent again after WorkerLost; a task that raised is never resent.
    """

    def __init__(self, addresses=DEFAULT_ADDRESS, *, timeout=None, key=None, retries=0):
        if isinstance(addresses, str):
            addresses = addresses.split(",")
        self.addresses = [address.strip() for address in addresses if address.strip()]
        if not self.addresses:
            raise ValueError("a Client needs at least one worker address")
        self.timeout, self.key, self.retries = timeout, as_key(key), retries
        self._idle = [Connection(address) for address in self.addresses]
        self._changed = threading.Condition()
        self._closed = False
        # submit() runs queue() on these threads: one per worker keeps every worker busy.
        self._threads = ThreadPoolExecutor(len(self.addresses), thread_name_prefix="brokest")

    def queue(self, fn, /, *args, **kwargs):
        """Run fn(*args, **kwargs) on an idle worker and return its result, or raise its exception."""
        request_id = os.urandom(8)
        call = (fn, tuple(map(out_of_band, args)), {k: out_of_band(v) for k, v in kwargs.items()})
        request = pack_message(self.key, request_id, call)
        for attempt in range(self.retries + 1):
            connection = self._checkout()
            try:
                reply = connection.round_trip(request, self.timeout)
                break
            except WorkerLost as lost:
                if attempt == self.retries:
                    raise
                log.warning("%s; sending the task again (retry %d of %d)", lost, attempt + 1,
                            self.retries)
            finally:
                self._checkin(connection)
        reply_id, outcome = unpack_message(self.key, reply)
        if reply_id != request_id:
            raise RemoteError("the reply answers a different request")
        return result_of(outcome)

    def submit(self, fn, /, *args, **kwargs):
        """Schedule fn(*args, **kwargs) on a worker; return a concurrent.futures.Future."""
        return self._threads.submit(self.queue, fn, *args, **kwargs)

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop taking tasks; close the sockets once the tasks already submitted are done."""
        self._threads.shutdown(wait, cancel_futures=cancel_futures)
        if not wait:
            threading.Thread(target=self.shutdown, daemon=True).start()
            return
        with self._changed:
            self._closed = True
            for connection in self._idle:
                connection.close()
            self._idle.clear()
            self._changed.notify_all()

    def _checkout(self):
        """Take an idle connection whose worker is up, waiting while there is none."""
        nobody_up_since, delay, warned = None, 0.001, False
        with self._changed:
            while True:
                if self._closed:
                    raise RuntimeError("cannot run a task on a Client that was shut down")
                for connection in self._idle:
                    if connection.is_ready():
                        self._idle.remove(connection)
                        return connection
                # With every connection idle and none ready, no worker is up: that wait counts
                # against the timeout. Waiting for a busy worker to finish does not.
                if len(self._idle) < len(self.addresses):
                    nobody_up_since = None
                else:
                    nobody_up_since = nobody_up_since or time.monotonic()
                    waited = time.monotonic() - nobody_up_since
                    if self.timeout is not None and waited >= self.timeout:
                        raise TimeoutError(f"no worker came up at {', '.join(self.addresses)} "
                                           f"within {self.timeout} s")
                    if waited >= WAITING_WARNING_S and not warned:
                        log.warning("waiting for a worker to come up at %s", ", ".join(self.addresses))
                        warned = True
                # Checkins notify; a worker coming up does not, so look again soon.
                self._changed.wait(delay)
                delay = min(delay * 2, 0.1)

    def _checkin(self, connection):
        """Return a connection to the idle ones, or close it if the Client was shut down."""
        with self._changed:
            if self._closed:
                connection.close()
            else:
                self._idle.append(connection)
                self._changed.notify()


_default_client = None
_default_client_lock = threading.Lock()


def queue(fn, /, *args, **kwargs):
    """Run fn(*args, **kwargs) on a worker and return its result, or raise its exception.

    Uses one Client per process, built on first use from BROKEST_ADDRESS (comma-separated;
    default tcp://127.0.0.1:9090), BROKEST_KEY and BROKEST_TIMEOUT (seconds; unset = no limit).
    """
    global _default_client
    with _default_client_lock:
        if _default_client is None:
            timeout = os.environ.get("BROKEST_TIMEOUT")
            _default_client = Client(os.environ.get("BROKEST_ADDRESS", DEFAULT_ADDRESS),
                                     timeout=float(timeout) if timeout else None,
                                     key=os.environ.get("BROKEST_KEY"))
    return _default_client.queue(fn, *args, **kwargs)


# --- Command line ---

def configure_logging(level):
    """Log to stderr at level, one line per event, naming the process."""
    logging.basicConfig(level=level, format="%(asctime)s brokest[%(process)d] %(message)s")


def run_worker(log_level, options):
    """Run one Worker in this process (the target of each --processes child)."""
    configure_logging(log_level)
    Worker(**options).start()


def main(argv=None):
    """Start workers as the command line says; return when they have stopped."""
    parser = argparse.ArgumentParser(prog="brokest", description="Start brokest workers, which "
                                     "run the functions clients send them, until Ctrl-C or SIGTERM.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=9090, help="first port; 0: any free (%(default)s)")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="run N worker processes, on ports PORT..PORT+N-1")
    parser.add_argument("--key-file", metavar="F", help="file with the key (default: $BROKEST_KEY)")
    parser.add_argument("--insecure", action="store_true", help="allow any --host without a key")
    parser.add_argument("--max-message-size", type=int, metavar="BYTES",
                        help="disconnect peers that send a larger frame")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="log less")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    log_level = logging.INFO + 10 * (args.quiet - args.verbose)
    configure_logging(log_level)
    try:
        key = Path(args.key_file).read_bytes().strip() if args.key_file else os.environ.get("BROKEST_KEY")
        if args.key_file and not key:
            raise ValueError(f"the key file {args.key_file} is empty")
        workers = [dict(host=args.host, port=args.port and args.port + n, key=key,
                        insecure=args.insecure, max_message_size=args.max_message_size)
                   for n in range(args.processes)]
        Worker(**workers[0])  # refuses an unsafe configuration before anything starts
    except (OSError, ValueError) as error:
        parser.exit(2, f"brokest: {error}\n")
    if len(workers) == 1:
        try:
            return Worker(**workers[0]).start()
        except zmq.ZMQError as error:
            parser.exit(2, f"brokest: cannot listen on {args.host}:{args.port}: {error}\n")
    processes = [multiprocessing.Process(target=run_worker, args=(log_level, options))
                 for options in workers]
    stopping = threading.Event()
    with stop_on_signals(stopping.set):
        for process in processes:
            process.start()
        while not stopping.wait(0.5) and any(process.is_alive() for process in processes):
            pass
    for process in processes:
        process.terminate()  # SIGTERM: each worker finishes its task and closes its socket
    for process in processes:
        process.join()


if __name__ == "__main__":
    main()
