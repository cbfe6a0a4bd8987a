"""Backoff math and deadline budgeting of dmdserve._retry, on a manual clock (no real waiting)."""
import asyncio
import unittest

import grpc

from dmdserve import (DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError,
                      RetryPolicy, UnavailableError)
from dmdserve import _retry
from dmdserve._retry import RetryBudget
from fakes import FakeRpcError, FakeStream, ManualClock

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class PolicyTest(unittest.TestCase):
    def test_backoff_cap_grows_exponentially_up_to_the_maximum(self):
        policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2)
        caps = [policy.backoff_cap(k) for k in range(1, 7)]
        for got, want in zip(caps, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
            self.assertAlmostEqual(got, want)

    def test_backoff_is_full_jitter_over_the_cap(self):
        policy = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=10, multiplier=3)
        self.assertEqual(policy.backoff(2, rng=lambda: 0.0), 0.0)
        self.assertAlmostEqual(policy.backoff(2, rng=lambda: 0.5), 0.75)
        self.assertAlmostEqual(policy.backoff(2, rng=lambda: 0.999), 1.4985)
        draws = [policy.backoff(3) for _ in range(200)]
        self.assertTrue(all(0 <= d < 4.5 for d in draws))
        self.assertGreater(len(set(draws)), 100)  # random, not a fixed value

    def test_bad_settings_are_refused(self):
        for kwargs in ({"max_attempts": 0}, {"initial_backoff_s": -1}, {"max_backoff_s": -1},
                       {"multiplier": 0.5}):
            with self.subTest(**kwargs), self.assertRaises(ValueError):
                RetryPolicy(**kwargs)
        with self.assertRaises(ValueError):
            RetryPolicy().backoff_cap(0)

    def test_defaults_retry_resource_exhausted_and_unavailable_only(self):
        self.assertEqual(RetryPolicy().retryable_codes, {EXHAUSTED, UNAVAILABLE})
        self.assertEqual(_retry.NO_RETRY.max_attempts, 1)


