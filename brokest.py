"""brokest: run a Python function in another process, or on another machine, over ZeroMQ.

    from brokest import queue
    words = queue(count_words, "book.txt")   # runs on a worker, returns count_words's result
    # a worker was started first with:  python brokest.py

The wire protocol is one round trip per task, from a client's REQ socket to a worker's REP
socket. Requests and replies have the same frames:

  Client (REQ)                                                     Worker (REP)
    <-- with a key: CurveZMQ handshake, fresh keys for every connection -->
  queue(fn, *args, **kwargs)
    [signature][request id][function][pickle (calls, time limit)][buffer]...  -->  verify,
    <--  [signature][request id][retiring][pickle [outcome, ...]][buffer]...  unpickle, run each call

  signature   HMAC-SHA256(key, each later frame's length as 8 bytes big-endian, then its bytes);
              an empty frame when there is no key
  request id  8 random bytes, fresh for every task; the reply echoes them
  function    fn, pickled on its own: map() pickles it once for all its calls, and a worker
              keeps the functions it unpickled last
  calls       [(args, kwargs), ...]: one call for queue() and submit(), chunksize for map()
  time limit  the client's timeout: the worker stops a call that runs longer (None: no limit)
  retiring    empty; b"retiring" when this worker process ends after this reply, so the
              client waits for its successor before it uses that connection again
  outcomes    None when a retiring worker did not run the request: the client sends it again
  pickle      cloudpickle, protocol 5: by name what the other side can import, by value
              what it cannot (a lambda, code from __main__); large buffers (numpy arrays,
              big bytes) leave the pickle and travel as [buffer] frames of their own, uncopied
  outcome     ("result", value) | ("exception", (exception, traceback text)) | ("error", message)
  CurveZMQ    the worker's CURVE secret key is z85(HMAC-SHA256(key, b"brokest curve server
              key")); a client knows its public key and brings a fresh keypair of its own

What can go wrong, and what the caller sees:
  fn raises            the same exception, the worker's traceback as its __cause__
  the worker can't     RemoteError saying why: bad signature, malformed message, unpicklable
  run or answer it     result or exception, a module the worker lacks
  the keys differ      AuthenticationError: the handshake fails, and the request never leaves
  the worker dies      WorkerLost (a ConnectionError), sent again first if retries > 0
  the worker retires   nothing: what it did not run is sent again, to its successor or another
  timeout passes       TimeoutError, raised inside the task on the worker, which serves on
  the task ignores it  TimeoutError; 2 s later its supervisor (python brokest.py) ends the
                       worker process, and starts another on the same port

A message whose signature does not verify is never unpickled, on either side.
A dead or frozen worker surfaces as WorkerLost within seconds, even with no timeout.
With a key the traffic is encrypted, only the key's holders can talk to a worker or pose as
one, and bytes recorded on the path run nothing when sent again (CurveZMQ's ephemeral keys).
Shipping pickled code means both ends must trust each other: a worker runs whatever a key
holder sends it, and a client unpickles whatever its worker answers.
"""
import argparse
import collections
import contextlib
import faulthandler
import functools
import hmac
import ipaddress
import itertools
import logging
import math
import multiprocessing.connection
import os
import pickle
import resource
import signal
import threading
import time
import traceback
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from socket import create_server

import cloudpickle
import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

# Named "brokest", not __name__, so that logging is configured the same way whether this
# file is imported or run as `python brokest.py` (where __name__ is "__main__").
log = logging.getLogger("brokest")

