"""A reward served over HTTP: ``--reward http://HOST:PORT/PATH`` (or ``https://``) gives an ``HttpReward``.

The reward runs in another process or on another machine (its own environment, its own GPU); the
trainer POSTs each batch and reads the scores back. ``scripts/reward_server.py`` is a reference
server for any reward this package can load.

Protocol (JSON over HTTP/1.1, UTF-8):

- ``POST URL`` with ``Content-Type: application/json`` and the body::

      {"images": ["<base64 PNG>", ...], "prompts": ["a photo of a cat", ...]}

  ``images``: B strings, each the standard base64 (RFC 4648, padded) of a PNG file: 8-bit RGB, all
  of one size H x W, pixel = round(255 x) of the image x in [0, 1] (the rounding of saving it).
  ``prompts``: B strings, ``prompts[i]`` the prompt of ``images[i]``.
- Success: status 200, ``Content-Type: application/json``, the body ``{"scores": [s_0, ...]}``: B
  finite numbers in the order of the images (larger is better). Other keys are ignored.
- Failure: any other status. The body may be ``{"error": "one line"}``, which the client quotes.
  5xx means a fault of the server (or busy, 503) and is retried; 4xx means a bad request and is not.
- ``GET URL``: any HTTP answer says the server is up (the reference server answers 200
  ``{"reward": NAME}``). The client sends it once, from ``load()``, so that a server that is down
  fails the run at start-up rather than after the first sampling round.

Client behaviour: a timeout per socket operation (connect, send, each read) of
``DEFAULT_TIMEOUT`` seconds, set by the ``http_timeout`` option or the ``REBEL_REWARD_TIMEOUT``
environment variable; ``DEFAULT_RETRIES`` retries on connection errors and 5xx answers, after
0.5 s, 1 s, 2 s, ...; a timeout is not retried (the server may still be working on the batch). A
bad URL is a ``UsageError``; a server that is down, times out, or answers an error, non-JSON, the
wrong number of scores or non-finite scores is a ``RunError``: one line naming the URL.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import torch
from PIL import Image

from ..errors import RunError, UsageError
from .base import Reward, RewardContext, short_cause
from .jpeg import to_uint8

DEFAULT_TIMEOUT = 60.0  # seconds per socket operation: a large model on a batch of 32 takes a few
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5  # seconds before the first retry, doubled for each further one
TIMEOUT_ENV = "REBEL_REWARD_TIMEOUT"
URL_SCHEMES = ("http://", "https://")
PNG_COMPRESS_LEVEL = 1  # lossless at any level; 1 encodes several times faster than the default 6


def is_url(name: str) -> bool:
    return isinstance(name, str) and name.lower().startswith(URL_SCHEMES)


def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host; ``UsageError`` (one line) otherwise."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port  # raises on a port that is not a number in 0-65535
    except ValueError as e:
        raise UsageError(f"--reward {url}: bad port ({e}); write it as http://HOST:PORT/PATH") from e
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or port == 0:
        raise UsageError(f"--reward {url}: not a reward server URL; write it as http://HOST:PORT/PATH")
    return url


# ----------------------------------------------------------------------------------------------
# Images as base64 PNG (used by both ends)


def encode_images(images: torch.Tensor) -> list[str]:
    """Base64 PNGs of a batch, rounded to uint8 as saving would.  # (B, 3, H, W) in [0, 1] -> B strings"""
    out = []
    for array in to_uint8(images):  # (H, W, 3) uint8
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_images(encoded) -> torch.Tensor:
    """The batch of a request's ``images``.  # B base64 PNG strings -> (B, 3, H, W) float32 in [0, 1]

    Raises ``ValueError`` (one line) for anything that is not a list of base64 PNGs of one size.
    """
    if not isinstance(encoded, list) or not encoded or not all(isinstance(s, str) for s in encoded):
        raise ValueError('"images" must be a non-empty list of base64 PNG strings')
    arrays = []
    for i, text in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
                arrays.append(np.asarray(im.convert("RGB")))  # (H, W, 3) uint8
        except (binascii.Error, OSError, ValueError) as e:  # not base64, not an image
            raise ValueError(f"images[{i}] is not a base64 PNG ({short_cause(e)})") from e
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"images of several sizes {sizes[:4]}: send one size per request")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    return x.float() / 255.0


# ----------------------------------------------------------------------------------------------
# Client


def timeout_from_env(default: float = DEFAULT_TIMEOUT) -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{TIMEOUT_ENV}={text}: give the reward server's timeout in seconds, > 0")
    return value


