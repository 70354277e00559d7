"""The HTTP client of served teachers: bounded requests, retries, and secrets kept out of every message.

- **A deadline per request.** ``timeout`` bounds the whole attempt -- connecting, sending and
  reading the reply to its last byte -- not each socket read: a watchdog shuts the socket down
  when the time is up, so a server that drips one byte a second is cut off like a silent one.
  A reply larger than the request's byte cap is refused (``ValueError``) without reading it all.
- **Retries.** Timeouts, refused or dropped connections, 408, 425, 429 and every 5xx are retried
  ``max_retries`` times with exponential backoff (``Retry-After`` honoured up to 60 s); then
  :class:`ServerError`.
- **Secrets.** The user-info of the URL (``http://user:password@host``) is sent as HTTP Basic
  auth (unless an API key is given) and appears nowhere else: :attr:`CompletionClient.base`, which every message and
  ``meta.json`` use, is the URL without it. The API key (``Authorization: Bearer``), the password
  and their encodings are replaced by ``<redacted>`` in any text that comes back from the server
  (:meth:`CompletionClient.redact`), before it is cut short or put in an error.

Plain ``http.client`` (standard library): ``requests`` has no whole-request deadline.
"""
from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote, unquote, urlsplit

DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_RETRIES = 5
MAX_TIMEOUT = 1e6            # seconds; beyond this a socket timeout overflows on some platforms
DEFAULT_MAX_BYTES = 16 << 20
REDACTED = "<redacted>"


class ServerError(ConnectionError):
    """The server could not be reached or kept failing after the retries."""


def retried(status: int) -> bool:
    """Whether a status is worth another try: throttling, timeouts and every server error."""
    return status in (408, 425, 429) or 500 <= status <= 599


def check_timeout(timeout: Any, name: str = "timeout") -> float:
    """``timeout`` as a float in (0, MAX_TIMEOUT]; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"{name}: expected seconds > 0 and at most {MAX_TIMEOUT:g} (a finite number), "
                         f"got {timeout!r}")
    return float(timeout)


def public_url(url: str) -> str:
    """``url`` without user-info (``user:password@``): what may be recorded or printed."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host).geturl()


@dataclass
class Reply:
    """One HTTP reply: status, lower-cased headers and the body's text with the secrets redacted."""

    status_code: int
    headers: dict = field(default_factory=dict)
    text: str = ""

    def json(self) -> Any:
        return json.loads(self.text)