DEFAULT_ADDRESS = "tcp://127.0.0.1:9090"
# How often a client pings its worker, and how long a silent worker may stay quiet before we
# call it lost. The worker's libzmq I/O thread answers pings even while a task holds the GIL,
# so a long task is never mistaken for a dead worker; a frozen one is noticed in about 2 s.
HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS = 500, 1500
# How long a waiting client or worker looks only at its sockets before it checks the rest:
# whether a worker was lost or is late, whether stop() was called.
CHECK_INTERVAL_MS = 100
# How soon a client tries again to reach a worker that went away, and how often at most while
# it stays down (libzmq doubles the interval). A retired worker's successor serves the same
# port within milliseconds; a Client of a thousand addresses, most of them down, would spend a
# core at libzmq's 100 ms.
RECONNECT_INTERVAL_MS, RECONNECT_INTERVAL_MAX_MS = 10, 1000
# How long a call waits for a worker to come up before it says so in the log.
WAITING_WARNING_S = 3.0
# How long past its timeout a client still waits for the worker's own TimeoutError, which
# carries the task's traceback, before it gives up on the reply.
TIMEOUT_GRACE_S = 0.5
# How long a task may run past its time limit (it caught the TimeoutError, or it is stuck in
# C code) before its supervisor ends it with its worker process.
HARD_LIMIT_GRACE_S = 2.0
# How long a retiring worker still answers "not run" after the last request it read, and at
# most in all: requests on their way arrive, and its successor need not wait long.
DRAIN_QUIET_MS, DRAIN_MAX_S = 100, 1.0
# How many handshakes in a row may fail without detail before we call the key wrong. A wrong
# CURVE key fails every attempt; a worker that dies during a handshake spoils only one.
HANDSHAKE_ATTEMPTS = 3
# How long a supervisor waits before replacing a worker that died within a second of its
# start, doubling each time it happens again, up to the maximum: never a tight restart loop.
RESTART_DELAY_S, RESTART_DELAY_MAX_S = 0.1, 10.0
# Bytes-like arguments and results this large travel as frames of their own; smaller ones are
# cheaper to copy into the pickle than to send separately.
OUT_OF_BAND_MIN_BYTES = 64 * 1024
# Poll flags as plain ints: arithmetic on pyzmq's flag enums costs microseconds per call.
POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
# The signals that stop a worker once its task is answered (SIGHUP, too: its supervisor then
# starts a fresh one), and that a supervisor handles.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


# --- Errors the caller sees ---

class RemoteError(Exception):
    """The worker could not run or answer the request; the message says why."""


class AuthenticationError(RemoteError):
    """The two ends do not share the same key: a handshake or a signature failed."""


class WorkerLost(ConnectionError):
    """The worker died, froze, or dropped the connection while the task was in flight."""


class RemoteTraceback(Exception):
    """The worker's traceback text, attached to a task's exception as its __cause__."""


# --- Wire protocol ---

def sign(key, frames):
    """Return the signature of frames under key, or b"" when there is no key."""
    if key is None:
        return b""
    mac = hmac.new(key, digestmod="sha256")
    for frame in frames:
        # Signing each length too means no bytes can slide across a frame boundary unseen.
        mac.update(len(frame).to_bytes(8, "big"))
        mac.update(frame)
    return mac.digest()


def pack_message(key, request_id, head, payload):
    """Return the signed frames of a message: its head (a request's pickled function, a reply's
    retiring), then payload's pickle, its large buffers as frames of their own."""
    buffers = []
    body = cloudpickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    frames = [request_id, head, body, *(buffer.raw() for buffer in buffers)]
    return [sign(key, frames), *frames]


def unpack_message(key, frames):
    """Return (request id, head, payload) of a message, unpickled only if its signature
    verifies."""
    if len(frames) < 4:
        raise RemoteError(f"malformed message: {len(frames)} frames, expected at least 4")
    signature, request_id, head, body, *buffers = frames
    # Verify before unpickling: unpickling can run arbitrary code. compare_digest takes the
    # same time wherever the bytes differ, so timing does not reveal the right signature.
    if not hmac.compare_digest(signature, sign(key, frames[1:])):
        raise AuthenticationError("signature did not verify: do both ends use the same key?")
    return bytes(request_id), head, loads(body, buffers)


def request_id_of(frames):
    """Return the request id of a message that may not verify, or b"" if it has none."""
    return bytes(frames[1]) if len(frames) > 1 else b""


def loads(body, buffers=()):
    """Return what body unpickles to; raise RemoteError saying why it cannot be unpickled."""
    try:
        return pickle.loads(body, buffers=buffers)
    except ModuleNotFoundError as error:  # something was pickled by reference to a module
        raise RemoteError(f"could not unpickle the message: {error!r}; install {error.name} where it is "
                          f"unpickled, or call cloudpickle.register_pickle_by_value({error.name}) to send it by value") from None
    except (Exception, SystemExit) as error:
        raise RemoteError(f"could not unpickle the message: {error!r}") from None


# load_function(bytes) unpickles a function as loads() does, and keeps the last 64: rebuilding
# a function sent by value is worth doing once, not for every call. Its pickle holds the
# values of the globals it reads, so a new value makes new bytes.
load_function = functools.lru_cache(maxsize=64)(loads)


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


