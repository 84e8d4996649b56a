"""The gateway app running: uvicorn in a thread of the calling process.

`overnight serve` runs it next to the vLLM server it started, the demo next to its own, and the
integration tests around a real server: each needs the gateway up before it goes on, stopped
cleanly on the way out (the capture queue flushed), and a one-line error when the port is taken,
not uvicorn's traceback after a minute of starting vLLM. A thread rather than a child process so
that `Gateway.in_flight` and the route table are this process's, and Ctrl-C needs no forwarding;
uvicorn installs no signal handlers off the main thread, so the caller keeps its own.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from storage.errors import UserError

__all__ = ["GatewayServer", "check_port_free"]

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 20  # how long a stop waits for requests in flight


def check_port_free(host: str, port: int, *, what: str = "gateway.port") -> None:
    """Raise a one-line `UserError` when nothing could listen on host:port (taken, or a bad host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            why = "already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
            raise UserError(f"{what}: cannot listen on {host}:{port}: {why}") from None


class GatewayServer:
    """`with GatewayServer(app, host, port) as gateway:` serves `app` until the block ends."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.host = host
        self.port = port
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,  # the process's own logging (the CLI's `-v`), not uvicorn's
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=STOP_GRACE_SECONDS,  # then streams still open are cut
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_seconds: float = 60.0) -> GatewayServer:
        """Serve in a thread; returns once the gateway accepts connections (routes read, pool checked)."""
        check_port_free(self.host, self.port)
        self._thread = threading.Thread(target=self._server.run, name="overnight-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_seconds
        while not self._server.started:
            if not self._thread.is_alive():
                raise UserError(f"the gateway on {self.base_url} failed to start (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"the gateway on {self.base_url} did not start within {timeout_seconds:.0f}s")
            time.sleep(0.05)
        logger.info("gateway listening on %s", self.base_url)
        return self

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_seconds: float = STOP_GRACE_SECONDS + 10.0) -> None:
        """Stop accepting, let requests in flight finish, flush the capture queue (the app's lifespan)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._server.should_exit = True
        thread.join(timeout_seconds)
        if thread.is_alive():
            self._server.force_exit = True
            thread.join(5.0)

    def __enter__(self) -> GatewayServer:
        return self.start() if self._thread is None else self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()
