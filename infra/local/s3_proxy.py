"""An HTTP proxy in front of an S3 endpoint that makes it slow and unreliable, on purpose and reproducibly.

    python infra/local/s3_proxy.py --upstream http://127.0.0.1:9000 --latency-ms 150 --slowdown 0.1 --drop 0.02
    # prints its endpoint: point --storage-options' endpoint_url at it instead of the upstream

Each request waits ``latency_s`` first (every request, as a round trip to a remote store would); then a seeded
draw, in the order requests arrive, decides whether it is dropped (the connection closes without an answer),
answered by the proxy itself with S3's ``503 SlowDown`` error, or passed on. Neither a dropped nor a throttled
request reaches the upstream, so a client's retry is never a duplicate there.

Two more faults come on when asked, not by chance:
  * an outage: every request answered ``503 ServiceUnavailable`` (none passed on) for a window of seconds, or of
    refused requests, or until ended; started by ``start_outage()`` or once a request whose request line matches a
    pattern has been answered (``outage_after("^PUT .*/_checkpoints/", seconds=30)``: 30 s from the first commit);
    ``--outage-after`` on the command line;
  * broken bodies: ``break_bodies(n)`` sends the next ``n`` answers that carry a body only half their body (the
    length announced in full), then closes the connection: a stream that breaks mid-transfer.

What is passed on goes through byte for byte, both ways: request line, headers (the signed ones, ``Host`` and
conditional ones such as ``If-None-Match`` included), body (``Content-Length`` or chunked, ``Expect:
100-continue`` honoured); each request gets a connection of its own to the upstream.
"""

import argparse
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Optional
from urllib.parse import urlsplit

HOST = "127.0.0.1"
ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>%s</Code><Message>%s</Message><RequestId>%s</RequestId><HostId>s3-proxy</HostId></Error>"
)
SLOWDOWN = ("503 Slow Down", "SlowDown", "Please reduce your request rate.")
UNAVAILABLE = ("503 Service Unavailable", "ServiceUnavailable", "The service is unavailable. Please retry.")


@dataclass(frozen=True)
class Faults:
    latency_s: float = 0.0  # added to every request
    slowdown_rate: float = 0.0  # fraction of requests answered "503 SlowDown"
    drop_rate: float = 0.0  # fraction of requests whose connection is closed without an answer
    seed: int = 0


@dataclass
class Counts:
    requests: int = 0
    forwarded: int = 0
    slowdowns: int = 0
    drops: int = 0
    unavailable: int = 0  # answered 503 ServiceUnavailable during an outage
    broken: int = 0  # bodies cut short


@dataclass
class Outage:
    """A window in which every request is answered 503 ServiceUnavailable (times from ``time.time()``): ``seconds``
    long, or until it has refused ``requests`` requests, or (both None) until ended."""

    started: float
    seconds: Optional[float] = None
    requests: Optional[int] = None
    refused: int = 0
    ended: Optional[float] = None

    def active(self, now: float) -> bool:
        return (
            self.ended is None
            and (self.seconds is None or now < self.started + self.seconds)
            and (self.requests is None or self.refused < self.requests)
        )


class ConnectionClosed(Exception):
    """The peer closed the connection between messages (the normal end of a keep-alive connection)."""


@dataclass
class Message:
    """One HTTP message as raw bytes, with the few header values a relay must understand."""

    head: bytes  # start line and headers, through the blank line
    start_line: str
    headers: dict = field(default_factory=dict)  # lower-cased name -> value (the last one of a repeated header)

    def header(self, name: str) -> str:
        return self.headers.get(name, "").strip().lower()

    def keeps_alive(self) -> bool:
        parts = self.start_line.split(" ")
        version = parts[0] if self.start_line.startswith("HTTP/") else parts[-1]  # a response's, or a request's
        if self.header("connection") == "close":
            return False
        return version != "HTTP/1.0" or self.header("connection") == "keep-alive"

    def delimited(self) -> bool:
        """Whether the body's end is marked (a length, or chunks), rather than by closing the connection."""
        return self.header("transfer-encoding").endswith("chunked") or "content-length" in self.headers


def read_head(stream: BinaryIO) -> Message:
    lines = []
    while True:
        line = stream.readline(65537)
        if not line:
            if lines:
                raise ConnectionError("connection closed inside a message head")
            raise ConnectionClosed()
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    text = [line.decode("latin-1").rstrip("\r\n") for line in lines]
    headers = {}
    for line in text[1:-1]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value
    return Message(b"".join(lines), text[0], headers)


def read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ConnectionError(f"connection closed after {len(data)} of {size} body bytes")
    return data


