"""A reward over HTTP: the reference server (scripts/reward_server.py) and the ``HttpReward`` client.

Every server here is real, on a free localhost port, on a thread of the test process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rebel_diffusion.errors import RunError, UsageError
from rebel_diffusion.rewards import HttpReward, Reward, load_reward
from rebel_diffusion.rewards.http_reward import TIMEOUT_ENV, decode_images, encode_images

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("reward_server", ROOT / "scripts" / "reward_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reward_server = load_script()


@contextlib.contextmanager
def serving(server):
    """Run ``server`` on a thread for the block; yields it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def reference_server(reward):
    with serving(reward_server.make_server(reward, "127.0.0.1", 0, quiet=True)) as server:
        yield server.url


@contextlib.contextmanager
def scripted_server(status=200, body=b"", content_type="application/json", delay=0.0):
    """A server answering every request with the same status and body; ``server.hits`` counts POSTs."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._answer(200, b"{}")

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.server.hits += 1
            time.sleep(delay)
            self._answer(status, body)

        def _answer(self, code, data):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(ConnectionError):  # the client may have timed out and gone
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hits = 0
    with serving(server):
        yield server, f"http://127.0.0.1:{server.server_port}/score"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def random_images(b: int = 4, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    """Noise (the hardest case for JPEG), some of it outside [0, 1].  # (B, 3, H, W)"""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 1.2 - 0.1


# ----------------------------------------------------------------------------------------------
# Round trip


def test_png_round_trip_is_the_uint8_image():
    x = random_images()
    decoded = decode_images(encode_images(x))
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    assert torch.equal(decoded, (x.clamp(0, 1) * 255).round() / 255)
    with pytest.raises(ValueError, match=r"images\[1\] is not a base64 PNG"):
        decode_images([encode_images(x[:1])[0], "bm90IGEgcG5n"])
    with pytest.raises(ValueError, match="several sizes"):
        decode_images(encode_images(x[:1]) + encode_images(random_images(1, 8, 8)))


def test_server_scores_equal_the_in_process_reward():
    local = load_reward("jpeg-compressibility")
    x, prompts = random_images(), ["a", "b", "c", "d"]
    with reference_server(load_reward("jpeg-compressibility")) as url:
        remote = load_reward(url, device="cpu")
        assert isinstance(remote, HttpReward) and remote.name == url
        remote.load()  # the start-up probe
        scores = remote(x, prompts)
        # JPEG rounds to uint8 first, as PNG does: the scores are identical, not merely close.
        assert scores.dtype == torch.float32 and scores.shape == (4,)
        assert torch.equal(scores, local(x, prompts))
        assert torch.equal(remote(x[:1], prompts[:1]), local(x[:1], prompts[:1]))


def test_the_trainer_loads_a_url_reward_unchanged():
    from rebel_diffusion.config import TrainConfig
    from rebel_diffusion.outputs.evaluate import load_rewards
    from rebel_diffusion.training.builders import load_reward_models

    with reference_server(load_reward("jpeg-incompressibility")) as url:
        cfg = TrainConfig(model="tiny", reward=url, preference="bradley-terry")
        cfg.validate()  # a URL is a reward name like any other
        reward, preference = load_reward_models(cfg, torch.device("cpu"), torch.float32)
        x = random_images(2)
        assert torch.equal(reward(x, ["p", "q"]), load_reward("jpeg-incompressibility")(x, ["p", "q"]))
        assert torch.equal(preference(x, x, ["p", "q"]), torch.full((2,), 0.5))
        assert set(load_rewards([url], device="cpu", dtype=torch.float32)) == {url}


# ----------------------------------------------------------------------------------------------
# Failures: one line each, naming the URL


