"""The bookkeeping of scripts/bench/soak.py, kept free of gRPC so that it can be tested alone:
the request ledger, the invariants a soak run must meet, resource-growth analysis and the
Markdown report.

Every request the soak sends is opened in a Ledger under its kind and closed with the status the
client observed. A run passes when
  - every request was closed (none lost: no final status),
  - every status is one its kind allows (KINDS; e.g. INTERNAL is never allowed for a healthy
    request, UNAVAILABLE never while serving),
  - the server's dmdserve_requests_total agrees with the client's counts (check_metrics),
  - resource use stopped growing after warm-up (check_growth),
plus the checks soak.py runs around the load (health, drain, exit code).

Thread safety: a Ledger is used from one thread (soak.py's asyncio loop); the functions are pure.
"""
import collections
import re
import statistics

# Status labels: the gRPC code name, with a reason for RESOURCE_EXHAUSTED, whose causes differ
# (see label()).
QUEUE_FULL = "RESOURCE_EXHAUSTED(queue full)"
OUT_OF_MEMORY = "RESOURCE_EXHAUSTED(out of memory)"
TOO_LARGE = "RESOURCE_EXHAUSTED(too large)"


def label(code_name, details):
    """The ledger label of a final status: the code name, and for RESOURCE_EXHAUSTED which one
    (the queue was full, the model ran out of memory, or the transport refused a message or
    headers over its limits)."""
    if code_name != "RESOURCE_EXHAUSTED":
        return code_name
    details = details or ""
    if "queue full" in details:
        return QUEUE_FULL
    if "out of device memory" in details:
        return OUT_OF_MEMORY
    if "larger than max" in details or "metadata" in details.lower() or "header" in details:
        return TOO_LARGE
    return "RESOURCE_EXHAUSTED(other)"


# How the server's dmdserve_requests_total counts a kind's requests:
EXACT = "exact"      # once each, with the code the client saw
COUNTED = "counted"  # once each (the request surely reached the server), the code may differ
MAYBE = "maybe"      # at most once: the request may not have reached the server, or may have
                     # ended otherwise there (e.g. OK before the server noticed a cancellation)

# kind -> (gRPC method the server counts it under, or None when dmdserve does not count it (health
# checks; calls refused by gRPC's transport before dmdserve's handlers), how it counts it, the
# labels the kind allows).
_HEALTHY_REFUSED = {QUEUE_FULL}
KINDS = {
    # The healthy model (the soak's load).
    "generate": ("Generate", EXACT, {"OK"} | _HEALTHY_REFUSED),
    "stream": ("GenerateStream", EXACT, {"OK"} | _HEALTHY_REFUSED),
    "cancel_mid_flight": ("Generate", MAYBE, {"OK", "CANCELLED"} | _HEALTHY_REFUSED),
    # It received an image, so the server has the request: it must finish it.
    "stream_cancel_after_first": ("GenerateStream", COUNTED,
                                  {"OK", "CANCELLED"} | _HEALTHY_REFUSED),
    "stream_never_read": ("GenerateStream", MAYBE,
                          {"OK", "DEADLINE_EXCEEDED", "CANCELLED"} | _HEALTHY_REFUSED),
    # Its "status" is its own disconnect: the server's side shows in the counters and gauges.
    "disconnect_mid_flight": ("GenerateStream", MAYBE, {"DISCONNECTED"}),
    "short_deadline": ("Generate", MAYBE, {"OK", "DEADLINE_EXCEEDED"} | _HEALTHY_REFUSED),
    # Injected model faults (their own models, so a failing batch holds only faulty requests).
    "fault_raise": ("Generate", EXACT, {"INTERNAL", QUEUE_FULL}),
    "fault_oom": ("Generate", EXACT, {OUT_OF_MEMORY, QUEUE_FULL}),
    # Light calls beside the load.
    "tokenize": ("Tokenize", EXACT, {"OK"}),
    "list_models": ("ListModels", EXACT, {"OK"}),
    "health": (None, EXACT, {"SERVING"}),
    # Refused by gRPC's transport before dmdserve's handlers.
    "oversize_message": (None, EXACT, {TOO_LARGE}),
    "oversize_metadata": (None, EXACT, {TOO_LARGE}),
}