def read_chunked(stream: BinaryIO) -> bytes:
    """A chunked body as sent: every size line, chunk and trailer, through the final blank line."""
    raw = []
    while True:
        size_line = stream.readline(65537)
        if not size_line:
            raise ConnectionError("connection closed inside a chunked body")
        raw.append(size_line)
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        raw.append(read_exactly(stream, size + 2))  # the chunk and its CRLF
    while True:  # trailers, then the blank line
        line = stream.readline(65537)
        raw.append(line)
        if line in (b"\r\n", b"\n", b""):
            return b"".join(raw)


def read_body(stream: BinaryIO, message: Message, until_close: bool) -> bytes:
    if message.header("transfer-encoding").endswith("chunked"):
        return read_chunked(stream)
    if "content-length" in message.headers:
        return read_exactly(stream, int(message.header("content-length")))
    return stream.read() if until_close else b""  # a response without a length ends when the connection does


def response_has_body(method: str, status: int) -> bool:
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def error_response(method: str, request_id: str, error: tuple[str, str, str]) -> bytes:
    """S3's error answer ``error`` = (status line's status, code, message)."""
    status, code, message = error
    body = ERROR_BODY % (code.encode(), message.encode(), request_id.encode())
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        "\r\n"
    ).encode()
    return head + (body if method != "HEAD" else b"")


class S3Proxy:
    """``with S3Proxy("http://127.0.0.1:9000", Faults(latency_s=0.15)) as proxy: ... proxy.endpoint``"""

    def __init__(self, upstream: str, faults: Faults = Faults(), port: int = 0):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.port:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream}")
        self.upstream = (parts.hostname, parts.port)
        self.faults = faults
        self.counts = Counts()
        self.outages: list[Outage] = []
        self._outage_trigger: Optional[tuple[re.Pattern, dict]] = None  # (request line pattern, the outage's length)
        self._bodies_to_break = 0
        self._random = random.Random(faults.seed)
        self._lock = threading.Lock()  # the draw sequence, the counts and the outages, shared by connection threads
        self._connections: set[socket.socket] = set()
        self._server = _Server((HOST, port), _Handler)
        self._server.proxy = self
        # a short poll: stop() returns within 50 ms instead of the default 0.5 s
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="s3-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return "http://{}:{}".format(*self._server.server_address)

    def start(self) -> "S3Proxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, and close the connections still open (clients keep them alive between requests)."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by its client
                pass
        self._thread.join()

    def __enter__(self) -> "S3Proxy":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start_outage(self, seconds: Optional[float] = None, requests: Optional[int] = None) -> None:
        """From now on, answer every request 503 ServiceUnavailable: for ``seconds``, or ``requests`` requests, or
        until ``end_outage()``."""
        with self._lock:
            self.outages.append(Outage(time.time(), seconds, requests))

    def end_outage(self) -> None:
        with self._lock:
            for outage in self.outages:
                if outage.active(time.time()):
                    outage.ended = time.time()

    def outage_after(self, pattern: str, seconds: Optional[float] = None, requests: Optional[int] = None) -> None:
        """``start_outage(seconds, requests)`` once a request whose request line matches the regular expression
        ``pattern`` has been answered (e.g. ``"^PUT .*/_checkpoints/"``: the first commit's checkpoint)."""
        with self._lock:
            self._outage_trigger = (re.compile(pattern), {"seconds": seconds, "requests": requests})

    def break_bodies(self, count: int) -> None:
        """Cut the next ``count`` answers that carry a body after half of it, and close their connections."""
        with self._lock:
            self._bodies_to_break += count

    def answered(self, request_line: str) -> None:
        """A request was passed on and its answer sent: the trigger of an outage, if it matches."""
        with self._lock:
            trigger = self._outage_trigger
            if trigger is None or not trigger[0].search(request_line):
                return
            self._outage_trigger = None
            self.outages.append(Outage(time.time(), **trigger[1]))

    def take_body_break(self) -> bool:
        """Whether the answer about to be sent is to be cut short."""
        with self._lock:
            if self._bodies_to_break == 0:
                return False
            self._bodies_to_break -= 1
            self.counts.broken += 1
            return True

    def next_fault(self) -> tuple[Optional[str], int]:
        """``("unavailable" | "drop" | "slowdown" | None, request number)`` for the next request."""
        with self._lock:
            self.counts.requests += 1
            outage = next((outage for outage in self.outages if outage.active(time.time())), None)
            if outage is not None:
                outage.refused += 1
                self.counts.unavailable += 1
                return "unavailable", self.counts.requests
            draw = self._random.random()
            if draw < self.faults.drop_rate:
                self.counts.drops += 1
                return "drop", self.counts.requests
            if draw < self.faults.drop_rate + self.faults.slowdown_rate:
                self.counts.slowdowns += 1
                return "slowdown", self.counts.requests
            self.counts.forwarded += 1
            return None, self.counts.requests

    def connection_opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def connection_closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: S3Proxy