def run_task(fn, call, deadline):
    """Return the outcome of one call (args, kwargs) of fn: its result, or its exception and
    traceback. deadline: when (time.monotonic(); inf: never) to stop it by raising
    TimeoutError inside."""
    try:
        args, kwargs = call
        if deadline < math.inf:
            # SIGALRM comes at the deadline, and its handler raises TimeoutError wherever fn
            # is, so that fn's own clean-up (except, finally, with) runs.
            signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-6))
        try:
            return "result", out_of_band(fn(*args, **kwargs))
        finally:
            if deadline < math.inf:  # a system call, saved for every call without a limit
                signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as exception:  # SystemExit too: a task never ends its worker
        return "exception", (exception, "".join(traceback.format_exception(exception)))


def raise_time_limit(signum, frame):
    """Handle SIGALRM, which comes when a task's time limit has passed: stop the task."""
    raise TimeoutError("the task ran past its time limit")


def picklable(outcome):
    """Return outcome if it can be pickled, else the error outcome that says why not."""
    try:
        cloudpickle.dumps(outcome, protocol=5)
        return outcome
    except Exception as error:
        kind, value = outcome
        if kind == "result":
            return "error", f"the result of type {type(value).__name__} could not be pickled: {error!r}"
        return "error", (f"the task raised {type(value[0]).__name__}, which could not be "
                         f"pickled ({error!r}); its traceback on the worker:\n{value[1]}")


def status_of(outcomes):
    """Return how a task ended, as the worker logs it: "ok" or "error <exception type>"."""
    for kind, value in outcomes:
        if kind != "result":
            return f"error {type(value[0]).__name__ if kind == 'exception' else 'RemoteError'}"
    return "ok"


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


