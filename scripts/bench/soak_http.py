"""The HTTP/1.1 side of scripts/bench/soak.py: raw asyncio-stream clients of dmdserve's HTTP API
(OpenAI's /v1/images/generations, the native JSON routes, their streams), its bad inputs, and
the hostile HTTP clients (slowloris, never reading a response, connecting without a request).

Every request opens its own connection with `Connection: close` and reads the answer to EOF
(chunked bodies are decoded and must end with their terminating chunk), so a cut answer shows.
Normal requests come from a few loopback source addresses in turn, and the hostile clients from
one of their own: the server caps connections per IP address (64), which real clients, from
many addresses, do not share; the hostile clients' cap is theirs alone.

Each request kind is a coroutine returning (ledger label, images received, details), like
soak.py's gRPC kinds; labels are "HTTP <status>" (soak_report.HTTP_CODE_NAMES maps each to the
code name the server's dmdserve_requests_total counts it under) or, for what is not an answer,
ABANDONED / HELD / CLOSED_BY_SERVER / CLOSED / BROKEN(...).

Thread safety: one asyncio loop drives an HttpClients.
"""
import asyncio
import json
import socket
import struct

import soak_report as sr

NORMAL_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
HOSTILE_SOURCE = "127.0.0.9"
PROBE_SOURCE = "127.0.0.10"
HEAD_LIMIT = 64 << 10
SERVER_IO_TIMEOUT_S = 30  # the HTTP API drops a connection silent this long (not a flag)


class HttpBroken(Exception):
    """The connection ended before a whole answer arrived."""


def request_bytes(method, path, body=None, headers=()):
    """One HTTP/1.1 request with `Connection: close` (`body`: bytes, or None for none)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: soak", "Connection: close", *headers]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def read_head(reader):
    """(status, {lower-case header: value}) of an answer."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise HttpBroken(f"closed before the status line ({len(e.partial)} bytes)") from None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key:
            headers[key.strip().lower()] = value.strip()
    return status, headers


async def read_chunks(reader):
    """Yields the decoded pieces of a chunked body; HttpBroken if it ends without the last chunk."""
    try:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    except (asyncio.IncompleteReadError, ValueError) as e:
        raise HttpBroken(f"chunked body cut: {e}") from None


async def read_body(reader, headers):
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return b"".join([piece async for piece in read_chunks(reader)])
    if "content-length" in headers:
        try:
            return await reader.readexactly(int(headers["content-length"]))
        except asyncio.IncompleteReadError as e:
            raise HttpBroken(f"body cut at {len(e.partial)} bytes") from None
    return await reader.read()


def status_label(status, headers):
    """"HTTP <status>"; a 429 without Retry-After is marked (the API promises it)."""
    if status == 429 and "retry-after" not in headers:
        return "HTTP 429(no Retry-After)"
    return f"HTTP {status}"