class Attempts:
    """An attempt function that takes `duration` seconds of the manual clock and answers from
    `outcomes` (exceptions are raised), recording the timeout each attempt was given."""

    def __init__(self, clock, outcomes, duration=0.0):
        self.clock, self.outcomes, self.duration = clock, list(outcomes), duration
        self.timeouts = []
        self.started = []

    def __call__(self, timeout):
        self.timeouts.append(timeout)
        self.started.append(self.clock.now)
        self.clock.now += self.duration
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class CallTest(unittest.TestCase):
    def run_call(self, policy, timeout, outcomes, duration=0.0, rng=lambda: 0.5):
        clock = ManualClock()
        attempts = Attempts(clock, outcomes, duration)
        budget = RetryBudget(policy, timeout, clock=clock, rng=rng)
        try:
            return _retry.call("Generate", attempts, policy, timeout, sleep=clock.sleep,
                               budget=budget), attempts, clock
        finally:
            self.last = (attempts, clock)

    def test_retries_until_success_each_attempt_getting_the_time_left(self):
        policy = RetryPolicy(max_attempts=5, initial_backoff_s=1.0, max_backoff_s=8)
        result, attempts, clock = self.run_call(
            policy, 30.0, [FakeRpcError(EXHAUSTED, "queue full"), FakeRpcError(UNAVAILABLE),
                           "done"], duration=2.0)
        self.assertEqual(result, "done")
        self.assertEqual(clock.sleeps, [0.5, 1.0])  # half of caps 1 and 2 (rng 0.5)
        self.assertEqual(attempts.started, [0.0, 2.5, 5.5])
        self.assertEqual(attempts.timeouts, [30.0, 27.5, 24.5])

    def test_a_code_that_is_not_retryable_is_raised_at_once(self):
        with self.assertRaises(InvalidArgumentError) as caught:
            self.run_call(RetryPolicy(), 10.0,
                          [FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is required")])
        self.assertEqual(caught.exception.message, "prompt is required")
        self.assertEqual(len(self.last[0].timeouts), 1)
        self.assertIsInstance(caught.exception.__cause__, FakeRpcError)

    def test_the_last_error_is_raised_after_max_attempts(self):
        errors = [FakeRpcError(UNAVAILABLE, f"try {i}") for i in range(3)]
        with self.assertRaises(UnavailableError) as caught:
            self.run_call(RetryPolicy(max_attempts=3), None, errors)
        self.assertEqual(caught.exception.message, "try 2")
        attempts, clock = self.last
        self.assertEqual(attempts.timeouts, [None, None, None])
        self.assertEqual(len(clock.sleeps), 2)

    def test_no_backoff_reaches_past_the_deadline(self):
        # 10 s in all, attempts of 3 s, backoffs of 90% of their cap (2, 4, 8 s): attempt 1 ends
        # at 3, sleeps 1.8 -> attempt 2 at 4.8 with 5.2 s left, ends at 7.8; the next backoff
        # (3.6 s) would end past 10: the call fails at 7.8 with the last error, without sleeping.
        policy = RetryPolicy(max_attempts=10, initial_backoff_s=2, max_backoff_s=100)
        with self.assertRaises(ResourceExhaustedError):
            self.run_call(policy, 10.0, [FakeRpcError(EXHAUSTED)] * 10, duration=3.0,
                          rng=lambda: 0.9)
        attempts, clock = self.last
        self.assertEqual(len(attempts.timeouts), 2)
        self.assertAlmostEqual(attempts.timeouts[1], 10.0 - 4.8)
        self.assertAlmostEqual(sum(clock.sleeps), 1.8)
        self.assertAlmostEqual(clock.now, 7.8)

    def test_an_attempt_that_used_the_whole_deadline_is_not_retried(self):
        with self.assertRaises(UnavailableError):
            self.run_call(RetryPolicy(), 5.0, [FakeRpcError(UNAVAILABLE)] * 5, duration=5.0)
        self.assertEqual(len(self.last[0].timeouts), 1)

    def test_deadline_exceeded_is_not_retried(self):
        with self.assertRaises(DeadlineExceededError) as caught:
            self.run_call(RetryPolicy(), 5.0,
                          [FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")])
        self.assertIsInstance(caught.exception, TimeoutError)

    def test_timeout_must_be_positive(self):
        for timeout in (0, -1):
            with self.subTest(timeout=timeout), self.assertRaises(ValueError):
                RetryBudget(RetryPolicy(), timeout)


class StreamTest(unittest.TestCase):
    def stream(self, answers, policy=RetryPolicy(initial_backoff_s=1), timeout=60.0):
        clock = ManualClock()
        self.started = []

        self.fakes = []

        def start(attempt_timeout):
            self.started.append((clock.now, attempt_timeout))
            self.fakes.append(FakeStream(answers.pop(0)))
            return self.fakes[-1]

        budget = RetryBudget(policy, timeout, clock=clock, rng=lambda: 0.5)
        self.clock = clock
        return _retry.stream("GenerateStream", start, policy, timeout, sleep=clock.sleep,
                             budget=budget)

    def test_a_stream_that_fails_before_its_first_message_is_started_again(self):
        got = list(self.stream([[FakeRpcError(EXHAUSTED)], [FakeRpcError(UNAVAILABLE)],
                                ["a", "b", "c"]]))
        self.assertEqual(got, ["a", "b", "c"])
        self.assertEqual(self.started, [(0.0, 60.0), (0.5, 59.5), (1.5, 58.5)])

    def test_an_error_after_the_first_message_ends_the_stream(self):
        stream = self.stream([["a", FakeRpcError(UNAVAILABLE, "draining")], ["never"]])
        self.assertEqual(next(stream), "a")
        with self.assertRaises(UnavailableError) as caught:
            next(stream)
        self.assertEqual(caught.exception.message, "draining")
        self.assertEqual(len(self.started), 1)

    def test_closing_the_stream_cancels_the_call(self):
        stream = self.stream([["a", "b"]])
        self.assertEqual(next(stream), "a")
        self.assertFalse(self.fakes[0].cancelled)
        stream.close()
        self.assertTrue(self.fakes[0].cancelled)


class AsyncTest(unittest.TestCase):
    """The asyncio loops: same decisions (they share RetryBudget), real asyncio.sleep of ~0 s."""

    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.001)

    def test_call_async_retries_then_returns(self):
        outcomes = [FakeRpcError(UNAVAILABLE), FakeRpcError(EXHAUSTED), "done"]
        timeouts = []

        async def attempt(timeout):
            timeouts.append(timeout)
            outcome = outcomes.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        self.assertEqual(asyncio.run(_retry.call_async("Generate", attempt, self.policy, 30.0)),
                         "done")
        self.assertEqual(len(timeouts), 3)
        self.assertTrue(30.0 >= timeouts[0] >= timeouts[1] >= timeouts[2] > 29.0)

    def test_call_async_raises_the_typed_error_after_max_attempts(self):
        async def attempt(timeout):
            raise FakeRpcError(EXHAUSTED, "over the key's rate")

        with self.assertRaises(ResourceExhaustedError) as caught:
            asyncio.run(_retry.call_async("Generate", attempt, self.policy, 30.0))
        self.assertEqual(caught.exception.message, "over the key's rate")

    def test_stream_async_retries_only_before_the_first_message(self):
        answers = [[FakeRpcError(UNAVAILABLE)], ["a", FakeRpcError(UNAVAILABLE)], ["never"]]

        async def collect():
            got = []
            try:
                async for message in _retry.stream_async(
                        "GenerateStream", lambda t: FakeStream(answers.pop(0)), self.policy,
                        30.0):
                    got.append(message)
            except UnavailableError:
                got.append("error")
            return got

        self.assertEqual(asyncio.run(collect()), ["a", "error"])
        self.assertEqual(answers, [["never"]])


if __name__ == "__main__":
    unittest.main()
