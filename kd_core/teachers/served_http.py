"""The HTTP client of a teacher served by another process (`teacher.model.endpoint`): JSON POSTs to its
OpenAI-compatible API with the API key from the environment variable `auth_env`, retries with exponential backoff
(urllib3's `Retry`: 429, 5xx, refused or reset connections and timeouts; Retry-After honoured), at most
`max_concurrent` requests in flight and `requests_per_s` started per second. Failures are one line naming the URL,
never the key: :class:`~kd_core.errors.EndpointUnreachable` (retryable by the flow: no answer, 429, 5xx, after the
retries here) or :class:`~kd_core.errors.EndpointError` (an answer not as asked). No torch here."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import urllib3
from urllib3.util.retry import Retry

from kd_core.errors import EndpointError, EndpointUnreachable, UserError

if TYPE_CHECKING:
    from kd_core.config.endpoint import EndpointConfig

__all__ = ["EndpointClient", "RateLimit", "api_url", "shown"]

RETRY_STATUS = (429, 500, 502, 503, 504)


def api_url(base: str, route: str) -> str:
    """`<base>/v1/<route>` (a base already ending in /v1 gets `/<route>`)."""
    base = base.rstrip("/")
    return f"{base}/{route}" if base.endswith("/v1") else f"{base}/v1/{route}"


def shown(url: str) -> str:
    """The URL as messages show it: no user:password, no query."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


class RateLimit:
    """At most `per_s` starts per second: each :meth:`wait` returns at the earliest 1 / per_s after the previous
    one's slot (slots are handed out in call order, across threads). None: no limit."""

    def __init__(self, per_s: float | None, clock=time.monotonic, sleep=time.sleep):
        self.interval = 1.0 / per_s if per_s else 0.0
        self.clock, self.sleep = clock, sleep
        self.next = -float("inf")
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = self.clock()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            self.sleep(start - now)


class EndpointClient:
    """POSTs JSON to routes of one endpoint (`/v1/completions`, `/v1/chat/completions`), with its key, retries,
    concurrency and rate limit (the module's docstring)."""

    def __init__(self, endpoint: EndpointConfig):
        self.endpoint = endpoint
        self.limit = RateLimit(endpoint.requests_per_s)
        retry = Retry(total=endpoint.retries, connect=endpoint.retries, read=endpoint.retries,
                      status=endpoint.retries, other=0, allowed_methods=None, status_forcelist=RETRY_STATUS,
                      backoff_factor=endpoint.backoff_s, respect_retry_after_header=True, raise_on_status=False,
                      raise_on_redirect=False)
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=endpoint.max_concurrent, retries=retry,
                                        timeout=urllib3.Timeout(total=endpoint.timeout_s))

    def _api_key(self, url: str) -> str | None:
        env = self.endpoint.auth_env
        if env is None:
            return None
        if not os.environ.get(env):
            raise UserError(f"teacher.model.endpoint.auth_env: environment variable {env} is not set (it holds "
                            f"the API key of {shown(url)})")
        return os.environ[env]

    def fail(self, cls: type[Exception], url: str, what: str, key: str | None = None) -> Exception:
        """An error of class `cls`, one line naming the URL, the key (if it appears) replaced by ***."""
        text = " ".join(str(what).split())
        return cls(f"teacher endpoint {shown(url)}: {text.replace(key, '***') if key else text}")

    def post(self, url: str, body: dict) -> dict:
        """The JSON answer to one POST of `body` to `url`, retried as configured."""
        key = self._api_key(url)
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        self.limit.wait()
        try:
            response = self.pool.request("POST", url, body=json.dumps(body).encode(), headers=headers)
        except urllib3.exceptions.MaxRetryError as err:  # refused, reset, unknown host, timed out: retries spent
            reason = err.reason or err
            raise self.fail(EndpointUnreachable, url, f"not reachable after {self.endpoint.retries} retries "
                            f"({type(reason).__name__}: {reason})", key) from None
        except urllib3.exceptions.HTTPError as err:
            raise self.fail(EndpointUnreachable, url, f"not reachable ({type(err).__name__}: {err})", key) from None
        if response.status >= 400:
            detail = response.data[:300].decode("utf-8", "replace")
            cls = EndpointUnreachable if response.status in RETRY_STATUS or response.status >= 500 else EndpointError
            retried = f" after {self.endpoint.retries} retries" if cls is EndpointUnreachable else ""
            raise self.fail(cls, url, f"HTTP {response.status} {response.reason}{retried}: {detail}", key)
        try:
            return json.loads(response.data)
        except ValueError:
            raise self.fail(EndpointError, url, "the response is not JSON", key) from None

    def post_all(self, url: str, bodies: list[dict]) -> list[dict]:
        """The answers to `bodies`, in their order, at most `max_concurrent` requests in flight."""
        if len(bodies) <= 1 or self.endpoint.max_concurrent == 1:
            return [self.post(url, body) for body in bodies]
        with ThreadPoolExecutor(max_workers=min(self.endpoint.max_concurrent, len(bodies))) as pool:
            return list(pool.map(lambda body: self.post(url, body), bodies))
