"""The console's HTTP server: uvicorn in a thread of the node process, on ``node.http_bind``:``node.http_port``,
HTTPS with the node's DICOM TLS certificate and key when ``node.http_tls`` is set."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from dicom_node.console.app import ConsoleContext, create_app

__all__ = ["ConsoleServer", "ConsoleStartError"]

log = logging.getLogger(__name__)


class ConsoleStartError(RuntimeError):
    """The console cannot listen (port in use, address not local); the message names the setting and the reason."""


class ConsoleServer:
    def __init__(self, ctx: ConsoleContext) -> None:
        node = ctx.settings.node
        self.ctx = ctx
        self.scheme = "https" if node.http_tls else "http"
        # The socket is bound here, in the caller's thread: a port in use is an OSError for the caller to report.
        self._socket = socket.socket(socket.AF_INET6 if ":" in node.http_bind else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((node.http_bind, node.http_port))
        except OSError as exc:
            self._socket.close()
            raise ConsoleStartError(
                f"the web console cannot listen on node.http_bind:node.http_port {node.http_bind}:{node.http_port}: "
                f"{exc.strerror or exc}"
            ) from None
        self.port = int(self._socket.getsockname()[1])
        tls: dict[str, str] = {}
        if node.http_tls:
            from dicom_node.tls import server_context

            server_context(node)  # TLSConfigError names an unusable file now, not in the server's thread
        if node.http_tls and node.tls_cert_file is not None and node.tls_key_file is not None:
            tls = {"ssl_certfile": str(node.tls_cert_file), "ssl_keyfile": str(node.tls_key_file)}
        config = uvicorn.Config(
            create_app(ctx), log_config=None, access_log=False, server_header=False, lifespan="off",
            timeout_graceful_shutdown=3, **tls,  # type: ignore[arg-type]
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

    @property
    def url(self) -> str:
        host = self.ctx.settings.node.http_bind
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"{self.scheme}://{host}:{self.port}"

    def _run(self) -> None:
        self._server.run(sockets=[self._socket])

    def start(self, timeout: float = 10) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise ConsoleStartError(f"the web console did not start on port {self.port} (see the log)")
        log.info("web console on %s", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._socket.close()