# The HTTP API's kinds (scripts/bench/soak_http.py). Their labels are "HTTP <status>"; the server
# counts an answered request under its route's method label and the code name the status comes
# from (HTTP_CODE_NAMES). A 429 must carry Retry-After (else it is labelled otherwise).
_IMAGES = "POST /v1/images/generations"
_GENERATE = "POST /v1/generate"
_STREAM = "POST /v1/generate:stream"
_HTTP_REFUSED = {"HTTP 429"}
KINDS.update({
    # The healthy model's load. The client reads every answer whole: the server counted it.
    "http_images": (_IMAGES, EXACT, {"HTTP 200"} | _HTTP_REFUSED),
    "http_generate": (_GENERATE, EXACT, {"HTTP 200"} | _HTTP_REFUSED),
    "http_stream": (_STREAM, EXACT, {"HTTP 200"} | _HTTP_REFUSED),
    # Closed after its first image line: the server had it, and counts it OK or CANCELLED.
    "http_stream_abandon": (_STREAM, COUNTED, {"ABANDONED"} | _HTTP_REFUSED),
    "http_short_deadline": (_GENERATE, EXACT, {"HTTP 200", "HTTP 504"} | _HTTP_REFUSED),
    # Light calls.
    "http_models": ("GET /v1/models", EXACT, {"HTTP 200"}),
    "http_list_models": ("POST /v1/models:list", EXACT, {"HTTP 200"}),
    "http_tokenize": ("POST /v1/tokenize", EXACT, {"HTTP 200"}),
    # Hostile clients. Half a request's headers: no handler runs, nothing is counted; held
    # past the server's io timeout, the server closes it.
    "http_slowloris": (None, EXACT, {"HELD", "CLOSED_BY_SERVER"}),
    # A whole stream request whose answer is never read: the server has it and counts it.
    "http_never_read": (_STREAM, COUNTED, {"HELD"}),
    "http_idle_connect": (None, EXACT, {"CLOSED"}),
})
# HTTP status -> the code name dmdserve_requests_total counts it under (server/openai_api.cc's
# ToHttpError, read backwards for the statuses the soak allows; a 413 is OUT_OF_RANGE).
HTTP_CODE_NAMES = {"200": "OK", "400": "INVALID_ARGUMENT", "404": "NOT_FOUND",
                   "413": "OUT_OF_RANGE", "429": "RESOURCE_EXHAUSTED", "503": "UNAVAILABLE",
                   "504": "DEADLINE_EXCEEDED"}

# Bad inputs: "bad:<case>" kinds, registered by add_bad_input_kind().
BAD_PREFIX = "bad:"


def add_bad_input_kind(case, method, expected_label):
    """Registers kind "bad:<case>": a request the server must refuse with `expected_label`."""
    KINDS[BAD_PREFIX + case] = (method, EXACT, {expected_label})


# The healthy model's kinds: the offered load, and the latency table.
GRPC_LOAD_KINDS = ("generate", "stream", "cancel_mid_flight", "stream_cancel_after_first",
                   "stream_never_read", "disconnect_mid_flight", "short_deadline")
HTTP_LOAD_KINDS = ("http_images", "http_generate", "http_stream", "http_stream_abandon",
                   "http_short_deadline")
LOAD_KINDS = GRPC_LOAD_KINDS + HTTP_LOAD_KINDS
# The requests whose OK latencies the stall-isolation check compares (check_stall_isolation).
GRPC_NORMAL_KINDS = ("generate", "stream")
HTTP_NORMAL_KINDS = ("http_images", "http_generate", "http_stream")


def is_ok(status_label):
    """Whether a label is a success (its images and latency are counted)."""
    return status_label in ("OK", "HTTP 200")
FAULT_KINDS = ("fault_raise", "fault_oom")