class _Handler(socketserver.StreamRequestHandler):
    """One client connection: its requests, one after another, until either side closes it."""

    server: _Server

    def handle(self) -> None:
        proxy = self.server.proxy
        proxy.connection_opened(self.connection)
        try:
            while self._serve_one(proxy):
                pass
        except (ConnectionClosed, OSError):
            pass  # the client went away, or the proxy is stopping
        finally:
            proxy.connection_closed(self.connection)

    def _serve_one(self, proxy: S3Proxy) -> bool:
        """Relay (or fail) one request; whether the connection stays open for another."""
        request = read_head(self.rfile)
        fault, number = proxy.next_fault()
        time.sleep(proxy.faults.latency_s)
        if fault == "drop":
            return False
        if fault in ("slowdown", "unavailable"):
            return self._answer_error(request, f"PROXY{number:08d}", SLOWDOWN if fault == "slowdown" else UNAVAILABLE)
        with socket.create_connection(proxy.upstream) as upstream, upstream.makefile("rb") as upstream_in:
            keep_alive = self._relay(request, upstream, upstream_in)
        proxy.answered(request.start_line)
        return keep_alive

    def _answer_error(self, request: Message, request_id: str, error: tuple[str, str, str]) -> bool:
        waits_for_answer = request.header("expect") == "100-continue"  # then no body comes before an answer
        if not waits_for_answer:
            read_body(self.rfile, request, until_close=False)
        self.wfile.write(error_response(request.start_line.split(" ", 1)[0], request_id, error))
        # a client that was waiting to send its body may still send it: end the connection instead of parsing it
        return request.keeps_alive() and not waits_for_answer

    def _relay(self, request: Message, upstream: socket.socket, upstream_in: BinaryIO) -> bool:
        upstream.sendall(request.head)
        if request.header("expect") == "100-continue":
            response = self._relay_interim_responses(upstream_in)
            if response is not None:  # refused before the body was sent
                self._relay_response(request, response, upstream_in)
                return False
        upstream.sendall(read_body(self.rfile, request, until_close=False))
        response = self._relay_interim_responses(upstream_in, until_final=True)
        return self._relay_response(request, response, upstream_in) and request.keeps_alive()

    def _relay_interim_responses(self, upstream_in: BinaryIO, until_final: bool = False) -> Optional[Message]:
        """Send ``1xx`` answers on (werkzeug sends ``100 Continue`` twice); return the first final answer's head,
        or None after the first interim one unless ``until_final``."""
        while True:
            response = read_head(upstream_in)
            if not response.start_line.split(" ", 2)[1].startswith("1"):
                return response
            self.wfile.write(response.head)
            if not until_final:
                return None

    def _relay_response(self, request: Message, response: Message, upstream_in: BinaryIO) -> bool:
        """Send the response on as it came; whether the client's connection can stay open."""
        method, status = request.start_line.split(" ", 1)[0], int(response.start_line.split(" ", 2)[1])
        has_body = response_has_body(method, status)
        body = read_body(upstream_in, response, until_close=True) if has_body else b""
        if body and self.server.proxy.take_body_break():
            self.wfile.write(response.head + body[: len(body) // 2])
            return False  # closes the connection mid-body
        self.wfile.write(response.head + body)
        return response.keeps_alive() and (response.delimited() or not has_body)


def wait_for_stop_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="s3_proxy.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="the S3 endpoint, http://HOST:PORT")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one (default)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument("--slowdown", type=float, default=0.0, help="fraction of requests answered 503 SlowDown")
    parser.add_argument("--drop", type=float, default=0.0, help="fraction of requests whose connection is dropped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outage-after", metavar="PATTERN", help="start an outage once a request whose request line "
                        "matches the regular expression PATTERN has been answered (e.g. '^PUT .*/_checkpoints/': after "
                        "the first commit)")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="the outage's length (default: %(default)s)")
    args = parser.parse_args(argv)
    faults = Faults(args.latency_ms / 1000, args.slowdown, args.drop, args.seed)
    with S3Proxy(args.upstream, faults, args.port) as proxy:
        if args.outage_after:
            proxy.outage_after(args.outage_after, seconds=args.outage_seconds)
        print(f"S3 proxy on {proxy.endpoint} -> {args.upstream} ({faults}); Ctrl-C stops it", flush=True)
        wait_for_stop_signal()
        print(f"{proxy.counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
