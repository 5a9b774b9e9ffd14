#!/usr/bin/env python
"""A reference reward server: serves one reward of this package over HTTP, for ``--reward URL``.

::

    python scripts/reward_server.py --reward jpeg-compressibility --port 8000
    rebel-diffusion train --reward http://127.0.0.1:8000/score ...

    python scripts/reward_server.py --reward aesthetic --device cuda:1 --host 0.0.0.0 --port 8000

The protocol is ``rebel_diffusion.rewards.http_reward``'s: ``POST /score`` with
``{"images": [base64 PNG, ...], "prompts": [...]}`` answers 200 ``{"scores": [...]}``; ``GET /score``
answers 200 ``{"reward": NAME}``. A request it cannot read answers 400 ``{"error": ...}``, a reward
that fails 500 ``{"error": ...}``, another path 404; non-finite scores are sent as ``null``.

Requests are handled on threads (``ThreadingHTTPServer``) and scored one at a time (a reward, a GPU
model especially, is not thread-safe). It listens on 127.0.0.1 unless ``--host`` says otherwise and
has no authentication: expose it only on a network you trust. Importable: ``make_server(reward,
port=0)`` gives a server on a free port for tests (``server.url``; run ``serve_forever`` on a thread).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from rebel_diffusion.errors import UsageError  # noqa: E402
from rebel_diffusion.rewards.base import short_cause  # noqa: E402
from rebel_diffusion.rewards.http_reward import decode_images, is_url  # noqa: E402

MAX_BODY = 512 * 2**20  # bytes: 64 images of 1024 x 1024 as base64 PNG fit several times over


class RewardServer(ThreadingHTTPServer):
    """An HTTP server scoring with ``reward`` at ``path``; ``quiet`` turns off the request log."""

    daemon_threads = True  # a handler stuck in a slow reward does not hold up shutdown

    def __init__(self, reward, host: str = "127.0.0.1", port: int = 8000, *, path="/score", quiet=False):
        super().__init__((host, port), RewardHandler)
        self.reward, self.score_path, self.quiet = reward, path, quiet
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):  # the client gave up (its timeout): one line
            if not self.quiet:
                print(f"client {client_address[0]} hung up before the answer", file=sys.stderr)
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{port}{self.score_path}"


class RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self._path_ok():
            self._reply(HTTPStatus.OK, {"reward": getattr(self.server.reward, "name", "reward")})

    def do_POST(self):
        if not self._path_ok():
            return
        # 1. Read and check the request: anything wrong is the client's (400).
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "send the body with a Content-Length"})
            return
        if int(length) > MAX_BODY:
            self.close_connection = True
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY} bytes"})
            return
        body = self.rfile.read(int(length))
        try:
            request = json.loads(body.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError('the body must be a JSON object {"images": [...], "prompts": [...]}')
            images = decode_images(request.get("images"))  # (B, 3, H, W) in [0, 1]
            prompts = request.get("prompts")
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError('"prompts" must be a list of strings')
            if len(prompts) != len(images):
                raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        except (UnicodeDecodeError, ValueError) as e:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": short_cause(e, limit=200)})
            return
        # 2. Score, one request at a time.
        try:
            with self.server.lock:
                scores = self.server.reward(images, prompts).float().cpu().tolist()
        except Exception as e:  # the reward's fault, reported to the client in one line
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": short_cause(e, limit=200)})
            return
        self._reply(HTTPStatus.OK, {"scores": [s if math.isfinite(s) else None for s in scores]})

    def _path_ok(self) -> bool:
        if urllib.parse.urlsplit(self.path).path == self.server.score_path:
            return True
        self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path; the reward is at {self.server.score_path}"})
        return False

    def _reply(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


def make_server(reward, host="127.0.0.1", port=8000, *, path="/score", quiet=False) -> RewardServer:
    """A server for ``reward`` (a reward object or a name for ``load_reward``); port 0: a free one."""
    if isinstance(reward, str):
        reward = load(reward)
    if not path.startswith("/"):
        raise UsageError(f"--path {path}: a URL path starts with /, e.g. /score")
    return RewardServer(reward, host, port, path=path, quiet=quiet)


def load(name: str, **options):
    """The reward to serve, weights loaded now (a missing file fails before the server starts)."""
    from rebel_diffusion.rewards import load_reward

    if is_url(name):
        raise UsageError(f"--reward {name}: serve a reward of this package, not another server's URL")
    return load_reward(name, **options).load()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve a reward over HTTP for rebel-diffusion's --reward URL.")
    p.add_argument("--reward", required=True, help="a built-in reward (e.g. jpeg-compressibility) or module:attr")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on, 0-65535 (0: a free one)")
    p.add_argument("--path", default="/score", help="URL path of the reward")
    p.add_argument("--device", default=None, help="device of the reward (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", help="model dtype: fp32, fp16 or bf16")
    p.add_argument("--clip-model", default=None, help="open_clip architecture (aesthetic, clip)")
    p.add_argument("--clip-pretrained", default=None, help="open_clip tag or weights file (aesthetic, clip)")
    p.add_argument("--aesthetic-head", default=None, help="local file of the LAION aesthetic head")
    p.add_argument("--pickscore-model", default=None, help="local PickScore folder (pickscore)")
    p.add_argument("--hpsv2-checkpoint", default=None, help="local HPS_v2.1_compressed.pt or its folder (hpsv2)")
    p.add_argument("--imagereward-checkpoint", default=None, help="local ImageReward.pt or its folder (imagereward)")
    p.add_argument("--quiet", action="store_true", help="no log line per request")
    return p.parse_args(argv)


def _port(text: str) -> int:
    """argparse type: a TCP port number (argparse turns the error into one line and exit 2)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 0-65535 (0: a free one)")
    return port


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        reward = load(
            args.reward,
            device=device,
            dtype=args.dtype,
            clip_model=args.clip_model,
            clip_pretrained=args.clip_pretrained,
            aesthetic_head=args.aesthetic_head,
            pickscore_model=args.pickscore_model,
            hpsv2_checkpoint=args.hpsv2_checkpoint,
            imagereward_checkpoint=args.imagereward_checkpoint,
        )
        server = make_server(reward, args.host, args.port, path=args.path, quiet=args.quiet)
    except UsageError as e:
        print(f"reward_server: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, or not ours to bind
        print(
            f"reward_server: error: cannot listen on {args.host}:{args.port} ({short_cause(e)})",
            file=sys.stderr,
        )
        return 1
    print(f"serving reward {args.reward} at {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