class HttpReward(Reward):
    """Scores from a reward server (module docstring).  # (B, 3, H, W) in [0, 1] -> (B,)

    ``timeout``: seconds per socket operation (None: ``REBEL_REWARD_TIMEOUT`` or ``DEFAULT_TIMEOUT``);
    ``retries``: further attempts after a connection error or a 5xx answer, ``backoff`` seconds
    apart, doubled each time. ``device``/``dtype`` only say where the scores go (the images are
    sent from the CPU).
    """

    def __init__(
        self,
        url: str,
        device: RewardContext | str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ):
        super().__init__(device, dtype)
        self.url = check_url(url)
        self.name = url
        self.units = "the reward server's scores"
        self.timeout = float(timeout) if timeout is not None else timeout_from_env()
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise UsageError(f"reward server {url}: timeout must be > 0 seconds, got {timeout}")
        if not (isinstance(retries, int) and retries >= 0):
            raise UsageError(f"reward server {url}: retries must be an integer >= 0, got {retries}")
        self.retries, self.backoff = retries, float(backoff)

    def _load(self) -> None:
        self._send("GET", None)  # any HTTP answer will do: the server is up

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        body = json.dumps({"images": encode_images(images), "prompts": prompts}).encode("utf-8")
        content_type, data = self._send("POST", body)
        return parse_scores(data, content_type, len(prompts), self.url)

    def _send(self, method: str, body: bytes | None) -> tuple[str, bytes]:
        """(content type, body) of a 2xx answer; retries, then ``RunError`` (one line)."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            request = urllib.request.Request(
                self.url,
                data=body,
                method=method,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.headers.get_content_type(), response.read()
            except urllib.error.HTTPError as e:  # an answer, with a status that is not 2xx
                if method == "GET":
                    return "", b""  # the probe only asks whether anything answers
                if e.code < 500 or last:
                    raise RunError(self._status_error(e, attempt + 1)) from e
            except TimeoutError as e:  # while waiting for the answer
                raise RunError(self._timeout_error()) from e
            except urllib.error.URLError as e:  # no connection: refused, unknown host, TLS
                if isinstance(e.reason, TimeoutError):
                    raise RunError(self._timeout_error()) from e
                if last:
                    raise RunError(self._connect_error(e.reason, attempts)) from e
            except (OSError, http.client.HTTPException) as e:  # reset, closed without an answer
                if last:
                    raise RunError(self._connect_error(e, attempts)) from e
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _connect_error(self, cause, attempts: int) -> str:
        cause = short_cause(cause) if isinstance(cause, BaseException) else str(cause)
        return (
            f"reward server {self.url} is not reachable ({cause}; {_times(attempts)}): "
            "start it (e.g. python scripts/reward_server.py) or check the URL"
        )

    def _timeout_error(self) -> str:
        return (
            f"reward server {self.url} did not answer within {self.timeout:g} s: a slow reward needs a "
            f"longer timeout ({TIMEOUT_ENV}=SECONDS)"
        )

    def _status_error(self, e: urllib.error.HTTPError, attempts: int) -> str:
        detail = _error_text(e)
        hint = "check the URL's path" if e.code == 404 else "see the server's log"
        tried = f"; {_times(attempts)}" if e.code >= 500 else ""
        return f"reward server {self.url} answered HTTP {e.code} {e.reason}{detail}{tried}: {hint}"


def parse_scores(data: bytes, content_type: str, batch_size: int, url: str) -> torch.Tensor:
    """The scores of a 2xx answer, checked.  # body bytes -> (B,) float32; ``RunError`` otherwise"""
    try:
        answer = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        text = data[:60].decode("utf-8", "replace").strip()
        snippet = text.splitlines()[0] if text else ""
        raise RunError(
            f"reward server {url} answered non-JSON ({content_type or 'no content type'}: {snippet!r}); "
            'it must answer {"scores": [...]}'
        ) from None
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list):
        raise RunError(
            f'reward server {url} answered JSON without a "scores" list: it must answer {{"scores": [...]}}'
        )
    if len(scores) != batch_size:
        raise RunError(f"reward server {url} returned {len(scores)} scores for {batch_size} images")
    bad_type = [
        i for i, s in enumerate(scores) if s is not None and (isinstance(s, bool) or not isinstance(s, int | float))
    ]
    if bad_type:
        i = bad_type[0]
        raise RunError(f"reward server {url} returned a {type(scores[i]).__name__} as score {i}: scores are numbers")
    values = [_as_float(s) for s in scores]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RunError(
            f"reward server {url} returned non-finite scores for images {bad[:8]} of {batch_size}: "
            "every score must be a finite number"
        )
    return torch.tensor(values, dtype=torch.float32)


def _as_float(score: float | int | None) -> float:
    try:
        return float("nan") if score is None else float(score)
    except OverflowError:  # an integer of hundreds of digits
        return float("inf")


def _error_text(e: urllib.error.HTTPError) -> str:
    """``' (the server's error)'`` from a JSON ``{"error": ...}`` or plain-text body, or ``''``."""
    try:
        data = e.read()[:2000]
    except OSError:
        return ""
    try:
        answer = json.loads(data.decode("utf-8"))
        text = str(answer.get("error", "")) if isinstance(answer, dict) else ""
    except (UnicodeDecodeError, ValueError):
        text = data.decode("utf-8", "replace") if e.headers.get_content_type() == "text/plain" else ""
    text = text.strip().splitlines()[0][:160] if text.strip() else ""
    return f" ({text})" if text else ""


def _times(attempts: int) -> str:
    return "1 attempt" if attempts == 1 else f"{attempts} attempts"