def curve_secret_key(key):
    """Return the worker's CURVE secret key, derived from the shared key (z85-encoded)."""
    return z85.encode(hmac.digest(key, b"brokest curve server key", "sha256"))


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
    key: the shared secret (str or bytes): it encrypts the traffic and signs every message.
    insecure: allow a host other than loopback without a key (anyone reaching it can run code).
    time_limit: the most seconds a task may run here; a client's timeout may make it shorter.
        Enforced when start() runs in the main thread, where SIGALRM's handler runs. A task
        that runs on HARD_LIMIT_GRACE_S past it is ended with its process only by a
        supervisor (python brokest.py); a Worker started by other code publishes the deadline
        in `hard_deadline` and enforces nothing more itself.
    max_tasks, max_memory: retire after that many tasks (a map chunk is one), or after a task
        that left the peak resident memory above max_memory MB; the supervisor starts a fresh
        process on the same port.
    fd: a listening TCP socket to serve on instead of binding anew (-1: none); a supervisor
        keeps the port open this way while it replaces the worker.
    """

    def __init__(self, host="127.0.0.1", port=9090, *, key=None, insecure=False,
                 time_limit=None, max_tasks=None, max_memory=None, fd=-1):
        self.key = as_key(key)
        if self.key is None and not insecure and not is_loopback(host):
            raise ValueError(f"refusing to listen on {host} without a key: anyone reaching it could "
                             "run any code. Use --key-file F (key=...), or --insecure to accept the risk")
        if any(limit is not None and limit < 1 for limit in (max_tasks, max_memory)):
            raise ValueError("--max-tasks and --max-memory must be at least 1")
        self.host, self.port, self.time_limit, self.fd = host, port, time_limit, fd
        self.max_tasks, self.max_memory, self.tasks = max_tasks, max_memory, 0
        self.address, self._stopping = None, threading.Event()
        # When the running task passes its hard limit (time.monotonic(); inf: no task, or no
        # limit), in memory that a supervisor which forked us shares: it ends us then.
        self.hard_deadline = multiprocessing.RawValue("d", math.inf)

    def start(self):
        """Bind, then answer requests until stop(), SIGINT, SIGTERM or SIGHUP, or until
        retired; then drain the socket."""
        # A context of its own: closing a socket frees its port later, in the background;
        # terminating its context (leaving the with) waits until that is done, so the port is
        # free when start() returns. A reply still on its way gets a second to leave.
        with zmq.Context() as context, context.socket(zmq.REP) as socket:
            socket.linger, socket.rcvtimeo, socket.use_fd = 1000, CHECK_INTERVAL_MS, self.fd
            if self.key:
                socket.curve_server = True
                socket.curve_secretkey = curve_secret_key(self.key)
            # Handlers before we say we listen: a signal may follow at once.
            with signal_handlers({**dict.fromkeys(STOP_SIGNALS, self.stop), signal.SIGALRM: raise_time_limit}):
                socket.bind(f"tcp://{self.host}:{self.port or '*'}")
                self.address = socket.last_endpoint.decode()
                log.info("worker %d listening on %s", os.getpid(), self.address)
                while not self._stopping.is_set():
                    try:
                        request = receive(socket)
                    except zmq.Again:
                        continue
                    reply, log_line = self.answer(request)
                    socket.send_multipart(reply, copy=False)
                    del request, reply  # large ones would stay in memory while the next one comes
                    log.log(*log_line)  # after the reply: the caller need not wait for it
                self.drain(socket)
        log.info("worker %d on %s stopped", os.getpid(), self.address)

    def stop(self, *signal_args):
        """Make start() return once the running task is answered and the socket drained (about
        a second at most); callable from any thread, and again."""
        self._stopping.set()

    def answer(self, request):
        """Return the reply to one request's frames, and its log line; a bad request gets an error."""
        started = time.perf_counter()
        try:
            request_id, function, (calls, time_limit) = unpack_message(self.key, request)
            fn, calls = load_function(bytes(function)), list(calls)
            limit = min(math.inf if seconds is None else float(seconds) for seconds in (time_limit, self.time_limit))
        except Exception as error:
            # One error outcome for the request, under its id: it raises at its first call.
            reply = self.reply(request_id_of(request), [("error", f"request rejected: {error}")])
            return reply, (logging.WARNING, "rejected a request: %s", error)
        # SIGALRM's handler runs in the main thread: only there can a time limit stop a task.
        if threading.current_thread() is not threading.main_thread():
            limit = math.inf
        deadline = time.monotonic() + limit
        # A task that catches its TimeoutError, or is stuck in C code holding the GIL, runs on:
        # a supervisor that reads this ends the process then (Supervisor.abort_stuck_workers).
        self.hard_deadline.value = deadline + HARD_LIMIT_GRACE_S
        outcomes = [run_task(fn, call, deadline) for call in calls]
        self.hard_deadline.value = math.inf
        self.retire_if_worn_out()
        reply = self.reply(request_id, outcomes)
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        return reply, (logging.INFO, "%s %.1f ms %s", name,
                       (time.perf_counter() - started) * 1000, status_of(outcomes))

    def reply(self, request_id, outcomes):
        """Return the frames of the reply carrying outcomes (None: not run); an outcome that
        cannot be pickled is replaced, in outcomes too, by the error that says why."""
        retiring = b"retiring" if self._stopping.is_set() else b""
        try:
            return pack_message(self.key, request_id, retiring, outcomes)
        except Exception:
            outcomes[:] = map(picklable, outcomes)  # so that the log line says so too
            return pack_message(self.key, request_id, retiring, outcomes)

    def retire_if_worn_out(self):
        """Stop after this task if it was the max_tasks-th, or peak memory passed max_memory MB."""
        self.tasks += 1
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        if self.tasks == self.max_tasks or peak_mb > (self.max_memory or math.inf):
            log.info("worker %d retiring after %d tasks, peak memory %.0f MB", os.getpid(), self.tasks, peak_mb)
            self.stop()

    def drain(self, socket):
        """Answer "not run" to each request still queued here or on its way, until none came
        for DRAIN_QUIET_MS: their clients send them again, to whoever serves the port next."""
        ends = time.monotonic() + DRAIN_MAX_S
        while time.monotonic() < ends and socket.poll(DRAIN_QUIET_MS):
            socket.send_multipart(self.reply(request_id_of(receive(socket)), None), copy=False)