class _Watchdog:
    """Shuts a connection's socket down at the deadline: any blocked connect, send or read returns."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float):
        self.conn, self.fired = conn, False
        self.timer = threading.Timer(max(seconds, 0.0), self.fire)
        self.timer.daemon = True
        self.timer.start()

    def fire(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self.timer.cancel()


class CompletionClient:
    """Requests to ``{server_url}/v1/...`` (module docstring); thread-safe (one connection per attempt).
    ``api_key`` goes in ``Authorization: Bearer``."""

    def __init__(self, server_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, backoff: float = 0.5):
        if not isinstance(server_url, str) or not server_url.startswith(("http://", "https://")):
            shown = public_url(server_url) if isinstance(server_url, str) else server_url
            raise ValueError(f"server_url: expected an http:// or https:// URL, got {shown!r}")
        parts = urlsplit(server_url)
        try:
            host, self.port = parts.hostname, parts.port
        except ValueError:
            raise ValueError(f"server_url: {public_url(server_url)!r} has an invalid port") from None
        if not host:
            raise ValueError(f"server_url: {public_url(server_url)!r} names no host")
        self.host: str = host
        self.https = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.base = public_url(server_url).rstrip("/").removesuffix("/v1")
        self.timeout, self.max_retries, self.backoff = check_timeout(timeout), int(max_retries), backoff
        self.api_key = api_key
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        secrets = [api_key] if api_key else []
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        if parts.username is not None or parts.password is not None:
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers.setdefault("Authorization", f"Basic {basic}")
            cred = password or user         # http://TOKEN@host: the user name is the credential
            secrets += [basic, f"{user}:{password}"] + ([cred, quote(cred, safe="")] if cred else [])
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)   # longest first

    def redact(self, text: str) -> str:
        """``text`` with every secret of this client replaced by ``<redacted>``."""
        for s in self.secrets:
            text = text.replace(s, REDACTED)
        return text

    def _attempt(self, method: str, path: str, body: bytes | None, max_bytes: int) -> Reply:
        """One request within ``timeout`` seconds, all of it; ``TimeoutError`` otherwise."""
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        dog = _Watchdog(conn, self.timeout)
        try:
            try:
                conn.request(method, self.prefix + path, body=body, headers=self.headers)
                r = conn.getresponse()
                length = r.getheader("Content-Length", "")
                if length.strip().isdigit() and int(length) > max_bytes:
                    raise ValueError(f"server_url: {self.base + path} sent a reply of {int(length)} bytes, more "
                                     f"than the {max_bytes} this request can need (a misbehaving server?)")
                chunks, n = [], 0
                while True:
                    chunk = r.read(1 << 16)
                    if not chunk:
                        break
                    n += len(chunk)
                    if n > max_bytes:
                        raise ValueError(f"server_url: {self.base + path} sent more than the {max_bytes} bytes "
                                         "this request can need (a misbehaving server?)")
                    chunks.append(chunk)
            except (OSError, http.client.HTTPException):
                if dog.fired:
                    raise TimeoutError(f"no complete reply within the timeout of {self.timeout:g} s") from None
                raise
            if dog.fired:
                raise TimeoutError(f"no complete reply within the timeout of {self.timeout:g} s")
        finally:
            dog.cancel()
            conn.close()
        text = self.redact(b"".join(chunks).decode("utf-8", "replace"))
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, text)

    def request(self, method: str, path: str, payload: dict | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                final: Callable[[Reply], bool] | None = None) -> Reply:
        """The reply (any status but the retried ones, or one that ``final`` accepts as is), after at
        most ``max_retries`` retries; :class:`ServerError` after the last."""
        body = None if payload is None else json.dumps(payload).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = min(self.backoff * 2 ** attempt, 30.0)
            try:
                r = self._attempt(method, path, body, max_bytes)
                if not retried(r.status_code) or (final is not None and final(r)):
                    return r
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                retry_after = r.headers.get("retry-after", "")
                if retry_after.strip().isdigit():
                    wait = min(max(wait, float(retry_after)), 60.0)
            except (OSError, http.client.HTTPException) as e:    # TimeoutError and ConnectionError are OSErrors
                last = self.redact(f"{type(e).__name__}: {e}")
            if attempt < self.max_retries:
                time.sleep(wait)
        raise ServerError(f"server_url: {self.base + path} failed {self.max_retries + 1} times (last: {last})")

    def refused(self, r: Reply, what: str) -> ValueError:
        """A clear error for a request the server refused (4xx)."""
        try:
            detail = r.json()
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except ValueError:
            detail = r.text
        detail = self.redact(str(detail))[:300]
        if r.status_code in (401, 403):
            hint = ("the API key was not accepted" if self.api_key else
                    "it needs an API key (pass the name of an environment variable that holds it)")
            return ValueError(f"api_key: {self.base} refused {what} (HTTP {r.status_code}: {detail}): {hint}")
        if r.status_code == 404:
            return ValueError(f"server_url: {self.base + '/v1/completions'} answered 404 ({detail}): is it an "
                              "OpenAI-compatible server, and the URL its base (http://host:port)?")
        return ValueError(f"server_url: {self.base} refused {what} (HTTP {r.status_code}: {detail})")

    def model_names(self) -> list[str] | None:
        """The ids ``/v1/models`` lists, or None where the server has no such route."""
        r = self.request("GET", "/v1/models")
        if r.status_code in (401, 403):
            raise self.refused(r, "the model list")
        if r.status_code != 200:
            return None
        try:
            return [str(m["id"]) for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return None


def reply_cap(prompt_tokens: int, k: int) -> int:
    """The most bytes a completions reply with echoed prompt log-probs can need: 1 MiB plus 1 KiB per
    top-k entry (a JSON string and a number each; generous for long token texts)."""
    return (1 << 20) + 1024 * (prompt_tokens + 2) * (k + 2)


def redacted_error(e: BaseException, client: CompletionClient) -> BaseException | None:
    """A copy of ``e`` (ValueError/ServerError) with the client's secrets redacted, or None if it has none."""
    msg = str(e)
    clean = client.redact(msg)
    if clean == msg or not isinstance(e, (ValueError, ServerError)):
        return None
    return type(e)(clean)


__all__ = ["ServerError", "CompletionClient", "Reply", "retried", "check_timeout", "public_url", "reply_cap",
           "redacted_error", "DEFAULT_TIMEOUT", "DEFAULT_MAX_RETRIES", "MAX_TIMEOUT"]
