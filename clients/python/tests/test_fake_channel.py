"""Client and AsyncClient over a scripted channel: what each method sends (request, API key,
per-attempt timeouts), how answers become typed results, errors typed exceptions, and which
failures are retried. The real server's behaviour is tested in test_client*.py."""
import asyncio
import unittest

import grpc

import dmdserve
from dmdserve.v1 import dmdserve_pb2 as pb
from fakes import FakeChannel, FakeRpcError, generated_image, png_bytes

FAST = dmdserve.RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.001)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def generate_response(n=2, seed=40):
    return pb.GenerateResponse(
        request_id="r-1", model="tiny", truncated_tokens=3,
        images=[generated_image(i, seed + i) for i in range(n)],
        timings=pb.Timings(queue_seconds=0.5, total_seconds=1.5, batch_size=2))


class ClientTest(unittest.TestCase):
    def client(self, script, **kwargs):
        self.channel = FakeChannel(script)
        return dmdserve.Client("fake", channel=self.channel, retry=FAST, **kwargs)

    def test_generate_sends_the_request_and_the_key_and_returns_typed_images(self):
        client = self.client({"Generate": [generate_response()]}, api_key="k-1")
        result = client.generate("a boot", 2, seed=40, size=(4, 2), request_id="r-1",
                                 timeout=7)
        call = self.channel.calls[0]
        self.assertEqual(call.method, "Generate")
        self.assertEqual(call.request, pb.GenerateRequest(prompt="a boot", num_images=2, seed=40,
                                                          width=4, height=2, request_id="r-1",
                                                          encoding=pb.IMAGE_ENCODING_PNG))
        self.assertEqual(call.metadata, (("authorization", "Bearer k-1"),))
        self.assertTrue(0 < call.timeout <= 7)
        self.assertEqual(result.seeds, [40, 41])
        self.assertEqual((result.model, result.request_id, result.truncated_tokens),
                         ("tiny", "r-1", 3))
        self.assertEqual((result.timings.queue_seconds, result.timings.batch_size), (0.5, 2))
        image = result[1]
        self.assertEqual((image.index, image.seed, image.size, image.model), (1, 41, (4, 2), "tiny"))
        self.assertEqual(image.png, png_bytes())
        self.assertEqual((image.pil.mode, image.pil.size), ("L", (4, 2)))
        self.assertEqual(list(image.pil.getdata()), [7] * 8)
        self.assertEqual(len(result), 2)
        self.assertEqual([i.index for i in result], [0, 1])

    def test_raw_images_give_pil_and_png_too(self):
        raw = pb.GeneratedImage(index=0, seed=1, width=3, height=1, channels=3,
                                encoding=pb.IMAGE_ENCODING_RAW, data=bytes(range(9)))
        client = self.client({"Generate": [pb.GenerateResponse(images=[raw])]})
        image = client.generate("x", encoding="raw")[0]
        self.assertIs(image.encoding, dmdserve.Encoding.RAW)
        self.assertEqual(image.pil.mode, "RGB")
        self.assertEqual(image.pil.tobytes(), bytes(range(9)))
        self.assertEqual(image.png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertIs(image.pil, image.pil)  # decoded once

    def test_no_key_sends_no_metadata(self):
        client = self.client({"ListModels": [pb.ListModelsResponse()]})
        self.assertEqual(client.models(), [])
        self.assertEqual(self.channel.calls[0].metadata, ())

    def test_server_errors_become_typed_exceptions_with_the_message(self):
        client = self.client({"Generate": [FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT,
                                                        "prompt is required")]})
        with self.assertRaises(dmdserve.InvalidArgumentError) as caught:
            client.generate("")
        self.assertEqual(caught.exception.message, "prompt is required")
        self.assertEqual(len(self.channel.calls), 1)

    def test_unavailable_is_retried_within_the_timeout(self):
        client = self.client({"Tokenize": [FakeRpcError(UNAVAILABLE), FakeRpcError(UNAVAILABLE),
                                           pb.TokenizeResponse(ids=[320], model="tiny")]})
        with self.assertLogs("dmdserve", "INFO") as logs:
            result = client.tokenize("a", model="tiny", timeout=5)
        self.assertEqual((result.ids, result.model), ([320], "tiny"))
        timeouts = [c.timeout for c in self.channel.calls]
        self.assertEqual(len(timeouts), 3)
        self.assertTrue(5 >= timeouts[0] >= timeouts[1] >= timeouts[2] > 0, timeouts)
        self.assertEqual(len(logs.records), 2)
        self.assertIn("Tokenize: UNAVAILABLE", logs.output[0])

    def test_no_retry_policy_makes_one_attempt(self):
        self.channel = FakeChannel({"ListModels": [FakeRpcError(UNAVAILABLE, "down")]})
        client = dmdserve.Client("fake", channel=self.channel, retry=dmdserve.NO_RETRY)
        with self.assertRaises(dmdserve.UnavailableError):
            client.models()
        self.assertEqual(len(self.channel.calls), 1)

    def test_stream_is_retried_before_its_first_image_only(self):
        client = self.client({"GenerateStream": [
            [FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")],
            [generated_image(1, 11, model="tiny", timings=pb.Timings(total_seconds=0.2)),
             generated_image(0, 10), FakeRpcError(UNAVAILABLE, "draining")],
            [generated_image(0, 10)]]})
        stream = client.stream("a boot", 2, seed=10)
        self.assertEqual(len(self.channel.calls), 0)  # starts with the iteration
        first = next(stream)
        self.assertEqual((first.index, first.seed, first.model), (1, 11, "tiny"))
        self.assertEqual(first.timings.total_seconds, 0.2)
        self.assertEqual(next(stream).index, 0)
        with self.assertRaises(dmdserve.UnavailableError):
            next(stream)
        self.assertEqual(len(self.channel.calls), 2)

    def test_leaving_a_stream_early_cancels_it(self):
        client = self.client({"GenerateStream": [[generated_image(i, i) for i in range(3)]]})
        stream = client.stream("a boot", 3)
        next(stream)
        stream.close()
        self.assertTrue(self.channel.streams[0].cancelled)

    def test_bad_arguments_are_refused_before_any_call(self):
        client = self.client({})
        with self.assertRaises(dmdserve.InvalidArgumentError):
            client.stream("a boot", size="big")
        with self.assertRaises(dmdserve.InvalidArgumentError):
            client.generate("a boot", seed=-1)
        self.assertEqual(self.channel.calls, [])


class AsyncClientTest(unittest.TestCase):
    def run_with(self, script, body, **kwargs):
        channel = FakeChannel(script, aio=True)

        async def main():
            async with dmdserve.AsyncClient("fake", channel=channel, retry=FAST,
                                            **kwargs) as client:
                return await body(client)

        return asyncio.run(main()), channel

    def test_generate_retries_and_returns_typed_images(self):
        async def body(client):
            return await client.generate("a boot", 2, seed=40, timeout=5)

        result, channel = self.run_with(
            {"Generate": [FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED), generate_response()]},
            body, api_key="k")
        self.assertEqual(result.seeds, [40, 41])
        self.assertEqual(len(channel.calls), 2)
        self.assertEqual(channel.calls[1].metadata, (("authorization", "Bearer k"),))
        self.assertTrue(5 >= channel.calls[0].timeout >= channel.calls[1].timeout > 0)

    def test_models_and_tokenize(self):
        info = pb.ModelInfo(name="tiny", width=32, height=32, channels=1, steps=1,
                            is_default=True, ready=True, max_images_per_request=64,
                            max_tokens=77, supported_sizes=[pb.ImageSize(width=32, height=32)],
                            batching=[pb.DeviceBatching(device="cpu", max_batch_size=8)])

        async def body(client):
            return await client.models(), await client.tokenize("a")

        (models, tokens), _ = self.run_with(
            {"ListModels": [pb.ListModelsResponse(models=[info])],
             "Tokenize": [pb.TokenizeResponse(ids=[320], tokens=["a</w>"], model="tiny")]}, body)
        self.assertEqual(models[0].name, "tiny")
        self.assertEqual(models[0].supported_sizes, [(32, 32)])
        self.assertEqual(models[0].batching[0].max_batch_size, 8)
        self.assertEqual(tokens.tokens, ["a</w>"])

    def test_stream_retries_before_the_first_image_and_types_errors(self):
        async def body(client):
            got = []
            try:
                async for image in client.stream("a boot", 2):
                    got.append(image.index)
            except dmdserve.InternalError as e:
                got.append(e.message)
            return got

        got, channel = self.run_with({"GenerateStream": [
            [FakeRpcError(UNAVAILABLE)],
            [generated_image(0, 5), FakeRpcError(grpc.StatusCode.INTERNAL, "model failed")]]},
            body)
        self.assertEqual(got, [0, "model failed"])
        self.assertEqual(len(channel.calls), 2)

    def test_errors_that_are_not_retried(self):
        async def body(client):
            with self.assertRaises(dmdserve.NotFoundError) as caught:
                await client.tokenize("a", model="nope")
            return caught.exception.message

        message, channel = self.run_with(
            {"Tokenize": [FakeRpcError(grpc.StatusCode.NOT_FOUND, "model 'nope' is not served")]},
            body)
        self.assertEqual(message, "model 'nope' is not served")
        self.assertEqual(len(channel.calls), 1)


if __name__ == "__main__":
    unittest.main()