class HttpClients:
    """The HTTP request kinds of one soak run against `host`:`port`. `prompt(word)` makes a new
    prompt; `rng` draws the random choices; `healthy` is the healthy model's name."""

    def __init__(self, host, port, healthy, rng, prompt, max_body_bytes, max_prompt_bytes,
                 long_holds):
        self.host, self.port, self.healthy, self.rng = host, port, healthy, rng
        self.prompt = prompt
        self.max_body_bytes, self.max_prompt_bytes = max_body_bytes, max_prompt_bytes
        self.long_holds = long_holds  # some slowloris clients outlast the server's io timeout
        self.next_source = 0
        self.seed = 0
        self.held = 0  # hostile clients holding a connection now
        self.held_at_start = []  # self.held when each normal HTTP request started
        self.bad = http_bad_inputs(healthy, max_body_bytes, max_prompt_bytes)
        self.bad_next = 0

    async def connect(self, source=None):
        if source is None:
            source = NORMAL_SOURCES[self.next_source % len(NORMAL_SOURCES)]
            self.next_source += 1
            self.held_at_start.append(self.held)
        return await asyncio.open_connection(self.host, self.port, local_addr=(source, 0),
                                             limit=HEAD_LIMIT)

    async def exchange(self, data, source=None):
        """Sends `data`, reads the whole answer: (status, headers, body)."""
        reader, writer = await self.connect(source)
        try:
            writer.write(data)
            await writer.drain()
            status, headers = await read_head(reader)
            return status, headers, await read_body(reader, headers)
        finally:
            writer.close()

    def _generate_body(self, n, openai=False, **extra):
        self.seed += 1
        fields = ({"n": n} if openai else {"num_images": n})
        return json.dumps({"model": self.healthy, "prompt": self.prompt(), "seed": self.seed,
                           **fields, **extra}).encode()

    @staticmethod
    def _broken(e):
        return f"BROKEN({type(e).__name__})", 0, str(e)

    async def _unary(self, path, body, n, images_key, headers=()):
        try:
            status, head, data = await self.exchange(request_bytes("POST", path, body, headers))
        except (HttpBroken, OSError) as e:
            return self._broken(e)
        if status != 200:
            return status_label(status, head), 0, data.decode(errors="replace")
        got = len(json.loads(data)[images_key])
        return ("HTTP 200" if got == n else "HTTP 200(missing images)"), got, ""

    # The load's kinds.
    async def http_images(self, n):
        return await self._unary("/v1/images/generations", self._generate_body(n, True), n,
                                 "data")

    async def http_generate(self, n):
        return await self._unary("/v1/generate", self._generate_body(n), n, "images")

    async def http_short_deadline(self, n):
        timeout = f"{self.rng.uniform(0.001, 0.03):.4f}"
        return await self._unary("/v1/generate", self._generate_body(n), n, "images",
                                 [f"X-Request-Timeout: {timeout}"])

    async def http_stream(self, n, abandon=False):
        """POST /v1/generate:stream read to the end (every index, no error line) or, with
        `abandon`, closed after its first line."""
        reader, writer = await self.connect()
        try:
            writer.write(request_bytes("POST", "/v1/generate:stream", self._generate_body(n)))
            await writer.drain()
            status, head = await read_head(reader)
            if status != 200:
                return status_label(status, head), 0, (await read_body(reader, head)).decode(
                    errors="replace")
            indices, pending = set(), b""
            async for piece in read_chunks(reader):
                pending += piece
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if "error" in message:
                        return "HTTP 200(error line)", len(indices), line.decode()[:200]
                    indices.add(message["index"])
                if abandon and indices:
                    return "ABANDONED", len(indices), ""
            complete = indices == set(range(n)) and not pending
            return ("HTTP 200" if complete else "HTTP 200(missing images)"), len(indices), ""
        except (HttpBroken, OSError) as e:
            return self._broken(e)
        finally:
            writer.close()

    async def http_stream_abandon(self, n):
        return await self.http_stream(n, abandon=True)

    # Light calls beside the load.
    async def http_models(self, _):
        return await self._light(request_bytes("GET", "/v1/models"), "data")

    async def http_list_models(self, _):
        return await self._light(request_bytes("POST", "/v1/models:list", b"{}"), "models")

    async def http_tokenize(self, _):
        body = json.dumps({"text": self.prompt()}).encode()
        return await self._light(request_bytes("POST", "/v1/tokenize", body), "ids")

    async def _light(self, data, key):
        try:
            status, head, body = await self.exchange(data, PROBE_SOURCE)
        except (HttpBroken, OSError) as e:
            return self._broken(e)
        if status == 200 and not json.loads(body).get(key):
            return "HTTP 200(empty)", 0, body.decode()[:200]
        return status_label(status, head), 0, "" if status == 200 else body.decode()[:200]

    async def http_bad(self, case, data):
        """A bad input: its status (or CLOSED when the server closes without answering)."""
        try:
            status, head, body = await self.exchange(data, PROBE_SOURCE)
        except HttpBroken as e:
            return "CLOSED", 0, str(e)
        except OSError as e:
            return self._broken(e)
        return status_label(status, head), 0, body.decode(errors="replace")[:200]

    # Hostile clients: each holds a connection from HOSTILE_SOURCE.
    async def _hold(self, writer, reader, seconds):
        """Holds the connection `seconds`: HELD, or CLOSED_BY_SERVER if the server ends it; held
        past the server's io timeout without being dropped, a label no kind allows."""
        self.held += 1
        try:
            data = await asyncio.wait_for(reader.read(), seconds)
            return "CLOSED_BY_SERVER", 0, data.decode(errors="replace")[:200]
        except asyncio.TimeoutError:
            if seconds > SERVER_IO_TIMEOUT_S + 5:
                return "HELD(past the server's io timeout)", 0, ""
            return "HELD", 0, ""
        except OSError as e:
            return "CLOSED_BY_SERVER", 0, str(e)
        finally:
            self.held -= 1
            writer.close()

    def _hold_seconds(self):
        if self.long_holds and self.rng.random() < 0.1:
            return SERVER_IO_TIMEOUT_S + 10  # the server must drop the connection first
        return self.rng.uniform(3, 12)

    async def http_slowloris(self, _):
        """Sends half a request's headers and stalls."""
        reader, writer = await self.connect(HOSTILE_SOURCE)
        writer.write(b"POST /v1/generate HTTP/1.1\r\nHost: soak\r\nContent-Ty")
        await writer.drain()
        return await self._hold(writer, reader, self._hold_seconds())

    async def http_never_read(self, _):
        """Sends a 16-image stream request (raw pixels) on a connection with a small receive
        buffer, and never reads the answer."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        sock.bind((HOSTILE_SOURCE, 0))
        await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=HEAD_LIMIT)
        writer.write(request_bytes("POST", "/v1/generate:stream", self._generate_body(
            16, encoding="IMAGE_ENCODING_RAW")))
        await writer.drain()
        self.held += 1
        try:
            await asyncio.sleep(self.rng.uniform(3, 12))
        finally:
            self.held -= 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        return "HELD", 0, ""

    async def http_idle_connect(self, _):
        """Opens a connection and closes it without a request, at once or up to 1 s later."""
        _, writer = await self.connect(HOSTILE_SOURCE)
        await asyncio.sleep(self.rng.choice((0, self.rng.uniform(0, 1))))
        writer.close()
        return "CLOSED", 0, ""

    def next_bad(self):
        """(ledger kind, coroutine) of the next bad input, in turn."""
        case, data, _, _ = self.bad[self.bad_next % len(self.bad)]
        self.bad_next += 1
        return sr.BAD_PREFIX + case, self.http_bad(case, data)


def http_bad_inputs(healthy, max_body_bytes, max_prompt_bytes):
    """(case, request bytes, method the server counts it under or None, expected label) for
    every HTTP bad input; registers each as a "bad:<case>" kind."""
    ok = {"model": healthy, "prompt": "a photo of a sneaker"}
    native, openai = "POST /v1/generate", "POST /v1/images/generations"

    def post(path, body):
        return request_bytes("POST", path, body if isinstance(body, bytes)
                             else json.dumps(body).encode())
    big = json.dumps({**ok, "prompt": "a" * max_body_bytes}).encode()
    cases = [
        ("http: bad JSON (native)", post("/v1/generate", b'{"prompt": "a'), native, "HTTP 400"),
        ("http: bad JSON (OpenAI)", post("/v1/images/generations", b"{nope"), openai, "HTTP 400"),
        ("http: unknown field (native)", post("/v1/generate", {**ok, "num_image": 2}), native,
         "HTTP 400"),
        ("http: num_images a string", post("/v1/generate", {**ok, "num_images": "two"}),
         native, "HTTP 400"),
        ("http: n a list (OpenAI)", post("/v1/images/generations", {**ok, "n": [1]}), openai,
         "HTTP 400"),
        ("http: missing prompt (native)", post("/v1/generate", {"model": healthy}), native,
         "HTTP 400"),
        ("http: missing prompt (OpenAI)", post("/v1/images/generations", {"n": 1}), openai,
         "HTTP 400"),
        ("http: prompt over the limit", post("/v1/images/generations",
                                             {**ok, "prompt": "a" * (max_prompt_bytes + 1)}),
         openai, "HTTP 400"),
        ("http: unknown model", post("/v1/generate", {**ok, "model": "no-such-model"}), native,
         "HTTP 404"),
        ("http: bad X-Request-Timeout", request_bytes(
            "POST", "/v1/generate", json.dumps(ok).encode(), ["X-Request-Timeout: soon"]),
         native, "HTTP 400"),
        ("http: stream without prompt", post("/v1/generate:stream", {"model": healthy}),
         "POST /v1/generate:stream", "HTTP 400"),
        ("http: tokenize bad JSON", post("/v1/tokenize", b"[1,"), "POST /v1/tokenize",
         "HTTP 400"),
        ("http: body over the limit", post("/v1/images/generations", big), openai, "HTTP 413"),
        # No Content-Length to refuse early: the server closes the connection once the chunks
        # pass the limit, before any handler ran (not counted).
        ("http: chunked body over the limit", request_bytes(
            "POST", "/v1/generate", None, ["Content-Type: application/json",
                                           "Transfer-Encoding: chunked"]) +
         b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big), None, "CLOSED"),
        ("http: unknown path", post("/v1/nothing", {}), None, "HTTP 404"),
        ("http: wrong method", request_bytes("GET", "/v1/generate"), None, "HTTP 405"),
    ]
    for case, _, method, expected in cases:
        sr.add_bad_input_kind(case, method, expected)
    return cases


async def open_probes(clients, count):
    """`count` connections opened now, for requests sent later (after SIGTERM)."""
    return [await clients.connect(PROBE_SOURCE) for _ in range(count)]


async def send_probe(clients, probe, path, n):
    """Sends a generate request of `n` images on an open probe connection: its label."""
    reader, writer = probe
    body = clients._generate_body(n, openai=path == "/v1/images/generations")
    try:
        writer.write(request_bytes("POST", path, body))
        await writer.drain()
        status, head = await read_head(reader)
        await read_body(reader, head)
        return status_label(status, head)
    except (HttpBroken, OSError) as e:
        return f"BROKEN({type(e).__name__}: {e})"
    finally:
        writer.close()