class Ledger:
    """Requests opened and closed by kind. A request is opened when sent and closed once with
    the label of the status the client observed, its latency and its images."""

    def __init__(self):
        self._next = 0
        self.open = {}  # id -> kind
        self.sent = collections.Counter()  # kind -> requests
        self.images_sent = collections.Counter()  # kind -> images asked for
        self.closed = collections.Counter()  # (kind, label) -> requests
        self.images_ok = collections.Counter()  # kind -> images received in OK requests
        self.latency_ok = collections.defaultdict(list)  # kind -> seconds, OK requests
        self.examples = {}  # (kind, label) -> one status message

    def start(self, kind, images=0):
        if kind not in KINDS:
            raise KeyError(f"unknown request kind {kind!r}")
        self._next += 1
        self.open[self._next] = kind
        self.sent[kind] += 1
        self.images_sent[kind] += images
        return self._next

    def finish(self, request, status_label, latency_s=None, images=0, details=""):
        kind = self.open.pop(request)  # KeyError: closed twice, a bug in the soak itself
        self.closed[(kind, status_label)] += 1
        self.examples.setdefault((kind, status_label), (details or "")[:200])
        if is_ok(status_label):
            self.images_ok[kind] += images
            if latency_s is not None:
                self.latency_ok[kind].append(latency_s)

    def by_kind(self):
        """kind -> {label: count}."""
        out = collections.defaultdict(dict)
        for (kind, status_label), n in sorted(self.closed.items()):
            out[kind][status_label] = n
        return dict(out)


def check_ledger(ledger):
    """Failures: requests never closed (lost), statuses their kind does not allow."""
    failures = []
    lost = collections.Counter(ledger.open.values())
    for kind, n in sorted(lost.items()):
        failures.append(f"lost: {n} '{kind}' request(s) ended without a final status")
    for (kind, status_label), n in sorted(ledger.closed.items()):
        if status_label not in KINDS[kind][2]:
            example = ledger.examples.get((kind, status_label), "")
            failures.append(f"unexpected: {n} '{kind}' request(s) ended {status_label} "
                            f"(e.g. \"{example}\"); allowed: {sorted(KINDS[kind][2])}")
    return failures


def _code_of(status_label):
    """The code name the server counts a label under ("HTTP 429" -> RESOURCE_EXHAUSTED)."""
    code = status_label.split("(", 1)[0]
    if code.startswith("HTTP "):
        return HTTP_CODE_NAMES.get(code[5:], code)
    return code


def client_counts(ledger, model_of):
    """The client's side of the metrics comparison: (certain, counted, maybe) where
    certain[(model, method, code)] counts the EXACT kinds' requests by the code the client saw,
    and counted[(model, method)] / maybe[(model, method)] the COUNTED / MAYBE kinds' requests.
    `model_of(kind)` names the model a kind's requests go to."""
    certain = collections.Counter()
    counted = collections.Counter()
    maybe = collections.Counter()
    for (kind, status_label), n in ledger.closed.items():
        method, how, _ = KINDS[kind]
        if method is None:
            continue
        if how == EXACT:
            certain[(model_of(kind), method, _code_of(status_label))] += n
        else:
            (counted if how == COUNTED else maybe)[(model_of(kind), method)] += n
    return certain, counted, maybe


def check_metrics(client, server, exact_models=()):
    """Failures where the server's dmdserve_requests_total deltas (`server`: (model, method,
    code) -> count) disagree with the client's counts (`client`: client_counts()).

    Summed over models (the server files a refused request under the model it names, or
    "_unknown", or the resolved one, depending on where validation stopped it), for every method:
    each code's count lies between the client's certain count and that plus the method's COUNTED
    and MAYBE requests; the total lies between the certain and COUNTED requests and that plus
    the MAYBE ones. For each model of `exact_models`, which only EXACT kinds use, every
    (method, code) count matches exactly."""
    certain, counted, maybe = client

    def collapse(counter, width):
        out = collections.Counter()
        for key, n in counter.items():
            out[key[1:width]] += n
        return out

    failures = []
    c_codes, s_codes = collapse(certain, 3), collapse(server, 3)
    c_methods, s_methods = collapse(certain, 2), collapse(server, 2)
    counted_m, maybe_m = collapse(counted, 2), collapse(maybe, 2)
    for method, code in sorted(set(c_codes) | set(s_codes)):
        want, got = c_codes[(method, code)], s_codes[(method, code)]
        extra = counted_m[(method,)] + maybe_m[(method,)]
        if not want <= got <= want + extra:
            failures.append(f"metrics: {method} {code}: the server counted {got:g}, the client "
                            f"saw {want}" + (f" (+ up to {extra} that cancelled or timed out)"
                                             if extra else ""))
    for (method,) in sorted(set(c_methods) | set(s_methods) | set(counted_m)):
        low = c_methods[(method,)] + counted_m[(method,)]
        got, extra = s_methods[(method,)], maybe_m[(method,)]
        if not low <= got <= low + extra:
            failures.append(f"metrics: {method} in all: the server counted {got:g}, the client "
                            f"sent {low}" + (f" + up to {extra} it may not have received"
                                             if extra else ""))
    for model in exact_models:
        if any(m == model for (m, _) in list(counted) + list(maybe)):
            raise ValueError(f"model {model} has inexact kinds: it cannot be compared exactly")
        keys = {k for k in list(certain) + list(server) if k[0] == model}
        for key in sorted(keys):
            if certain.get(key, 0) != server.get(key, 0):
                failures.append(f"metrics: {'/'.join(key)}: the server counted "
                                f"{server.get(key, 0):g}, the client saw {certain.get(key, 0)}")
    return failures