def test_server_down_is_a_one_line_run_error():
    url = f"http://127.0.0.1:{free_port()}/score"
    reward = HttpReward(url, retries=2, backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(RunError) as e:
        reward.load()  # at start-up, before any sampling
    msg = one_line(e)
    assert url in msg and "not reachable" in msg and "3 attempts" in msg and "reward_server.py" in msg
    assert time.perf_counter() - t0 < 2
    with pytest.raises(RunError, match="not reachable"):
        load_reward(url, http_retries=0)(random_images(1), ["p"])


@pytest.mark.parametrize(
    "status, body, content_type, expected",
    [
        (200, b"<html>hello</html>", "text/html", "answered non-JSON (text/html: '<html>hello</html>')"),
        (200, b'{"score": [1, 2]}', "application/json", 'without a "scores" list'),
        (200, b'{"scores": [1.0, 2.0]}', "application/json", "returned 2 scores for 3 images"),
        (200, b'{"scores": [1.0, NaN, 2.0]}', "application/json", "non-finite scores for images [1] of 3"),
        (200, b'{"scores": [1.0, 2.0, null]}', "application/json", "non-finite scores for images [2] of 3"),
        (200, b'{"scores": [1.0, "x", 2.0]}', "application/json", "returned a str as score 1"),
        (404, b'{"error": "nothing here"}', "application/json", "HTTP 404 Not Found (nothing here)"),
        (400, b"bad prompts", "text/plain", "HTTP 400 Bad Request (bad prompts)"),
    ],
)
def test_bad_answers_are_one_line_run_errors(status, body, content_type, expected):
    with scripted_server(status, body, content_type) as (server, url):
        with pytest.raises(RunError) as e:
            HttpReward(url, retries=2, backoff=0.01)(random_images(3), ["a", "b", "c"])
        msg = one_line(e)
        assert url in msg and expected in msg
        assert server.hits == 1  # neither a bad answer nor a 4xx is retried


def test_server_errors_are_retried_then_reported():
    with scripted_server(500, b'{"error": "CUDA out of memory"}') as (server, url):
        with pytest.raises(RunError) as e:
            HttpReward(url, retries=2, backoff=0.01)(random_images(2), ["a", "b"])
        msg = one_line(e)
        assert "HTTP 500" in msg and "CUDA out of memory" in msg and "3 attempts" in msg and url in msg
        assert server.hits == 3


def test_a_failing_reward_answers_500_and_bad_requests_400():
    class Broken(Reward):
        name = "broken"

        def score(self, images, prompts):
            raise RuntimeError("the judge model crashed\nwith a long story")

    with reference_server(Broken()) as url:
        with pytest.raises(RunError) as e:
            HttpReward(url, retries=1, backoff=0.01)(random_images(2), ["a", "b"])
        assert "HTTP 500" in one_line(e) and "the judge model crashed" in str(e.value)

    import urllib.error
    import urllib.request

    with reference_server(load_reward("jpeg-compressibility")) as url:
        for payload, expected in [
            (b"not json", "JSONDecodeError"),
            (json.dumps({"images": ["aGk="], "prompts": ["a"]}).encode(), "images[0] is not a base64 PNG"),
            (
                json.dumps({"images": encode_images(random_images(2)), "prompts": ["a"]}).encode(),
                "2 images but 1",
            ),
        ]:
            request = urllib.request.Request(url, data=payload, method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(request, timeout=5)
            assert e.value.code == 400 and expected in json.loads(e.value.read())["error"]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url.replace("/score", "/other"), timeout=5)
        assert e.value.code == 404
        with urllib.request.urlopen(url, timeout=5) as answer:  # GET: the probe
            assert json.loads(answer.read()) == {"reward": "jpeg-compressibility"}


def test_timeouts_are_honoured(monkeypatch):
    with scripted_server(200, b'{"scores": [1.0]}', delay=1.0) as (server, url):
        t0 = time.perf_counter()
        with pytest.raises(RunError) as e:
            HttpReward(url, timeout=0.2, retries=3)(random_images(1), ["a"])
        elapsed = time.perf_counter() - t0
        msg = one_line(e)
        assert "did not answer within 0.2 s" in msg and TIMEOUT_ENV in msg and url in msg
        assert elapsed < 0.9 and server.hits == 1  # a timeout is not retried

        monkeypatch.setenv(TIMEOUT_ENV, "0.2")
        assert load_reward(url).timeout == 0.2
        assert load_reward(url, http_timeout=3).timeout == 3.0  # the option wins over the variable
        monkeypatch.setenv(TIMEOUT_ENV, "soon")
        with pytest.raises(UsageError, match=f"{TIMEOUT_ENV}=soon"):
            load_reward(url)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://", "not a reward server URL"),
        ("http://:8000/score", "not a reward server URL"),
        ("http://127.0.0.1:port/score", "bad port"),
        ("https://127.0.0.1:99999/score", "bad port"),
    ],
)
def test_bad_urls_are_usage_errors(url, expected):
    with pytest.raises(UsageError) as e:
        load_reward(url)
    assert expected in one_line(e)
    with pytest.raises(UsageError, match="takes no option 'clip_model'"):
        load_reward("http://127.0.0.1:9/score", clip_model="ViT-L-14")
    with pytest.raises(UsageError, match="timeout must be > 0"):
        load_reward("http://127.0.0.1:9/score", http_timeout=0)


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_server_script_refuses_a_bad_port_in_one_line(capsys, port):
    with pytest.raises(SystemExit) as e:
        reward_server.main(["--reward", "jpeg-compressibility", "--port", port])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--port" in err[-1] and "Traceback" not in "\n".join(err)


def test_server_script_refuses_bad_rewards(capsys):
    assert reward_server.main(["--reward", "beauty", "--port", "0"]) == 2
    assert "unknown reward 'beauty'" in capsys.readouterr().err
    assert reward_server.main(["--reward", "http://127.0.0.1:9/score", "--port", "0"]) == 2
    assert "not another server's URL" in capsys.readouterr().err
