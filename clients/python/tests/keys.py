"""API keys for the server-backed tests: a keys file in dmdserve's format (NAME SHA256HEX [RATE])
and the metric that counts each key's calls by status code."""

from harness import metric_value, wait_until, write_api_keys

#: name -> (secret, images per second or None). bob's burst (2 s of his rate) is 2 images, so
#: a 4-image request is never admitted; carol's is 4.
KEYS = {"alice": ("alice-secret", None), "bob": ("bob-secret", 1), "carol": ("carol-secret", 2)}


def write_keys_file(directory):
    """Writes the keys file of KEYS into `directory` and returns its path."""
    return write_api_keys(directory, KEYS)


def secret(name):
    return KEYS[name][0]


def key_calls(server, name, code, at_least=0):
    """dmdserve_api_key_requests_total{key=name,code=code}, once it has reached `at_least`
    (the server counts a call as it completes, which can trail the client's answer)."""
    def value():
        return metric_value(server.metrics(), "dmdserve_api_key_requests_total", key=name,
                            code=code) or 0
    wait_until(lambda: value() >= at_least, timeout_s=10)
    return value()