def check_stall_isolation(http_s, grpc_s, factor=3.0, slack_s=1.0):
    """Failures unless the p99 of the normal HTTP requests' OK latencies (`http_s`, seconds) is at
    most max(`factor` x, `slack_s` + ) the gRPC ones' p99 (`grpc_s`) of the same run: stalled
    HTTP clients held open beside them must not delay them beyond what the shared queue does to
    gRPC's. (Both wait in the same queue, so their p99s are alike unless the HTTP path stalls;
    the bound leaves room for the client's own HTTP handling and for noise in the tail.)"""
    if not http_s or not grpc_s:
        return [f"stall isolation: no OK latencies to compare ({len(http_s)} HTTP, "
                f"{len(grpc_s)} gRPC)"]
    http_p99, grpc_p99 = percentile(http_s, 0.99), percentile(grpc_s, 0.99)
    bound = max(factor * grpc_p99, grpc_p99 + slack_s)
    if http_p99 <= bound:
        return []
    return [f"stall isolation: HTTP p99 {http_p99 * 1e3:.0f} ms over the bound {bound * 1e3:.0f} "
            f"ms (gRPC p99 {grpc_p99 * 1e3:.0f} ms)"]


def parse_requests_total(text):
    """(model, method, code) -> value of every dmdserve_requests_total sample of an exposition."""
    out = {}
    for m in re.finditer(r'^dmdserve_requests_total\{([^}]*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[(labels.get("model"), labels.get("method"), labels.get("code"))] = float(m.group(2))
    return out


def metric_sum(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for m in re.finditer(rf'^{name}(?:\{{([^}}]*)\}})? (\S+)$', text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(found.get(k) == str(v) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def delta(after, before):
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


# --- resources -------------------------------------------------------------------------------

def _median_in(samples, start, end, key):
    values = [s[key] for s in samples if start <= s["t"] <= end]
    return statistics.median(values) if values else None


def _slope_per_minute(samples, key):
    """Least-squares slope of `key` over time, per minute."""
    if len(samples) < 3:
        return 0.0
    ts = [s["t"] for s in samples]
    ys = [s[key] for s in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0


# Sampled resources (soak.Sampler) and their names in the report.
RESOURCES = (("rss_mib", "RSS MiB"), ("fds", "open fds"),
             ("fds_beyond_clients", "open fds beyond the client's connections"),
             ("threads", "threads"))


def growth_summary(samples, load_start, warm_end, load_end, window_s=10):
    """For each resource the samples hold (RESOURCES): value before the load, at steady state
    (median of the `window_s` after warm-up), at the end of the load (median of its last
    `window_s`), the maximum, and the slope per minute after warm-up. `samples`: dicts with t
    (seconds) and resources."""
    out = {}
    steady = [s for s in samples if warm_end <= s["t"] <= load_end]
    for key in (k for k, _ in RESOURCES if samples and k in samples[0]):
        before = [s[key] for s in samples if s["t"] <= load_start]
        out[key] = {
            "start": before[-1] if before else None,
            "steady": _median_in(samples, warm_end, warm_end + window_s, key),
            "end": _median_in(samples, load_end - window_s, load_end, key),
            "max": max((s[key] for s in samples), default=None),
            "slope_per_min": _slope_per_minute(steady, key),
        }
    return out


def check_growth(summary, limits):
    """Failures where a resource grew beyond `limits` (key -> largest growth, end minus steady)
    after warm-up."""
    failures = []
    for key, limit in limits.items():
        s = summary[key]
        if s["steady"] is None or s["end"] is None:
            failures.append(f"resources: no {key} samples after warm-up")
            continue
        grew = s["end"] - s["steady"]
        if grew > limit:
            failures.append(f"resources: {key} grew by {grew:.1f} after warm-up "
                            f"({s['steady']:.1f} -> {s['end']:.1f}); the limit is {limit}")
    return failures


def rss_by_minute(samples, load_start, load_end):
    """RSS (MiB) of the last sample at or before the load's start and each whole minute of it."""
    out = []
    mark = load_start
    while mark <= load_end + 1e-9:
        before = [s["rss_mib"] for s in samples if s["t"] <= mark]
        if before:
            out.append(before[-1])
        mark += 60
    return out


# --- report ----------------------------------------------------------------------------------

def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(x):
    return "-" if x is None else f"{x * 1e3:.1f}"


def _num(x):
    return "-" if x is None else f"{x:g}" if float(x).is_integer() else f"{x:.1f}"


def markdown(report):
    """The run's Markdown report (`report`: the dict soak.py writes as JSON)."""
    r = report
    lines = [f"soak: {r['minutes']} min of load at {r['load_factor']}x capacity on "
             f"{r['machine']}; commit {r['commit']}; {r['date']}", ""]
    lines += ["| load | value |", "|---|---|",
              f"| capacity (closed loop, {r['capacity']['concurrency']} clients, 1-image "
              f"requests) | {r['capacity']['images_per_second']:.0f} images/s |",
              f"| offered to the healthy model (open loop) | "
              f"{r['offered_images_per_second']:.0f} images/s in "
              f"{r['offered_requests_per_second']:.1f} requests/s (target "
              f"{r['target_images_per_second']:.0f}); 99% sent within "
              f"{_ms(r.get('launch_lag_p99_s'))} ms of schedule |",
              f"| served: images in OK responses, as the client counted them (the server's "
              f"dmdserve_images_generated_total) | {r['served_images_per_second']:.0f} images/s "
              f"({r['server_images_generated'] / (60 * r['minutes']):.0f}) |",
              f"| requests sent / lost | {r['requests_sent']} / {r['requests_lost']} |",
              f"| p99 of OK requests, gRPC (generate, stream) / HTTP (images, generate, stream), "
              f"with a median of {_num(r['hostile_http_held_median'])} hostile HTTP clients held "
              f"open | {_ms(r['p99_ok']['grpc'])} / {_ms(r['p99_ok']['http'])} ms |",
              f"| /metrics scrapes during load (all answered) | {r['scrapes']} |", ""]
    lines += ["| kind | sent | statuses | p50 ms | p99 ms (OK) |", "|---|---|---|---|---|"]
    by_kind = r["by_kind"]
    for kind in sorted(by_kind, key=lambda k: (k.startswith(BAD_PREFIX), k)):
        statuses = ", ".join(f"{s} {n}" for s, n in sorted(by_kind[kind].items()))
        lat = r["latency_ok"].get(kind, {})
        lines.append(f"| {kind} | {sum(by_kind[kind].values())} | {statuses} | "
                     f"{_ms(lat.get('p50'))} | {_ms(lat.get('p99'))} |")
    lines += ["", "| resource | before load | steady (after warm-up) | end of load | max | "
              "after warm-up, per min | after load |", "|---|---|---|---|---|---|---|"]
    for key, name in RESOURCES:
        if key not in r["resources"]:
            continue
        g = r["resources"][key]
        lines.append(f"| {name} | {_num(g['start'])} | {_num(g['steady'])} | {_num(g['end'])} "
                     f"| {_num(g['max'])} | {g['slope_per_min']:+.1f} | "
                     f"{_num(r['resources_after'].get(key))} |")
    by_minute = rss_by_minute(r["samples"], *r["load_window"])
    if by_minute:
        lines += ["", "RSS MiB at the start of the load and at the end of each of its minutes: "
                  + ", ".join(_num(x) for x in by_minute)]
    lines += ["", "| invariant | result |", "|---|---|"]
    for name, ok in r["checks"]:
        lines.append(f"| {name} | {'pass' if ok else '**FAIL**'} |")
    if r["failures"]:
        lines += ["", "Failures:"] + [f"- {f}" for f in r["failures"]]
    return "\n".join(lines)
