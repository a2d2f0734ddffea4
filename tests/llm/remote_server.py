"""A real OpenAI-compatible server on loopback for the remote engine's tests: llama.cpp's server
(llama-cpp-python[server]) on the SmolLM2 GGUF, and a fault-injecting reverse proxy in front.

The proxy forwards requests to the real server and records each request's body and headers;
its ``fault`` makes it misbehave the way servers do: slow (a delay before forwarding), a 429
or 500 status, a stream that turns into garbage or stops mid-answer, an HTML page instead of
an API, or vLLM's 404 for a model it does not serve.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

SERVED_MODEL = "smollm2"


def free_port() -> int:
    """A TCP port nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def llama_server(gguf: Path) -> Iterator[str]:
    """Run llama.cpp's OpenAI-compatible server on loopback; yield its /v1 URL."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "llama_cpp.server", "--model", str(gguf)),
        *("--model_alias", SERVED_MODEL, "--host", "127.0.0.1", "--port", str(port)),
        # By default a new request cuts the one streaming: wearers asking at once lose answers.
        *("--n_ctx", "2048", "--verbose", "false", "--interrupt_requests", "false"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("llama.cpp's server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:  # a request thread still decoding: no need to wait
            process.kill()
            process.wait()


class FaultProxy(ThreadingHTTPServer):
    """A reverse proxy to ``upstream`` (a /v1 URL) that records requests and injects faults."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.fault: str | None = None  # slow, 429, 500, garbage, cut, html, strict-model
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "body"}
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The proxy's /v1 URL."""
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read ``requests``."""

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._forward(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self._forward(json.loads(self.rfile.read(length)))

    def _forward(self, body: dict[str, Any] | None) -> None:
        proxy = self.server
        proxy.requests.append(
            {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
            }
        )
        fault = proxy.fault
        if fault == "html":
            return self._send(200, "text/html", b"<html><body><h1>It works!</h1></body></html>")
        if fault in ("429", "500"):
            error = {"error": {"message": f"injected {fault}", "type": "error", "code": fault}}
            return self._send(int(fault), "application/json", json.dumps(error).encode())
        if fault == "strict-model" and body is not None and body.get("model") != SERVED_MODEL:
            # vLLM's answer to a model it does not serve
            message = f"The model `{body.get('model')}` does not exist."
            error = {"error": {"message": message, "type": "NotFoundError", "code": 404}}
            return self._send(404, "application/json", json.dumps(error).encode())
        if fault == "slow":
            time.sleep(proxy.delay_s)
        path = self.path.removeprefix("/v1")
        method = "GET" if body is None else "POST"
        with httpx.stream(method, proxy.upstream + path, json=body, timeout=60) as reply:
            self.send_response(reply.status_code)
            self.send_header("Content-Type", reply.headers.get("content-type", "text/plain"))
            self.end_headers()  # no length: the body ends when the connection closes
            events = 0
            for line in reply.iter_lines():
                events += line.startswith("data:")
                if fault == "garbage" and events == 3:
                    self.wfile.write(b'data: {"choices": [{"delta": {"content": "x"\n\n')
                    return self.wfile.flush()
                if fault == "cut" and events == 3:
                    return self.wfile.flush()  # no finish_reason, no [DONE]
                self.wfile.write(line.encode() + b"\n")
                self.wfile.flush()
        return None
