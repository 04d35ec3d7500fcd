"""An app served from a background thread of this process: for tests, benchmarks and notebooks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator


@contextlib.contextmanager
def serve_in_background(app, host: str = '127.0.0.1', port: int = 0, start_timeout: float = 60) -> Iterator[str]:
    """Runs `app` under uvicorn in a daemon thread on `host:port` (0: a free port). Yields the base
    URL once the server accepts connections; stops it (and the app's engine) on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level='warning'))
    thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, name='uvicorn', daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError('the server did not start')
        time.sleep(0.02)
    try:
        yield f'http://{host}:{sock.getsockname()[1]}'
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