@contextlib.contextmanager
def signal_handlers(handlers):
    """Within the block, signals call their handlers (only the main thread can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        handlers = {}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- Client ---

class Connection:
    """One REQ socket to one worker, with heartbeats and a monitor; one thread uses it at a time."""

    def __init__(self, context, address, key):
        self.address = address
        self.socket = context.socket(zmq.REQ)
        self.socket.linger = 0     # closing drops an unsent request at once, never blocks
        self.socket.immediate = 1  # a request waits for a live connection, its handshake done
        self.socket.rcvtimeo = CHECK_INTERVAL_MS
        # A request that was lost, or abandoned when its time was up, leaves a REQ socket stuck
        # in mid-conversation (the Guide's "Lazy Pirate" closes and reopens it). Relaxed, it
        # sends anew; correlated, it drops the late reply to an abandoned request.
        self.socket.req_relaxed = self.socket.req_correlate = 1
        self.socket.heartbeat_ivl, self.socket.heartbeat_timeout = HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS
        self.socket.reconnect_ivl, self.socket.reconnect_ivl_max = RECONNECT_INTERVAL_MS, RECONNECT_INTERVAL_MAX_MS
        if key:
            # Whoever answers must prove that it holds the worker's secret key. Our keypair is
            # new for every socket, so nothing recorded from another connection replays.
            self.socket.curve_serverkey = zmq.curve_public(curve_secret_key(key))
            self.socket.curve_publickey, self.socket.curve_secretkey = zmq.curve_keypair()
        # A REQ socket never says that its worker went away, or refused us; its monitor does.
        self.monitor = self.socket.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        # retiring: the worker said it ends after its reply; we wait for its successor.
        self.lost, self.retiring, self.failed_handshakes = False, False, 0
        self.socket.connect(address)

    def close(self):
        """Close the socket and its monitor."""
        self.socket.close()
        self.monitor.close()

    def read_events(self):
        """Take in what the monitor reported: a lost worker, a handshake done or failed."""
        while self.monitor.get(zmq.EVENTS) & POLLIN:
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.lost = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                # A retirement ends with the successor's handshake, not with the disconnect:
                # the monitor tells of a disconnect a moment before the socket drops the old
                # connection, and a request sent in between would be lost without a word.
                self.failed_handshakes, self.retiring = 0, False
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # a wrong key, or a worker
                self.failed_handshakes += 1                     # dying mid-handshake
            else:  # one end has a key and the other not: libzmq will not try again
                self.failed_handshakes = HANDSHAKE_ATTEMPTS

    def ready(self):
        """Return whether a request sent now goes to a worker that is up and not retiring."""
        self.read_events()
        return not self.retiring and self.socket.get(zmq.EVENTS) & POLLOUT

    def round_trip(self, request, timeout):
        """Send a request's frames and return the reply's; raise WorkerLost, or TimeoutError
        once timeout seconds (None: no limit) and TIMEOUT_GRACE_S have passed."""
        self.lost = False  # a disconnect from before this request (ready() read it): the worker is back
        try:
            self.socket.send_multipart(request, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.lost = True  # the worker went away since it was found ready
        deadline = None if timeout is None else time.monotonic() + timeout + TIMEOUT_GRACE_S
        while True:
            try:
                return receive(self.socket)  # waits up to CHECK_INTERVAL_MS
            except zmq.Again:
                self.read_events()
            if self.lost:
                raise WorkerLost(f"lost the worker at {self.address} while the task was in flight")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no reply from the worker at {self.address} within {timeout} s")


class Client(Executor):
    """Runs tasks on workers, each worker at most one task at a time; safe to share among threads.

    addresses: one address, a list, or a comma-separated string ("tcp://host:port"); a port
        range ("tcp://host:9090-9093") names a worker on each port.
    timeout: seconds a task may take on a worker (from sending it to its reply); None = no limit.
        The worker stops a task that runs longer, by raising TimeoutError inside it.
    key: the shared secret (str or bytes): it encrypts the traffic, proves the worker holds it
        too, and signs every message; None = plain TCP, unsigned.
    retries: how often a task is sent again after WorkerLost; a task that raised is never resent.
        A task that a retiring worker answered "not run" is always sent again: it never ran.
    """

    def __init__(self, addresses=DEFAULT_ADDRESS, *, timeout=None, key=None, retries=0):
        if isinstance(addresses, str):
            addresses = addresses.split(",")
        self.addresses = [port for address in addresses for port in expand_ports(address)]
        if not self.addresses:
            raise ValueError("a Client needs at least one worker address")
        self.timeout, self.key, self.retries = timeout, as_key(key), retries
        self._context = zmq.Context()
        # libzmq allows 1,023 sockets per context unless told; a connection takes three.
        self._context.max_sockets = self._context.get(zmq.SOCKET_LIMIT)
        self._idle = collections.deque(Connection(self._context, address, self.key) for address in self.addresses)
        # Idle connections whose worker was down when last seen, and when to look again.
        self._down, self._next_look_at_down = [], 0
        self._changed, self._closed, self._pid = threading.Condition(), False, os.getpid()
        # submit() runs queue() on these threads, map() its chunks: as many as there are workers.
        self._threads = ThreadPoolExecutor(len(self.addresses), thread_name_prefix="brokest")

    def queue(self, fn, /, *args, **kwargs):
        """Run fn(*args, **kwargs) on an idle worker and return its result, or raise its exception."""
        self._check_process()
        # In this thread: a call costs no thread switch.
        return result_of(self._run(cloudpickle.dumps(fn, protocol=5), [(args, kwargs)])[0])

    def submit(self, fn, /, *args, **kwargs):
        """Schedule fn(*args, **kwargs) on a worker; return a concurrent.futures.Future."""
        self._check_process()
        return self._threads.submit(self.queue, fn, *args, **kwargs)

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
        """Return an iterator of fn(*args) for args in zip(*iterables), run on all workers at once.

        timeout: seconds from this call for all results. chunksize: how many calls travel and
        run as one task. buffersize: how many chunks are read and sent ahead of the results;
        None reads the whole input now. A call that raised raises at its own place in the
        results, and so does an exception raised by the input."""
        if chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, not {chunksize}")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        self._check_process()
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = self._submit_chunks(cloudpickle.dumps(fn, protocol=5), zip(*iterables), chunksize)
        # Submitted before the first result is asked for; islice(chunks, None) submits them all.
        return results_in_order(collections.deque(itertools.islice(chunks, buffersize)), chunks, deadline)

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop taking tasks; close the sockets once the tasks already submitted are done."""
        self._threads.shutdown(wait, cancel_futures=cancel_futures)
        if not wait:
            threading.Thread(target=self.shutdown, daemon=True).start()
            return
        with self._changed:
            self._closed = True
            for connection in [*self._idle, *self._down]:
                connection.close()
            self._changed.notify_all()

    def _check_process(self):
        """Raise RuntimeError in a process forked from the one that made this Client."""
        if os.getpid() != self._pid:  # our ZeroMQ context and threads stayed in the parent
            raise RuntimeError(f"this Client was made in process {self._pid}: make a Client in this process")

    def _submit_chunks(self, function, calls, chunksize):
        """Yield a future for each chunk of calls, submitted as soon as it is read; if reading
        a chunk raises, a last future raises that exception in the chunk's place."""
        try:
            while chunk := list(itertools.islice(calls, chunksize)):  # each call's args, no kwargs
                yield self._threads.submit(self._run, function, zip(chunk, itertools.repeat({})))
        except Exception as error:  # the input's own, or a shut-down Client's RuntimeError
            failure = Future()
            failure.set_exception(error)
            yield failure

    def _run(self, function, calls):
        """Run calls (args, kwargs) of a pickled function as one task on an idle worker and
        return their outcomes. A request the worker did not run is sent again; one whose
        worker was lost, while retries last (to another worker, when there is one)."""
        calls = [(tuple(map(out_of_band, args)), {k: out_of_band(v) for k, v in kwargs.items()})
                 for args, kwargs in calls]
        request, retries = pack_message(self.key, os.urandom(8), function, (calls, self.timeout)), self.retries
        while True:
            connection = self._checkout()
            try:
                reply_id, retiring, outcomes = unpack_message(self.key, connection.round_trip(request, self.timeout))
                connection.retiring = bool(retiring)  # b"retiring", or empty
            except WorkerLost as lost:
                if retries == 0:
                    raise
                retries -= 1
                log.warning("%s; sending the task again (%d retries left)", lost, retries)
                continue
            finally:
                self._checkin(connection)
            if reply_id != request[1]:  # the request id, the frame after the signature
                raise RemoteError("the reply answers a different request")
            if outcomes is not None:  # None: the worker retired before it could run it
                return outcomes

    def _checkout(self):
        """Take an idle connection whose worker is up, waiting while there is none."""
        nobody_up_since, delay, warned = time.monotonic(), 0.001, False
        with self._changed:
            while not self._closed:
                # Asking a socket whether it is ready takes microseconds: with hundreds of
                # workers down, looking at them all for every call would take milliseconds.
                # With nobody up, look at them all again at once, not in 100 ms.
                if len(self._down) == len(self.addresses) or time.monotonic() >= self._next_look_at_down:
                    self._idle.extend(self._down)
                    self._down.clear()
                    self._next_look_at_down = time.monotonic() + CHECK_INTERVAL_MS / 1000
                while self._idle:
                    connection = self._idle.popleft()
                    if connection.ready():
                        return connection
                    self._down.append(connection)
                # Time with no worker up counts against the timeout; waiting for a busy one
                # to finish does not. Nobody up, and one keeps refusing our key: say so.
                if len(self._down) < len(self.addresses):
                    nobody_up_since = time.monotonic()
                elif refusing := [c.address for c in self._down if c.failed_handshakes >= HANDSHAKE_ATTEMPTS]:
                    raise AuthenticationError(f"handshake with {refusing[0]} failed: do both ends use the same key?")
                waited, workers = time.monotonic() - nobody_up_since, ", ".join(self.addresses[:3])
                if self.timeout is not None and waited >= self.timeout:
                    raise TimeoutError(f"no worker came up at {workers} within {self.timeout} s")
                if waited >= WAITING_WARNING_S and not warned:
                    log.warning("waiting for a worker to come up at %s", workers)
                    warned = True
                # Checkins notify; a worker coming up does not, so look again soon.
                self._changed.wait(delay)
                delay = min(delay * 2, CHECK_INTERVAL_MS / 1000)
        raise RuntimeError("cannot run a task on a Client that was shut down")

    def _checkin(self, connection):
        """Return a connection to the idle ones, or close it if the Client was shut down."""
        with self._changed:
            if self._closed:
                connection.close()
            else:
                self._idle.append(connection)
                self._changed.notify()


