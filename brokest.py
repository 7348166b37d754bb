"""brokest: run a Python function in another process, or on another machine, over ZeroMQ.

    from brokest import queue
    words = queue(count_words, "book.txt")  # runs count_words on a worker, returns its result
    # a worker was started first with:  python brokest.py

One call is one round trip, from the client's REQ socket to a worker's REP socket:

  Client (REQ)                                          Worker (REP)
  queue(fn, *args, **kwargs): pickle fn, then the call
    [signature][fn][call][buffer]...  ------------->  verify the signature, unpickle,
                                                      run fn(*args, **kwargs)
    <-------------  [signature][outcome][buffer]...   pickle its outcome
  return the result, or raise the exception

  signature  HMAC-SHA256(key, each later frame's length as 8 bytes, then its bytes);
             an empty frame when there is no key
  fn         the function's pickle, a frame of its own: a worker keeps the functions it
             unpickled last, and map() pickles its function once for all its calls
  call       pickle of (request id, [(args, kwargs), ...], time limit): one call for queue()
             and submit(), a chunk of calls for map(); the time limit is the client's timeout
  outcome    pickle of (request id, retiring, [outcome of each call]); an outcome is
             ("result", value), ("exception", (exception, traceback text)) or ("error", why).
             retiring: the worker process ends after this reply. None for the list: the
             worker retired before it ran the request, and the client sends it again
  buffer     a large buffer (a numpy array's data, big bytes) that left the pickle: it
             travels as a frame of its own, uncopied
  pickles    protocol 5; cloudpickle's for what the other side cannot import by name (a
             lambda, a function from __main__), which it sends by value
  with a key CurveZMQ encrypts each connection; the worker's secret key is
             z85(HMAC-SHA256(key, b"brokest curve server key")), clients bring fresh keypairs

What can go wrong, and what the caller sees:
  fn raises              the same exception, the worker's traceback as its __cause__
  the worker cannot run  RemoteError saying why: bad signature, malformed message, a result
    or answer the call   or exception that cannot be pickled, a module the worker lacks
  the keys differ        AuthenticationError: the handshake fails, the request never leaves
  the worker dies        WorkerLost (a ConnectionError); sent again first if retries > 0
  the worker retires     nothing: what it did not run goes again, to its successor or another
  the timeout passes     TimeoutError, raised inside the task on the worker, which serves on;
                         a task that ignores it is ended with its process 2 s later

A message whose signature does not verify is never unpickled, on either side.
A dead or frozen worker surfaces as WorkerLost within seconds, even without a timeout.
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
import re
import resource
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import CancelledError, Executor, Future
from queue import Empty, SimpleQueue
from socket import create_server

import cloudpickle
import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

# Named "brokest", not __name__, so that logging is configured the same way whether this
# file is imported or run as `python brokest.py` (where __name__ is "__main__").
log = logging.getLogger("brokest")

DEFAULT_ADDRESS = "tcp://127.0.0.1:9090"
# How long a waiting client or worker looks only at its sockets before it checks the rest:
# whether a worker was lost or came up, whether stop() was called.
CHECK_INTERVAL_MS = 100


# --- Errors the caller sees ---


class RemoteError(Exception):
    """The worker could not run or answer the request; the message says why."""


class AuthenticationError(RemoteError):
    """The two ends do not share the same key: a handshake or a signature failed."""


class WorkerLost(ConnectionError):
    """The worker died, froze, or dropped the connection while the task was in flight."""


class RemoteTraceback(Exception):
    """The worker's traceback text, attached to a task's exception as its __cause__."""


# --- Wire: signed frames, pickles, buffers ---

# Bytes-like arguments and results this large travel as frames of their own; smaller ones
# cost less to copy into the pickle than to send apart.
OUT_OF_BAND_MIN_BYTES = 64 * 1024


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


def pack(key, head, payload):
    """Return the frames of a signed message: the frames in head as they are, then payload's
    pickle, then the large buffers that the pickle left out, each a frame of its own."""
    body, buffers = dumps(payload)
    frames = [*head, body, *(buffer.raw() for buffer in buffers)]
    return [sign(key, frames), *frames]


def dumps(value, out_of_band=True):
    """Return value's pickle (protocol 5) and the large buffers it left out, to travel as
    frames of their own: none unless out_of_band (a function's pickle keeps them in)."""
    # The standard pickle is microseconds faster, and writes the same bytes as cloudpickle
    # for whatever the other side can import by name. Where it fails, or names __main__ (the
    # other side has its own), or a module is registered to travel by value, cloudpickle
    # sends by value what cannot be imported.
    buffers = []
    callback = buffers.append if out_of_band else None
    with contextlib.suppress(Exception):
        body = pickle.dumps(value, protocol=5, buffer_callback=callback)
        if b"__main__" not in body and not cloudpickle.list_registry_pickle_by_value():
            return body, buffers
    buffers.clear()  # whatever the standard pickle handed out before it gave up
    return cloudpickle.dumps(value, protocol=5, buffer_callback=callback), buffers


def pickled(fn):
    """Return the pickle of fn, for a request's function frame (its own buffers stay inside)."""
    return dumps(fn, out_of_band=False)[0]


def verified(key, frames, count):
    """Return the frames after the signature, count of them at least, if it verifies."""
    if len(frames) < 1 + count:
        raise RemoteError(f"malformed message: {len(frames)} frames, expected {1 + count}+")
    signature, *frames = frames
    # Verify before unpickling: unpickling can run arbitrary code. compare_digest takes the
    # same time wherever the bytes differ, so timing does not reveal the right signature.
    if not hmac.compare_digest(signature, sign(key, frames)):
        raise AuthenticationError("signature did not verify: do both ends use the same key?")
    return frames


def unpickle(body, buffers=()):
    """Return what body unpickles to; raise RemoteError saying why it cannot be unpickled."""
    try:
        return pickle.loads(body, buffers=buffers)
    except ModuleNotFoundError as error:  # something was pickled by reference to a module
        fix = f"install {error.name} there, or cloudpickle.register_pickle_by_value({error.name})"
        raise RemoteError(f"could not unpickle the message: {error!r}; {fix}") from None
    except (Exception, SystemExit) as error:
        raise RemoteError(f"could not unpickle the message: {error!r}") from None


# load_function(bytes) unpickles a function as unpickle() does, and keeps the last 64:
# rebuilding a function sent by value is worth doing once, not for every call. Its pickle
# holds the values of the globals it reads, so a new value makes new bytes.
load_function = functools.lru_cache(maxsize=64)(unpickle)


def receive(socket, copied):
    """Return the frames of the next message on socket: the first `copied` ones as bytes
    (small frames cost less to copy than to share), the rest, large buffers, as memoryviews
    of ZeroMQ's own memory."""
    frame = socket.recv(copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = socket.recv(copy=False)
        frames.append(frame.bytes if len(frames) < copied else frame.buffer)
    return frames


class _OutOfBand:
    """A large bytes, bytearray or memoryview, pickled as a buffer that travels apart."""

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


# --- Outcomes: what a call ended with ---


def run_task(fn, call, deadline):
    """Return the outcome of one call (args, kwargs) of fn: its result, or its exception and
    traceback. deadline: when (time.monotonic(); inf: never) to stop it with TimeoutError."""
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
        dumps(outcome)
        return outcome
    except Exception as error:
        kind, value = outcome
        if kind == "result":
            return "error", f"the result of type {type(value).__name__} could not be pickled"
        exception, remote_traceback = value
        what = f"the task raised {type(exception).__name__}, which could not be pickled"
        return "error", f"{what} ({error!r}); its traceback on the worker:\n{remote_traceback}"


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


# --- Keys and addresses ---


def as_key(key):
    """Return key as bytes (a str is UTF-8 encoded), or None when there is no key. Surrounding
    whitespace is not part of it: a key read from a file means the same with its newline."""
    if isinstance(key, str):
        key = key.encode()
    return (key or b"").strip() or None


def curve_secret_key(key):
    """Return the worker's CURVE secret key, derived from the shared key (z85-encoded)."""
    return z85.encode(hmac.digest(key, b"brokest curve server key", "sha256"))


def is_loopback(host):
    """Return whether host is reachable only from this machine."""
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


def worker_addresses(addresses):
    """Return the tcp://host:port addresses that addresses names: one address, a list, or a
    comma-separated string. host:port means tcp://host:port, and a port range (host:9090-9093)
    names a worker on each port. Raise ValueError naming an address that cannot be used."""
    if isinstance(addresses, str):
        addresses = addresses.split(",")
    found = []
    for address in filter(None, map(str.strip, addresses)):
        match = re.fullmatch(r"(?:tcp://)?([^\s/]+):(\d+)(?:-(\d+))?", address)
        first = int(match[2]) if match else 0
        last = int(match[3] or first) if match else 0
        if not 0 < first <= last < 65536:
            usage = "write host:port, tcp://host:port, or a port range such as host:9090-9093"
            raise ValueError(f"bad worker address {address!r}: {usage}")
        found += [f"tcp://{match[1]}:{port}" for port in range(first, last + 1)]
    if not found:
        raise ValueError("a Client needs at least one worker address")
    return found


# --- Worker ---

# How long a task may run past its time limit (it caught the TimeoutError, or it is stuck in
# C code) before its supervisor ends it with its worker process.
HARD_LIMIT_GRACE_S = 2.0
# How long a retiring worker still answers "not run" after the last request it read, and at
# most in all: requests on their way arrive, and its successor need not wait long.
DRAIN_QUIET_MS = 100
DRAIN_MAX_S = 1.0
# The signals that stop a worker once its task is answered (SIGHUP, too: its supervisor then
# starts a fresh one), and that a supervisor handles.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


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
    """

    def __init__(
        self,
        host="127.0.0.1",
        port=9090,
        *,
        key=None,
        insecure=False,
        time_limit=None,
        max_tasks=None,
        max_memory=None,
    ):
        self.key = as_key(key)
        if self.key is None and not insecure and not is_loopback(host):
            fix = "anyone reaching it could run any code: pass --key-file F, or --insecure"
            raise ValueError(f"refusing to listen on {host} without a key; {fix}")
        if any(limit is not None and limit < 1 for limit in (max_tasks, max_memory)):
            raise ValueError("--max-tasks and --max-memory must be at least 1")
        self.host = host
        self.port = port
        self.time_limit = math.inf if time_limit is None else time_limit
        self.max_tasks = max_tasks or math.inf
        self.max_memory = max_memory or math.inf
        self.tasks_done = 0
        self.address = None
        # Set by stop(), which may run as a signal handler, even inside itself when a second
        # signal comes: a plain flag, as a lock would wait for its own holder.
        self.stopping = False
        # When the running task passes its hard limit (time.monotonic(); inf: no task, or no
        # limit), in memory that a supervisor which forked us shares: it ends us then.
        self.hard_deadline = multiprocessing.RawValue("d", math.inf)

    def start(self, fd=-1):
        """Bind, then answer requests until stop(), SIGINT, SIGTERM or SIGHUP, or until
        retired; then drain the socket. fd: a listening TCP socket to serve on instead of
        binding anew, as a supervisor does to keep the port open while it replaces workers."""
        # A context of its own: closing a socket frees its port later, in the background;
        # terminating its context (leaving the with) waits until that is done, so the port is
        # free when start() returns. A reply still on its way gets a second to leave.
        with zmq.Context() as context, context.socket(zmq.REP) as socket:
            socket.linger = 1000
            socket.rcvtimeo = CHECK_INTERVAL_MS
            socket.use_fd = fd
            if self.key:
                socket.curve_server = True
                socket.curve_secretkey = curve_secret_key(self.key)
            handlers = {**dict.fromkeys(STOP_SIGNALS, self.stop), signal.SIGALRM: raise_time_limit}
            # Handlers before we say we listen: a signal may follow at once.
            with signal_handlers(handlers):
                socket.bind(f"tcp://{self.host}:{self.port or '*'}")
                self.address = socket.last_endpoint.decode()
                log.info("worker %d listening on %s", os.getpid(), self.address)
                while not self.stopping:
                    with contextlib.suppress(zmq.Again):  # nothing came: look at stopping
                        # One expression: the request and the reply are freed once sent, not
                        # held while the next request is awaited (they may be large). The
                        # frames copied: the signature, the function, the call.
                        socket.send_multipart(self.answer(receive(socket, copied=3)), copy=False)
                self.drain(socket)
        log.info("worker %d on %s stopped", os.getpid(), self.address)

    def stop(self, *signal_args):
        """Make start() return once the running task is answered and the socket drained (about
        a second at most); callable from any thread, and again."""
        self.stopping = True

    def answer(self, request):
        """Return the reply to a request's frames: its calls' outcomes, or why it was refused."""
        started = time.perf_counter()
        try:
            pickled_fn, body, *buffers = verified(self.key, request, count=2)
            request_id, calls, time_limit = unpickle(body, buffers)
            fn = load_function(pickled_fn)
            calls = list(calls)
            time_limit = math.inf if time_limit is None else float(time_limit)
        except Exception as error:
            log.warning("rejected a request: %s", error)
            return self.reply(None, [("error", f"request rejected: {error}")])
        outcomes = self.run_calls(fn, calls, min(time_limit, self.time_limit))
        if log.isEnabledFor(logging.DEBUG):  # one line per task, with -v
            errors = [type(value[0]).__name__ for kind, value in outcomes if kind == "exception"]
            status = f"error {errors[0]}" if errors else "ok"
            duration = (time.perf_counter() - started) * 1000
            log.debug("%s %.1f ms %s", getattr(fn, "__qualname__", fn), duration, status)
        self.retire_if_worn_out()
        return self.reply(request_id, outcomes)

    def run_calls(self, fn, calls, time_limit):
        """Return the outcomes of calls of fn, stopped once they have run time_limit seconds
        (one limit for all of them: a map chunk is one task)."""
        deadline = time.monotonic() + time_limit
        # SIGALRM's handler runs in the main thread: only there can a time limit stop a task.
        if threading.current_thread() is not threading.main_thread():
            deadline = math.inf
        # A task that catches its TimeoutError, or is stuck in C code holding the GIL, runs on:
        # a supervisor that reads this ends the process then (Supervisor.abort_stuck_workers).
        self.hard_deadline.value = deadline + HARD_LIMIT_GRACE_S
        outcomes = [run_task(fn, call, deadline) for call in calls]
        self.hard_deadline.value = math.inf
        return outcomes

    def reply(self, request_id, outcomes):
        """Return the frames of the reply carrying outcomes (None: not run); an outcome that
        cannot be pickled is replaced by the error that says why."""
        retiring = self.stopping
        with contextlib.suppress(Exception):
            return pack(self.key, [], (request_id, retiring, outcomes))
        outcomes = [picklable(outcome) for outcome in outcomes]
        return pack(self.key, [], (request_id, retiring, outcomes))

    def retire_if_worn_out(self):
        """Stop after this task if it was the max_tasks-th, or peak memory passed max_memory MB."""
        self.tasks_done += 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        if self.tasks_done >= self.max_tasks or peak > self.max_memory:
            what = f"retiring after {self.tasks_done} tasks, peak memory {peak:.0f} MB"
            log.info("worker %d %s", os.getpid(), what)
            self.stop()

    def drain(self, socket):
        """Answer "not run" to each request still queued here or on its way, until none came
        for DRAIN_QUIET_MS: their clients send them again, to whoever serves the port next."""
        ends = time.monotonic() + DRAIN_MAX_S
        while time.monotonic() < ends and socket.poll(DRAIN_QUIET_MS):
            receive(socket, copied=3)
            socket.send_multipart(self.reply(None, None), copy=False)


@contextlib.contextmanager
def signal_handlers(handlers):
    """Within the block, signals call their handlers; those that were blocked are let in. A
    signal ignored when we start stays ignored (SIGHUP under nohup). Only the main thread can
    set handlers: elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        handlers = {}
    previous = {}
    for signum, handler in handlers.items():
        if signal.getsignal(signum) != signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handlers)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- Client ---

# How often a client pings its worker, and how long a silent worker may stay quiet before we
# call it lost. The worker's libzmq I/O thread answers pings even while a task holds the GIL,
# so a long task is never mistaken for a dead worker; a frozen one is noticed in about 2 s.
HEARTBEAT_INTERVAL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500
# How soon a client tries again to reach a worker that went away, and how often at most while
# it stays down (libzmq doubles the interval). A retired worker's successor serves the same
# port within milliseconds; a Client of a thousand addresses, most of them down, would spend
# a core at libzmq's 100 ms.
RECONNECT_INTERVAL_MS = 10
RECONNECT_INTERVAL_MAX_MS = 1000
# What a client's monitor tells: a worker gone, and a handshake done or failed. (Not every
# reconnection attempt: a Client of a thousand addresses, most of them down, would read those.)
MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
MONITOR_EVENTS |= zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
MONITOR_EVENTS |= zmq.EVENT_HANDSHAKE_FAILED_AUTH
# How many handshakes in a row may fail without detail before we call the key wrong. A wrong
# CURVE key fails every attempt; a worker that dies during a handshake spoils only one.
HANDSHAKE_ATTEMPTS = 3
# How long past its timeout a client still waits for the worker's own TimeoutError, which
# carries the task's traceback, before it gives up on the reply.
TIMEOUT_GRACE_S = 0.5
# How long a call waits for a worker to come up before it says so in the log.
WAITING_WARNING_S = 3.0


class Connection:
    """A REQ socket to one worker, and its monitor; one thread uses it at a time."""

    def __init__(self, context, address, key):
        self.address = address
        self.key = key
        self.socket = context.socket(zmq.REQ)
        self.socket.linger = 0  # closing drops an unsent request at once, never blocks
        self.socket.immediate = 1  # a request waits for a live connection, its handshake done
        self.socket.sndtimeo = 0  # a request that cannot leave at once raises zmq.Again
        self.socket.rcvtimeo = CHECK_INTERVAL_MS
        # A request that was lost, or abandoned when its time was up, leaves a REQ socket stuck
        # in mid-conversation (the Guide's "Lazy Pirate" closes and reopens it). Relaxed, it
        # sends anew; correlated, it drops the late reply to an abandoned request.
        self.socket.req_relaxed = 1
        self.socket.req_correlate = 1
        self.socket.heartbeat_ivl = HEARTBEAT_INTERVAL_MS
        self.socket.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS
        self.socket.reconnect_ivl = RECONNECT_INTERVAL_MS
        self.socket.reconnect_ivl_max = RECONNECT_INTERVAL_MAX_MS
        if key:
            # Whoever answers must prove that it holds the worker's secret key. Our keypair is
            # new for every socket, so nothing recorded from another connection replays.
            self.socket.curve_serverkey = zmq.curve_public(curve_secret_key(key))
            self.socket.curve_publickey, self.socket.curve_secretkey = zmq.curve_keypair()
        # A REQ socket never says that its worker went away, or refused us; its monitor does.
        self.monitor = self.socket.get_monitor_socket(MONITOR_EVENTS)
        self.retiring = False  # the worker said it ends after its reply: wait for its successor
        self.failed_handshakes = 0
        self.socket.connect(address)

    def read_events(self):
        """Take in what the monitor reported, a handshake done or failed; return whether the
        worker went away since we last read."""
        lost = False
        while self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                lost = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                # A retirement ends with the successor's handshake, not with the disconnect:
                # the monitor tells of a disconnect a moment before the socket drops the old
                # connection, and a request sent in between would be lost without a word.
                self.failed_handshakes = 0
                self.retiring = False
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self.failed_handshakes += 1  # a wrong key, or a worker dying mid-handshake
            else:  # one end has a key and the other not: libzmq will not try again
                self.failed_handshakes = HANDSHAKE_ATTEMPTS
        return lost

    def ready(self):
        """Return whether a request sent now goes to a worker that is up and not retiring."""
        self.read_events()  # a disconnect read here came before any request we send
        return not self.retiring and self.socket.get(zmq.EVENTS) & zmq.POLLOUT

    def round_trip(self, request_id, request, timeout):
        """Send a request's frames and return the outcomes its reply carries, or None if it did
        not run: the worker went away before the request could leave, or retired before it
        ran it. Raise WorkerLost, or TimeoutError once timeout seconds (None: no limit) and
        TIMEOUT_GRACE_S have passed."""
        try:
            self.socket.send_multipart(request, copy=False)  # large frames leave uncopied
        except zmq.Again:
            return None
        deadline = math.inf if timeout is None else time.monotonic() + timeout + TIMEOUT_GRACE_S
        while True:
            with contextlib.suppress(zmq.Again):  # nothing came within CHECK_INTERVAL_MS
                # The frames copied: the signature and the outcomes' pickle.
                body, *buffers = verified(self.key, receive(self.socket, copied=2), count=1)
                reply_id, self.retiring, outcomes = unpickle(body, buffers)
                if reply_id not in (request_id, None):  # None: it could not read our request
                    raise RemoteError("the reply answers a different request")
                return outcomes
            if self.read_events():
                raise WorkerLost(f"lost the worker at {self.address} while the task was in flight")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no reply from {self.address} within {timeout} s")


class Client(Executor):
    """Runs tasks on workers, each worker at most one task at a time; safe to share among threads.

    addresses: one address, a list, or a comma-separated string ("tcp://host:port", or just
        "host:port"); a port range ("tcp://host:9090-9093") names a worker on each port.
    timeout: seconds a task (a call, or a chunk of a map) may take on a worker, from sending it
        to its reply; None = no limit. The worker stops a task that runs longer, by raising
        TimeoutError inside it.
    key: the shared secret (str or bytes): it encrypts the traffic, proves the worker holds it
        too, and signs every message; None = plain TCP, unsigned.
    retries: how often a task is sent again after WorkerLost; a task that raised is never resent.
        A task that a retiring worker answered "not run" is always sent again: it never ran.

    queue() runs its task in the calling thread. submit() and map() put their tasks on a queue
    that runner threads take them from, one runner per worker, started on first use.
    """

    def __init__(self, addresses=DEFAULT_ADDRESS, *, timeout=None, key=None, retries=0):
        self.addresses = worker_addresses(addresses)  # first: a bad one leaves nothing behind
        self.timeout = timeout
        self.key = as_key(key)
        self.retries = retries
        self._pid = os.getpid()
        self._context = zmq.Context()
        # libzmq allows 1,023 sockets per context unless told; a connection takes three.
        self._context.max_sockets = self._context.get(zmq.SOCKET_LIMIT)
        # Connections whose worker is free as far as we know, and those last seen down.
        self._idle = SimpleQueue()
        for address in self.addresses:
            self._idle.put(Connection(self._context, address, self.key))
        self._down = []
        self._next_look_at_down = 0.0
        self._tasks = SimpleQueue()  # what the runners run: a Task, a MapJob; None: end
        self._runners = []
        self._lock = threading.Lock()
        self._shut_down = False
        self._connections_closed = False

    def queue(self, fn, /, *args, **kwargs):
        """Run fn(*args, **kwargs) on an idle worker; return its result, or raise its exception."""
        return result_of(self._run_on_a_worker(pickled(fn), [(args, kwargs)])[0])

    def submit(self, fn, /, *args, **kwargs):
        """Schedule fn(*args, **kwargs) on a worker; return a concurrent.futures.Future."""
        return self._schedule(Task(pickled(fn), [(args, kwargs)]))

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
        deadline = None if timeout is None else time.monotonic() + timeout
        job = MapJob(pickled(fn), zip(*iterables), chunksize)
        job.schedule(self, buffersize)
        return job.results(self, buffersize, deadline)

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Take no more tasks; close the connections once the tasks scheduled are done
        (cancel_futures: cancel those not sent yet)."""
        with self._lock:
            self._shut_down = True
        for task in filter(None, take_all(self._tasks) if cancel_futures else []):
            task.cancel()
        for _ in self._runners:
            self._tasks.put(None)  # after the tasks before it
        closing = threading.Thread(target=self._close_connections)
        closing.start()
        if wait:
            closing.join()

    def _check_process(self):
        """Raise RuntimeError in a process forked from the one that made this Client (every
        call passes here: through _checkout(), or _schedule() for the runners)."""
        if os.getpid() != self._pid:  # our ZeroMQ context and threads stayed in the parent
            raise RuntimeError(f"a Client of process {self._pid}: make a Client in this process")

    def _schedule(self, task):
        """Put a task on the queue for the runners and return it: a Task, or a MapJob with a
        chunk to send. The first task starts the runners, one per worker."""
        self._check_process()
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if not self._runners:
                for _ in self.addresses:
                    self._runners.append(threading.Thread(target=self._run_tasks, daemon=True))
                    self._runners[-1].start()
            self._tasks.put(task)
        return task

    def _run_tasks(self):
        """Run the tasks from the queue, one at a time, until a None says to end: a runner."""
        while task := self._tasks.get():
            task.run(self)

    def _run_on_a_worker(self, pickled_fn, calls):
        """Run calls (args, kwargs) of a pickled function as one task on an idle worker, and
        return their outcomes. A request that did not run is sent again; one whose worker was
        lost, while retries last (to another worker, when there is one)."""
        calls = [
            (tuple(map(out_of_band, args)), {k: out_of_band(v) for k, v in kwargs.items()})
            for args, kwargs in calls
        ]
        request_id = os.urandom(8)
        request = pack(self.key, [pickled_fn], (request_id, calls, self.timeout))
        retries = self.retries
        while True:
            connection = self._checkout()
            try:
                outcomes = connection.round_trip(request_id, request, self.timeout)
            except WorkerLost as lost:
                if retries == 0:
                    raise
                retries -= 1
                log.warning("%s; sending the task again (%d retries left)", lost, retries)
                continue
            finally:
                self._idle.put(connection)  # idle again
            if outcomes is not None:
                return outcomes

    def _checkout(self):
        """Take an idle connection whose worker is up, waiting while there is none."""
        self._check_process()
        nobody_up_since = time.monotonic()
        warned = False
        wait = 0.001  # doubling up to CHECK_INTERVAL_MS: nothing says when a worker comes up
        while not self._connections_closed:
            self._look_again_at_down_connections()
            try:
                connection = self._idle.get(timeout=wait)
            except Empty:
                # Time with no worker up counts against the timeout; waiting for a busy one
                # to finish does not.
                if len(self._down) < len(self.addresses):
                    nobody_up_since = time.monotonic()
                else:  # look at them all again now, not in CHECK_INTERVAL_MS
                    self._next_look_at_down = 0
                    warned = self._check_nobody_up(nobody_up_since, warned)
                wait = min(2 * wait, CHECK_INTERVAL_MS / 1000)
                continue
            if connection.ready():
                return connection
            self._down.append(connection)
        raise RuntimeError("cannot run a task on a Client that was shut down")

    def _look_again_at_down_connections(self):
        """Make the connections last seen down idle again, every CHECK_INTERVAL_MS. (Asking a
        socket whether its worker is up takes microseconds: with hundreds of workers down,
        asking them all for every call would take milliseconds.)"""
        with self._lock:
            if time.monotonic() >= self._next_look_at_down:
                self._next_look_at_down = time.monotonic() + CHECK_INTERVAL_MS / 1000
                while self._down:
                    self._idle.put(self._down.pop())

    def _check_nobody_up(self, since, warned):
        """With no worker up since `since`: raise AuthenticationError if one keeps refusing our
        key, TimeoutError once the timeout has passed; warn once after WAITING_WARNING_S.
        Return whether a warning was given."""
        refused = [c.address for c in self._down if c.failed_handshakes >= HANDSHAKE_ATTEMPTS]
        if refused:
            raise AuthenticationError(f"{refused[0]} refused us: do both ends use the same key?")
        waited = time.monotonic() - since
        addresses = ", ".join(self.addresses[:3])
        if self.timeout is not None and waited >= self.timeout:
            raise TimeoutError(f"no worker came up at {addresses} within {self.timeout} s")
        if waited < WAITING_WARNING_S or warned:
            return warned
        hint = "is one started there, listening on that interface (python brokest.py --host)?"
        log.warning("waiting for a worker to come up at %s: %s", addresses, hint)
        return True

    def _close_connections(self):
        """Once the runners have ended, close the connections that are idle or down. (One that
        a queue() in another thread still uses is closed with the context, when the Client is
        garbage-collected: a socket must not be closed under the thread that uses it.)"""
        for runner in self._runners:
            runner.join()
        with self._lock:
            self._connections_closed = True
            for connection in self._down + take_all(self._idle):
                connection.socket.close()
                connection.monitor.close()


def take_all(simple_queue):
    """Return the items of a SimpleQueue, taking them out."""
    items = []
    with contextlib.suppress(Empty):
        while True:
            items.append(simple_queue.get_nowait())
    return items


class Task(Future):
    """A call that submit() scheduled: a Future, which the runner that takes it fulfils."""

    def __init__(self, pickled_fn, calls):
        super().__init__()
        self.request = (pickled_fn, calls)

    def run(self, client):
        """Run the call on one of client's workers, unless it was cancelled."""
        if self.set_running_or_notify_cancel():
            try:
                self.set_result(result_of(client._run_on_a_worker(*self.request)[0]))
            except BaseException as error:
                self.set_exception(error)
        self.request = None  # the arguments are not kept alive by a Future that is kept


class MapJob:
    """A map in progress. Chunks of calls are read from its input and put on the task queue:
    the job itself, once for each chunk, and a runner that takes it sends the next chunk.
    results() yields their outcomes in order. (A Future for each chunk would cost a map of a
    hundred thousand items a second before its first result, most of it in the garbage
    collector.)"""

    def __init__(self, pickled_fn, calls, chunksize):
        self.pickled_fn = pickled_fn
        # The input in lists of chunksize calls' args, up to the empty list at its end.
        self.chunks = iter(lambda: list(itertools.islice(calls, chunksize)), [])
        self.chunks_read = 0  # and scheduled: one that could not be is not counted
        self.unsent = collections.deque()  # (number, chunk), scheduled and not yet sent
        self.outcomes = {}  # by chunk number: its outcomes, or the exception that came instead
        self.cancelled = False
        self.changed = threading.Condition()

    def schedule(self, client, count):
        """Read up to count more chunks (None: all), and put the job on client's queue for each."""
        try:
            for chunk in itertools.islice(self.chunks, count):
                self.unsent.append((self.chunks_read, chunk))
                client._schedule(self)
                self.chunks_read += 1
        except Exception as error:  # the input's, or a shut-down client's: in the next's place
            # No lock: results(), the only reader, is calling us, or has not started yet.
            self.outcomes[self.chunks_read] = error
            self.chunks_read += 1

    def run(self, client):
        """Send the next chunk on one of client's workers and keep its outcomes (in a runner)."""
        if self.cancelled:
            return
        number, chunk = self.unsent.popleft()
        try:
            outcomes = client._run_on_a_worker(self.pickled_fn, zip(chunk, itertools.repeat({})))
        except BaseException as error:  # WorkerLost, say: raised in this chunk's place
            outcomes = error
        with self.changed:
            self.outcomes[number] = outcomes
            self.changed.notify_all()

    def cancel(self):
        """Send no further chunk."""
        with self.changed:
            self.cancelled = True
            self.changed.notify_all()

    def results(self, client, buffersize, deadline):
        """Yield the results of the calls in order until deadline; as each chunk's results
        start, read and schedule one more chunk if there is a buffersize. Closed or dropped,
        send no further chunk."""
        try:
            for number in itertools.count():
                if buffersize:
                    self.schedule(client, 1)
                if number == self.chunks_read:  # the input is over, and every chunk was yielded
                    return
                timeout = None if deadline is None else deadline - time.monotonic()
                with self.changed:
                    arrived = lambda: number in self.outcomes or self.cancelled  # noqa: E731
                    if not self.changed.wait_for(arrived, timeout):
                        raise TimeoutError
                    outcomes = self.outcomes.pop(number, CancelledError())
                if isinstance(outcomes, BaseException):
                    raise outcomes
                outcomes.reverse()  # then pop each: a result yielded stays referenced nowhere here
                while outcomes:
                    yield result_of(outcomes.pop())
        finally:
            self.cancel()


# --- queue(): a Client per process, from the environment ---

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
            addresses = os.environ.get("BROKEST_ADDRESS", DEFAULT_ADDRESS)
            seconds = os.environ.get("BROKEST_TIMEOUT")
            timeout = float(seconds) if seconds else None
            _default_client = Client(addresses, timeout=timeout, key=os.environ.get("BROKEST_KEY"))
    return _default_client.queue(fn, *args, **kwargs)


# --- Supervisor and command line ---

# How long a supervisor waits before replacing a worker that crashed: if something crashes
# every worker at once, at most ten restarts a second for each port, not a tight loop.
RESTART_DELAY_S = 0.1
# Workers are forked: the child inherits the listening socket and the shared hard_deadline.
FORK = multiprocessing.get_context("fork")

# What a supervisor knows of each worker process it started.
Child = collections.namedtuple("Child", "listener process worker")


class Supervisor:
    """Keeps a worker process serving on each listening socket until SIGINT or SIGTERM.

    The supervisor holds the listening sockets and each worker process serves on one, so a
    port stays open while its worker is replaced: clients reconnect at once, and wait."""

    def __init__(self, options):
        self.options = options
        self.children = {}  # by the sentinel of the child's process
        self.stopping = False  # a plain flag, set by signal handlers (see Worker.stopping)

    def run(self, listeners):
        """Start a worker on every listener, replace those that exit, end those stuck past
        their hard limit, restart them all on SIGHUP, stop them all at the end."""
        ports = [listener.getsockname()[1] for listener in listeners]
        # At any verbosity: a quiet pool started with --port 0 must still say where it listens.
        level = max(logging.INFO, log.getEffectiveLevel())
        log.log(level, "supervisor %d serving ports %s", os.getpid(), ports)
        # SIGHUP means that the terminal went away, when there is one (Celery's rule too).
        # Started by systemd or setsid, there is none, and SIGHUP asks for fresh workers.
        hang_up = self.restart
        with contextlib.suppress(OSError):  # without a controlling terminal, there is no tty
            os.close(os.open("/dev/tty", os.O_RDONLY))
            hang_up = self.stop
        handlers = {signal.SIGINT: self.stop, signal.SIGTERM: self.stop, signal.SIGHUP: hang_up}
        with signal_handlers(handlers):
            for listener in listeners:
                self.spawn_worker(listener, delay=0)
            while self.children:  # and while stopping, so a stuck task is still ended
                if self.stopping:
                    self.retire_workers()  # again: harmless, and reaches one started late
                self.replace_exited_workers()
                self.abort_stuck_workers()

    def stop(self, signum, frame):
        """Handle SIGINT, SIGTERM, or SIGHUP from a closing terminal: make run() stop the
        workers and return."""
        why = "the terminal closed, stopping" if signum == signal.SIGHUP else "stopping"
        log.info("%s: %s", signal.Signals(signum).name, why)
        self.stopping = True

    def restart(self, signum, frame):
        """Handle SIGHUP without a terminal: replace every worker, after its task, with a fresh
        process that imports the task modules anew."""
        log.info("SIGHUP: restarting every worker")
        self.retire_workers()

    def retire_workers(self):
        """Ask every worker to stop after its task and drain."""
        for child in list(self.children.values()):
            child.process.terminate()  # SIGTERM

    def spawn_worker(self, listener, delay):
        """Start a worker process that serves on listener once delay seconds have passed."""
        worker = Worker(**self.options, port=listener.getsockname()[1])
        # The child inherits our signal handlers too, until the Worker sets its own: a signal
        # that came meanwhile would run ours there, and be lost. So it starts with them
        # blocked, and the Worker lets them in (signal_handlers).
        process = FORK.Process(target=run_worker, args=(worker, listener.fileno(), delay))
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        process.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        self.children[process.sentinel] = Child(listener, process, worker)

    def replace_exited_workers(self):
        """Wait up to CHECK_INTERVAL_MS for workers to exit; log why, and start successors."""
        for sentinel in multiprocessing.connection.wait(self.children, CHECK_INTERVAL_MS / 1000):
            child = self.children.pop(sentinel)
            child.process.join()  # its sentinel can be ready a moment before its exit status is
            if self.stopping:  # it was told to stop, and so are we
                continue
            code = child.process.exitcode  # 0: it retired, as planned; its successor need not wait
            ending = "retired" if code == 0 else f"exited with status {code}"
            if code < 0:
                ending = f"was killed by {signal.Signals(-code).name}"
            level = logging.INFO if code == 0 else logging.WARNING
            ending += "; starting another"
            log.log(level, "worker %d on port %d %s", child.process.pid, child.worker.port, ending)
            self.spawn_worker(child.listener, delay=0 if code == 0 else RESTART_DELAY_S)

    def abort_stuck_workers(self):
        """End every worker whose task runs past its hard limit, so its port is served again."""
        for child in self.children.values():
            if child.worker.hard_deadline.value < time.monotonic():
                what = "ran past its hard time limit; aborting it"
                log.warning("worker %d on port %d %s", child.process.pid, child.worker.port, what)
                child.worker.hard_deadline.value = math.inf  # abort it once
                # SIGABRT: faulthandler, enabled in run_worker, first prints where it was stuck.
                os.kill(child.process.pid, signal.SIGABRT)


def run_worker(worker, fd, delay):
    """Serve as a supervised worker process until stopped, or orphaned by the supervisor."""
    time.sleep(delay)
    faulthandler.enable()  # a task that crashes the process leaves its traceback in the log
    threading.Thread(target=stop_when_orphaned, args=(worker,), daemon=True).start()
    worker.start(fd)


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
    option = parser.add_argument
    option("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    option("--port", type=int, default=9090, help="first port; 0: any free (%(default)s)")
    option("--processes", type=int, default=1, metavar="N", help="on ports PORT..PORT+N-1")
    option("--time-limit", type=float, metavar="S", help="stop tasks running longer")
    option("--max-tasks", type=int, metavar="N", help="replace a worker after N tasks")
    option("--max-memory", type=int, metavar="MB", help="replace a worker grown past MB")
    option("--key-file", type=argparse.FileType("rb"), metavar="F", help="default: $BROKEST_KEY")
    option("--insecure", action="store_true", help="allow any --host without a key")
    option("-v", "--verbose", action="count", default=0, help="log more: -v shows each task")
    option("-q", "--quiet", action="count", default=0, help="log less")
    args = parser.parse_args(argv)
    level = logging.INFO + 10 * (args.quiet - args.verbose)
    logging.basicConfig(level=level, format="%(asctime)s brokest[%(process)d] %(message)s")
    # Task modules are imported from where we are run, as with `python -m brokest`, however
    # we were started: `python path/to/brokest.py`, or the installed `brokest` command.
    sys.path.insert(0, os.getcwd())
    try:
        names = ["host", "insecure", "time_limit", "max_tasks", "max_memory"]
        options = {name: getattr(args, name) for name in names}
        options["key"] = args.key_file.read() if args.key_file else os.environ.get("BROKEST_KEY")
        if args.key_file and not as_key(options["key"]):
            raise ValueError(f"the key file {args.key_file.name} is empty")
        if args.processes < 1:
            raise ValueError("--processes must be at least 1")
        Worker(**options)  # refuses an unsafe configuration before anything starts
        ports = [args.port and args.port + n for n in range(args.processes)]  # 0 stays 0
        listeners = [listen(args.host, port) for port in ports]
    except (OSError, ValueError) as error:
        parser.exit(2, f"brokest: {error}\n")
    Supervisor(options).run(listeners)


if __name__ == "__main__":
    main()
