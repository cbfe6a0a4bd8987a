"""Retries with exponential backoff and full jitter, bounded by the caller's overall deadline.

A call's ``timeout`` covers all of its attempts: each attempt is given the time that remains, and
no backoff sleeps past the deadline (when the next backoff would end at or after it, the last
error is raised at once). Only the codes in :attr:`RetryPolicy.retryable_codes` are retried; by
default RESOURCE_EXHAUSTED (queue full, API key over its rate: the server refused the request whole,
nothing ran) and UNAVAILABLE (unreachable, warming up, draining). A stream is retried only while
no image has arrived: after that, an error ends the stream.

Backoff before retry ``k`` (1-based) is drawn uniformly from
``[0, min(max_backoff_s, initial_backoff_s * multiplier ** (k - 1))]`` ("full jitter"), so that
clients refused together do not come back together.

Thread safety: a RetryPolicy is immutable and may be shared; a RetryBudget belongs to one call.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import (AsyncGenerator, AsyncIterator, Awaitable, Callable, FrozenSet, Generator,
                    Iterable, Optional, TypeVar)

import grpc

from ._errors import DmdserveError, from_rpc_error

T = TypeVar("T")
Clock = Callable[[], float]
Random = Callable[[], float]

logger = logging.getLogger("dmdserve")

DEFAULT_RETRYABLE_CODES: FrozenSet[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a client retries refused calls.

    Attributes:
        max_attempts: attempts in all, the first included (1: never retry). Default 5.
        initial_backoff_s: cap of the first backoff, in seconds. Default 0.1.
        max_backoff_s: largest backoff cap, in seconds. Default 5.
        multiplier: growth of the cap from one retry to the next. Default 2.
        retryable_codes: status codes that are retried; default RESOURCE_EXHAUSTED and UNAVAILABLE.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    retryable_codes: FrozenSet[grpc.StatusCode] = DEFAULT_RETRYABLE_CODES

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("initial_backoff_s and max_backoff_s must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    def backoff_cap(self, retry: int) -> float:
        """The largest backoff before retry number `retry` (1 = the first retry), in seconds."""
        if retry < 1:
            raise ValueError(f"retry must be >= 1, got {retry}")
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))

    def backoff(self, retry: int, rng: Random = random.random) -> float:
        """A backoff before retry `retry`, uniform in [0, backoff_cap(retry)); `rng` gives [0, 1)."""
        return rng() * self.backoff_cap(retry)


#: A policy that never retries.
NO_RETRY = RetryPolicy(max_attempts=1)


class RetryBudget:
    """The attempts of one call: how long each may take and whether and when to retry.

    `timeout_s` is the whole call's time (None: no deadline, only max_attempts bounds the retries).
    `clock` (seconds, monotonic) and `rng` are injectable for tests.
    """

    def __init__(self, policy: RetryPolicy, timeout_s: Optional[float],
                 clock: Clock = time.monotonic, rng: Random = random.random) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout_s}")
        self._policy = policy
        self._clock = clock
        self._rng = rng
        self._deadline = None if timeout_s is None else clock() + timeout_s
        self.attempts = 0

    def start_attempt(self) -> Optional[float]:
        """Counts an attempt and returns its timeout: the time left until the deadline (or None)."""
        self.attempts += 1
        return self.remaining()

    def remaining(self) -> Optional[float]:
        """Seconds until the deadline (never negative), or None without a deadline."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._clock())

    def next_backoff(self, error: DmdserveError) -> Optional[float]:
        """Seconds to wait before retrying after `error`, or None when the call must fail with it:
        a code that is not retried, no attempt left, or a backoff that would reach the deadline."""
        if error.code not in self._policy.retryable_codes:
            return None
        if self.attempts >= self._policy.max_attempts:
            return None
        delay = self._policy.backoff(self.attempts, self._rng)
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        return delay


def _log_retry(what: str, error: DmdserveError, delay: float, budget: RetryBudget,
               policy: RetryPolicy) -> None:
    logger.info("%s: %s; retrying in %.3f s (attempt %d of %d)", what, error, delay,
                budget.attempts + 1, policy.max_attempts)


def call(what: str, attempt: Callable[[Optional[float]], T], policy: RetryPolicy,
         timeout_s: Optional[float], sleep: Callable[[float], None] = time.sleep,
         budget: Optional[RetryBudget] = None) -> T:
    """Runs `attempt(timeout)` until it succeeds or the policy gives up; raises the typed error of
    the last attempt. `what` names the call in the retry log lines."""
    budget = budget or RetryBudget(policy, timeout_s)
    while True:
        try:
            return attempt(budget.start_attempt())
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            delay = budget.next_backoff(error)
            if delay is None:
                raise error from rpc_error
        _log_retry(what, error, delay, budget, policy)
        sleep(delay)


def stream(what: str, start: Callable[[Optional[float]], Iterable[T]], policy: RetryPolicy,
           timeout_s: Optional[float], sleep: Callable[[float], None] = time.sleep,
           budget: Optional[RetryBudget] = None) -> Generator[T, None, None]:
    """Yields the messages of the stream `start(timeout)` returns, starting it again while it fails
    before its first message; raises the typed error. Closing the generator cancels the call."""
    budget = budget or RetryBudget(policy, timeout_s)
    while True:
        responses = start(budget.start_attempt())
        received = False
        try:
            for message in responses:
                received = True
                yield message
            return
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            delay = None if received else budget.next_backoff(error)
            if delay is None:
                raise error from rpc_error
        finally:
            cancel = getattr(responses, "cancel", None)
            if cancel is not None:
                cancel()  # a no-op once the call has finished
        _log_retry(what, error, delay, budget, policy)
        sleep(delay)


async def call_async(what: str, attempt: Callable[[Optional[float]], Awaitable[T]],
                     policy: RetryPolicy, timeout_s: Optional[float],
                     budget: Optional[RetryBudget] = None) -> T:
    """The asyncio twin of :func:`call`: awaits `attempt(timeout)`, backing off with asyncio.sleep."""
    budget = budget or RetryBudget(policy, timeout_s)
    while True:
        try:
            return await attempt(budget.start_attempt())
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            delay = budget.next_backoff(error)
            if delay is None:
                raise error from rpc_error
        _log_retry(what, error, delay, budget, policy)
        await asyncio.sleep(delay)


async def stream_async(what: str, start: Callable[[Optional[float]], AsyncIterator[T]],
                       policy: RetryPolicy, timeout_s: Optional[float],
                       budget: Optional[RetryBudget] = None) -> AsyncGenerator[T, None]:
    """The asyncio twin of :func:`stream`."""
    budget = budget or RetryBudget(policy, timeout_s)
    while True:
        responses = start(budget.start_attempt())
        received = False
        try:
            async for message in responses:
                received = True
                yield message
            return
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            delay = None if received else budget.next_backoff(error)
            if delay is None:
                raise error from rpc_error
        finally:
            cancel = getattr(responses, "cancel", None)
            if cancel is not None:
                cancel()
        _log_retry(what, error, delay, budget, policy)
        await asyncio.sleep(delay)