def results_in_order(in_flight, more, deadline):
    """Yield the results of the chunk futures in_flight, in order, until deadline, taking one
    more submitted chunk from more as each chunk's results start; closed or dropped, cancel
    the chunks not yet sent."""
    try:
        while in_flight:
            in_flight.extend(itertools.islice(more, 1))
            outcomes = in_flight[0].result(None if deadline is None else deadline - time.monotonic())
            in_flight.popleft()
            outcomes.reverse()  # then pop each: a result we yielded stays referenced nowhere here
            while outcomes:
                yield result_of(outcomes.pop())
    finally:
        for future in in_flight:
            future.cancel()


def expand_ports(address):
    """Return the addresses that address names: none, one, or one per port of a range like
    tcp://host:9090-9093."""
    prefix, _, ports = address.strip().rpartition(":")
    if "-" not in ports:
        return [address.strip()] if address.strip() else []
    first, _, last = ports.partition("-")
    if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
        raise ValueError(f"bad port range in {address!r}: write first-last, as in 9090-9093")
    return [f"{prefix}:{port}" for port in range(int(first), int(last) + 1)]


_default_client = None
_default_client_lock = threading.Lock()


def queue(fn, /, *args, **kwargs):
    """Run fn(*args, **kwargs) on a worker and return its result, or raise its exception.

    Uses one Client per process, built on first use from BROKEST_ADDRESS (comma-separated;
    default tcp://127.0.0.1:9090), BROKEST_KEY and BROKEST_TIMEOUT (seconds; unset = no limit).
    """
    global _default_client
    with _default_client_lock:
        # A process forked from one that made it makes its own: the parent's works only there.
        if _default_client is None or _default_client._pid != os.getpid():
            timeout = os.environ.get("BROKEST_TIMEOUT")
            _default_client = Client(os.environ.get("BROKEST_ADDRESS", DEFAULT_ADDRESS),
                                     timeout=float(timeout) if timeout else None,
                                     key=os.environ.get("BROKEST_KEY"))
    return _default_client.queue(fn, *args, **kwargs)


