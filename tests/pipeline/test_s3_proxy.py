"""The fault-injecting S3 proxy: bytes pass through unchanged, s3fs works through it with latency, s3fs's retries get
through its 503 SlowDown answers and dropped connections, and an outage refuses every request for its window."""

import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
import s3fs

from infra.local.s3_proxy import Faults, S3Proxy
from pipeline.retry import Failure, classify

WAIT_S = 30


def s3_through(proxy: S3Proxy, options: dict, **extra) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**{**options, "client_kwargs": {"endpoint_url": proxy.endpoint}}, skip_instance_cache=True,
                             **extra)


class RecordingUpstream:
    """A raw HTTP server for one exchange per connection: records what arrives, answers a fixed response."""

    def __init__(self, expected_bytes: list[int], responses: list[bytes]):
        self.expected_bytes, self.responses, self.received = expected_bytes, responses, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.listener.getsockname()[1]

    def _serve(self) -> None:
        for size, response in zip(self.expected_bytes, self.responses):
            connection, _ = self.listener.accept()
            with connection:
                self.received.append(receive(connection, size))
                connection.sendall(response)
        self.listener.close()


def proxy_address(proxy: S3Proxy) -> tuple[str, int]:
    parts = urlsplit(proxy.endpoint)
    return parts.hostname, parts.port


def receive(connection: socket.socket, size: int) -> bytes:
    connection.settimeout(WAIT_S)
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_requests_and_responses_pass_through_byte_exact():
    conditional_put = (
        b"PUT /bucket/key?x-id=PutObject HTTP/1.1\r\nHost: 127.0.0.1:1\r\nif-None-Match: *\r\n"
        b"X-Amz-Date: 20260101T000000Z\r\nAuthorization: AWS4-HMAC-SHA256 Credential=a/b, Signature=00ff\r\n"
        b"x-amz-meta-twice: 1\r\nx-amz-meta-twice: 2\r\nContent-Length: 7\r\n\r\nbody\x00\r\n"
    )
    chunked_put = (
        b"PUT /bucket/chunked HTTP/1.1\r\nHost: 127.0.0.1:1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n3\r\n!!!\r\n0\r\nx-amz-checksum-crc32: AAAAAA==\r\n\r\n"
    )
    precondition_failed = (
        b"HTTP/1.1 412 Precondition Failed\r\nContent-Type: application/xml\r\nContent-Length: 21\r\n\r\n"
        b"<Error>exists</Error>"
    )
    chunked_ok = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: \"e\"\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    upstream = RecordingUpstream([len(conditional_put), len(chunked_put)], [precondition_failed, chunked_ok])
    with S3Proxy(upstream.url) as proxy, socket.create_connection(proxy_address(proxy)) as client:
        client.sendall(conditional_put)
        first = receive(client, len(precondition_failed))
        client.sendall(chunked_put)  # the same client connection, kept alive
        second = receive(client, len(chunked_ok))
    assert upstream.received == [conditional_put, chunked_put]
    assert (first, second) == (precondition_failed, chunked_ok)


def test_s3fs_reads_and_writes_through_a_slow_proxy(s3_server):
    direct, options = s3_server
    prefix = f"captions-test/proxy-{uuid.uuid4().hex}"
    with S3Proxy(options["client_kwargs"]["endpoint_url"], Faults(latency_s=0.1)) as proxy:
        fs = s3_through(proxy, options)
        payload = bytes(range(256)) * 1000
        fs.pipe_file(f"{prefix}/a.bin", payload)
        fs.pipe_file(f"{prefix}/lease.json", b"{}", mode="create")  # a conditional PUT (If-None-Match: *)
        with pytest.raises(FileExistsError):
            fs.pipe_file(f"{prefix}/lease.json", b"{}", mode="create")
        started = time.perf_counter()
        assert fs.cat_file(f"{prefix}/a.bin") == payload
        assert time.perf_counter() - started >= 0.1  # the latency is really added
        assert sorted(fs.ls(prefix, detail=False)) == [f"{prefix}/a.bin", f"{prefix}/lease.json"]
    assert direct.cat_file(f"{prefix}/a.bin") == payload
    assert proxy.counts.requests == proxy.counts.forwarded >= 5


def test_s3fs_retries_get_through_slowdowns_and_dropped_connections(s3_server):
    direct, options = s3_server
    prefix = f"captions-test/flaky-{uuid.uuid4().hex}"
    faults = Faults(slowdown_rate=0.25, drop_rate=0.1, seed=3)
    with S3Proxy(options["client_kwargs"]["endpoint_url"], faults) as proxy:
        fs = s3_through(proxy, options, config_kwargs={"retries": {"max_attempts": 10, "mode": "standard"}})
        for i in range(8):
            fs.pipe_file(f"{prefix}/{i}", f"payload {i}".encode())
        assert [fs.cat_file(f"{prefix}/{i}") for i in range(8)] == [f"payload {i}".encode() for i in range(8)]
    assert proxy.counts.slowdowns >= 2 and proxy.counts.drops >= 1, proxy.counts
    assert direct.cat_file(f"{prefix}/7") == b"payload 7"


def test_the_faults_follow_the_seed():
    def draws(seed: int) -> list:
        with S3Proxy("http://127.0.0.1:9", Faults(slowdown_rate=0.25, drop_rate=0.1, seed=seed)) as proxy:
            return [proxy.next_fault()[0] for _ in range(1000)]

    first = draws(7)
    assert first == draws(7) and first != draws(8)
    assert 200 < first.count("slowdown") < 300 and 60 < first.count("drop") < 140


def test_an_outage_answers_503_service_unavailable_from_its_trigger_until_it_ends(s3_server):
    """Started once a request matching its pattern has been answered, for a window of requests; or by hand until
    ended. Refused requests never reach the store."""
    direct, options = s3_server
    prefix = f"captions-test/outage-{uuid.uuid4().hex}"
    with S3Proxy(options["client_kwargs"]["endpoint_url"]) as proxy:
        fs = s3_through(proxy, options, config_kwargs={"retries": {"max_attempts": 0}})  # each call one request
        proxy.outage_after(r"^PUT \S*/trigger ", requests=2)
        fs.pipe_file(f"{prefix}/before", b"1")  # does not match: no outage yet
        fs.pipe_file(f"{prefix}/trigger", b"2")  # answered; the outage starts after it
        for name in ("refused-1", "refused-2"):
            with pytest.raises(OSError) as refused:
                fs.pipe_file(f"{prefix}/{name}", b"3")
            assert classify(refused.value) == Failure("unavailable", "the store answered 503 ServiceUnavailable")
        fs.pipe_file(f"{prefix}/after", b"4")  # the window was two requests long
        proxy.start_outage()
        with pytest.raises(OSError):
            fs.cat_file(f"{prefix}/after")
        proxy.end_outage()
        assert fs.cat_file(f"{prefix}/after") == b"4"
    assert sorted(direct.ls(prefix, detail=False)) == [f"{prefix}/{name}" for name in ("after", "before", "trigger")]
    assert proxy.counts.unavailable == 3 and [outage.refused for outage in proxy.outages] == [2, 1]
