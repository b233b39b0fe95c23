"""One retry policy for every call the job makes to its object store: listing, shard reads, Parquet and checkpoint
writes, lease records, job files.

Object stores promise retries, not uptime. A call that the store answered with throttling (429, 503 SlowDown), a
server error (5xx), or not at all (a timeout, a refused or dropped connection, a body cut short) is tried again after
a capped exponential backoff with full jitter, for as long as a time budget lasts (``--store-retry-seconds``); then it
fails with a message naming the store's answer and how long it lasted. An answer that retrying cannot change (403,
404, a failed condition, missing credentials) is raised at once, unchanged: callers tell FileNotFoundError and
FileExistsError apart.

What s3fs 2024+ raises (``s3fs/core.py`` ``_error_wrapper``, ``s3fs/errors.py`` ``translate_boto_error``, aiobotocore's
``httpsession``):
  * an HTTP error answer is botocore's ClientError, which s3fs turns into an OSError (503 -> errno EBUSY, 500 ->
    EREMOTEIO, 403 -> PermissionError, 404 -> FileNotFoundError, a failed If-None-Match -> FileExistsError) whose
    ``__cause__`` is the ClientError: its ``response`` holds the status and the store's error code;
  * no answer is botocore's HTTPClientError family (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError,
    ConnectTimeoutError), raised as it is; a body cut short while it is read is botocore's ResponseStreamingError,
    aiohttp's ClientPayloadError or botocore's IncompleteReadError; a call given a timeout is fsspec's FSTimeoutError.
The client has retried before any of these reach us: botocore up to 5 attempts (its default mode) on 5xx, throttling
and connection errors, s3fs up to 5 rounds of those on SlowDown and dropped connections. So a failure that arrives
here is seconds old; the budget counts from the start of the first attempt, the client's own retries included.
"""

import http.client
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import aiohttp
import botocore.exceptions as boto
from fsspec.exceptions import FSTimeoutError

from fms_smolvlm.errors import one_line

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BUDGET_S = 300.0
# throttling answers: S3's 503 SlowDown; other stores and S3-compatible servers answer 429 or 400 with one of these
THROTTLING_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded", "RequestThrottled"}
)
# 4xx answers that a later attempt can get past: the server gave up waiting for the request's bytes
RETRYABLE_4XX_CODES = frozenset({"RequestTimeout", "RequestTimeoutException"})
RETRY_LOG_EVERY_S = 10.0  # a call that keeps failing says so at most this often (the first failure at once)


# a call the store did not answer, or not whole (s3fs, botocore and aiohttp come with the job, so their errors are
# known here): ResponseStreamingError and aiohttp's ClientPayloadError are a body cut short, IncompleteReadError one
# that ended early without an error
_TIMEOUTS = (boto.ConnectTimeoutError, boto.ReadTimeoutError, FSTimeoutError, TimeoutError)
_CONNECTIONS = (
    boto.HTTPClientError,
    boto.ConnectionError,
    boto.IncompleteReadError,
    aiohttp.ClientError,
    http.client.IncompleteRead,
    ConnectionError,
)


@dataclass(frozen=True)
class Failure:
    """What a failed call says about the store."""

    # why another attempt may succeed: "throttled", "unavailable", "timeout", "connection"; None: it cannot
    kind: Optional[str]
    answer: str  # "the store answered 503 ServiceUnavailable", "the store did not answer in time (ReadTimeoutError...)"


def _chain(error: BaseException):
    """The error, then its explicit causes (s3fs raises an OSError caused by botocore's ClientError). Not the errors
    it was raised while handling: those may be unrelated to what failed."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__


def _http_response(error: BaseException) -> Optional[dict]:
    for link in _chain(error):
        response = getattr(link, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return response
    return None


def classify(error: BaseException) -> Failure:
    """Whether trying ``error``'s call again may succeed (its ``kind``), and what the store answered."""
    response = _http_response(error)
    if response is not None:
        return _classify_answer(response)
    for link in _chain(error):
        if isinstance(link, aiohttp.ClientResponseError):  # an answer, from a store that fsspec reaches by plain HTTP
            response = {"ResponseMetadata": {"HTTPStatusCode": link.status}, "Error": {"Message": link.message}}
            return _classify_answer(response)
        if isinstance(link, _TIMEOUTS):
            return Failure("timeout", f"the store did not answer in time ({one_line(link, with_type=True)})")
        if isinstance(link, _CONNECTIONS):
            return Failure("connection", f"the connection to the store failed ({one_line(link, with_type=True)})")
    return Failure(None, one_line(error, with_type=True))