# --- Command line: a supervisor and its worker processes ---

class Supervisor:
    """Keeps a worker process serving on each listening socket until SIGINT or SIGTERM.

    The supervisor holds the listening sockets and each worker process serves on one, so a
    port stays open while its worker is replaced: clients reconnect at once, and wait."""

    def __init__(self, listeners, options):
        self.listeners, self.options = listeners, options
        # workers: sentinel -> (listener, process, Worker, when it began to serve, its delay)
        self.workers, self.stopping = {}, threading.Event()

    def run(self):
        """Start a worker on every listener, replace those that exit, end those stuck past
        their hard limit, restart them all on SIGHUP, stop them all at the end."""
        log.info("supervisor %d serving ports %s", os.getpid(), [listener.getsockname()[1] for listener in self.listeners])
        with signal_handlers({signal.SIGINT: self.stop, signal.SIGTERM: self.stop, signal.SIGHUP: self.retire_workers}):
            for listener in self.listeners:
                self.spawn_worker(listener, delay=0)
            while not self.stopping.is_set():
                self.replace_exited_workers()
                self.abort_stuck_workers()
        self.retire_workers()
        for _, process, _, _, _ in self.workers.values():
            process.join()

    def stop(self, *signal_args):
        """Make run() stop the workers and return."""
        self.stopping.set()

    def retire_workers(self, *signal_args):
        """Ask every worker to stop after its task and drain; on SIGHUP the loop starts fresh
        ones, which import the task modules anew."""
        for _, process, _, _, _ in list(self.workers.values()):
            process.terminate()  # SIGTERM

    def spawn_worker(self, listener, delay):
        """Start a worker process that serves on listener once delay seconds have passed."""
        worker = Worker(**self.options, port=listener.getsockname()[1], fd=listener.fileno())
        # Forked, so that the child inherits the listening socket and the worker's
        # hard_deadline. Until the child sets its own handlers it has ours: a signal sent to
        # it meanwhile would run them there, and be lost, so signals wait until it is ready.
        process = multiprocessing.get_context("fork").Process(target=run_worker, args=(worker, delay))
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        process.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        self.workers[process.sentinel] = listener, process, worker, time.monotonic() + delay, delay

    def replace_exited_workers(self):
        """Wait up to CHECK_INTERVAL_MS for workers to exit; log why, and start their successors."""
        for sentinel in multiprocessing.connection.wait(self.workers, CHECK_INTERVAL_MS / 1000):
            listener, process, worker, serving_since, delay = self.workers.pop(sentinel)
            process.join()  # its sentinel can be ready a moment before its exit status is
            if self.stopping.is_set():  # it was told to stop, and so are we
                continue
            code = process.exitcode  # 0: it retired, as planned, and its successor need not wait
            died_young = code != 0 and time.monotonic() - serving_since < 1  # then wait longer each time
            delay = min(max(2 * delay, RESTART_DELAY_S), RESTART_DELAY_MAX_S) if died_young else 0
            how = ("retired" if code == 0 else f"was killed by {signal.Signals(-code).name}" if code < 0
                   else f"exited with status {code}")
            log.log(logging.INFO if code == 0 else logging.WARNING, "worker %d on port %d %s; starting "
                    "another in %.1f s", process.pid, worker.port, how, delay)
            self.spawn_worker(listener, delay)

    def abort_stuck_workers(self):
        """End every worker whose task runs past its hard limit, so its port is served again."""
        for _, process, worker, _, _ in self.workers.values():
            if worker.hard_deadline.value < time.monotonic():
                log.warning("worker %d on port %d ran past its hard time limit; aborting it", process.pid, worker.port)
                worker.hard_deadline.value = math.inf  # abort it once
                # SIGABRT: faulthandler, enabled in run_worker, first prints where it was stuck.
                os.kill(process.pid, signal.SIGABRT)


def run_worker(worker, delay):
    """Serve as a supervised worker process until stopped, or orphaned by the supervisor."""
    for signum in STOP_SIGNALS:  # until the Worker handles them, they end us at once
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    time.sleep(delay)
    faulthandler.enable()  # a task that crashes the process leaves its traceback in the log
    threading.Thread(target=stop_when_orphaned, args=(worker,), daemon=True).start()
    worker.start()


def stop_when_orphaned(worker):
    """Stop worker once its supervisor is gone: killed, it could neither stop nor replace us."""
    while os.getppid() == multiprocessing.parent_process().pid:  # the pid we were forked by
        time.sleep(1)
    worker.stop()


def listen(host, port):
    """Return a listening TCP socket on host:port; raise OSError naming it if it is taken."""
    try:
        listener = create_server((host, port))
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    listener.setblocking(False)  # libzmq accepts on it without blocking
    return listener


def main(argv=None):
    """Start workers as the command line says; return when they have stopped."""
    parser = argparse.ArgumentParser(prog="brokest", description="Start brokest workers.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=9090, help="first port; 0: any free (%(default)s)")
    parser.add_argument("--processes", type=int, default=1, metavar="N", help="on ports PORT..PORT+N-1")
    parser.add_argument("--time-limit", type=float, metavar="S", help="stop tasks running longer")
    parser.add_argument("--max-tasks", type=int, metavar="N", help="replace a worker after N tasks")
    parser.add_argument("--max-memory", type=int, metavar="MB", help="replace a worker grown past MB")
    parser.add_argument("--key-file", metavar="F", help="file with the key (default: $BROKEST_KEY)")
    parser.add_argument("--insecure", action="store_true", help="allow any --host without a key")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="log less")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    logging.basicConfig(level=logging.INFO + 10 * (args.quiet - args.verbose),
                        format="%(asctime)s brokest[%(process)d] %(message)s")
    try:
        key = Path(args.key_file).read_bytes().strip() if args.key_file else os.environ.get("BROKEST_KEY")
        if args.key_file and not key:
            raise ValueError(f"the key file {args.key_file} is empty")
        options = dict(host=args.host, key=key, insecure=args.insecure, time_limit=args.time_limit,
                       max_tasks=args.max_tasks, max_memory=args.max_memory)
        Worker(**options)  # refuses an unsafe configuration before anything starts
        listeners = [listen(args.host, args.port and args.port + n) for n in range(args.processes)]
    except (OSError, ValueError) as error:
        parser.exit(2, f"brokest: {error}\n")
    Supervisor(listeners, options).run()


if __name__ == "__main__":
    main()