def _classify_answer(response: dict) -> Failure:
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(response["Error"].get("Code") or "")
    message = response["Error"].get("Message") or ""
    # an answer without a body (to a HEAD) has its status as its code
    answer = f"the store answered {status} {code if code and code != str(status) else message}".rstrip()
    if status == 429 or code in THROTTLING_CODES:
        return Failure("throttled", answer)
    if (isinstance(status, int) and status >= 500 and status != 501) or code in RETRYABLE_4XX_CODES:
        return Failure("unavailable", answer)
    return Failure(None, f"{answer} ({message})" if message and message not in answer else answer)


class StoreUnavailableError(OSError):
    """A store call kept failing in ways that another attempt could fix, until its time budget ran out.

    ``reason``: what the store did, for how long ("the store answered 503 ServiceUnavailable for 300 s (...)")."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"cannot {what}: {reason}")
        self.what = what
        self.reason = reason

    def __reduce__(self):  # OSError pickles its message alone; Ray hands errors between processes pickled
        return type(self), (self.what, self.reason)


def describe(error: BaseException) -> str:
    """Why a store call failed, in one line: the store's answer where it gave one (and for how long it kept giving it),
    else the error's message."""
    if isinstance(error, StoreUnavailableError):
        return error.reason
    return classify(error).answer


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter, for up to ``budget_s`` seconds from the start of a call's first
    attempt. ``limit`` names the budget in messages (the job's flag, by default)."""

    budget_s: float = DEFAULT_BUDGET_S
    first_delay_s: float = 0.25
    max_delay_s: float = 10.0
    limit: Optional[str] = None

    def delay(self, failures: int) -> float:
        # full jitter: calls that failed together (every writer, every read task) do not all come back together
        return random.uniform(0, min(self.max_delay_s, self.first_delay_s * 2 ** (failures - 1)))

    def describe_limit(self) -> str:
        return self.limit or f"--store-retry-seconds {self.budget_s:g}"


class StoreRetries:
    """Runs calls to the store under a RetryPolicy; counts retries per kind (``counts``) and says while it retries.

    ``report(kind)`` is told of every retry too (the job counts the read tasks' retries in one place). One instance
    serves many threads.
    """

    def __init__(self, policy: RetryPolicy = RetryPolicy(), report: Optional[Callable[[str], None]] = None):
        self.policy = policy
        self.report = report
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def call(
        self,
        what: str,
        function: Callable[[], T],
        policy: Optional[RetryPolicy] = None,
        stop: Optional[threading.Event] = None,
    ) -> T:
        """``function()``, tried again while it fails in a way that may pass, for up to the policy's budget.

        ``what`` names the call in messages ("read s3://b/x.tar"). Raises StoreUnavailableError once the budget is
        spent, or ``stop`` is set while it waits; any other failure at once, unchanged."""
        policy = policy or self.policy
        started = time.monotonic()
        failures, last_said = 0, None
        while True:
            try:
                result = function()
            except Exception as error:
                failure = classify(error)
                if failure.kind is None:
                    raise
                elapsed = time.monotonic() - started
                if elapsed >= policy.budget_s or (stop is not None and stop.is_set()):
                    reason = f"{failure.answer} for {elapsed:.0f} s ({policy.describe_limit()})"
                    raise StoreUnavailableError(what, reason) from error
                failures += 1
                self._count(failure.kind)
                if last_said is None or time.monotonic() - last_said >= RETRY_LOG_EVERY_S:
                    logger.warning("store unavailable, retrying (%.0f s of %.0f): %s: %s", elapsed, policy.budget_s,
                                   what, failure.answer)
                    last_said = time.monotonic()
                self._pause(min(policy.delay(failures), policy.budget_s - elapsed), stop)
                continue
            if failures:
                logger.info("store answered again after %.0f s: %s", time.monotonic() - started, what)
            return result

    @staticmethod
    def _pause(seconds: float, stop: Optional[threading.Event]) -> None:
        if stop is None:
            time.sleep(seconds)
        else:
            stop.wait(seconds)  # returns early once stopped: the next failure gives up

    def _count(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1
        if self.report is not None:
            self.report(kind)
