"""Running the application: uvicorn in this process (one worker), or ``workers`` processes that each load the
model and batch on their own; the model's path and the settings reach them through the environment."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from typing import Any

from mlkd.errors import BadInput
from mlkd.utils.optional import optional_import

ENV = "MLKD_SERVE"  # JSON: what a worker process needs to build its application
logger = logging.getLogger(__name__)


def require_extra() -> None:
    """``MissingExtra`` naming the ``serve`` extra when any of its packages is not installed."""
    for module in ("fastapi", "uvicorn", "multipart", "prometheus_client"):
        optional_import(module, "serve", "mlkd serve")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) binds to this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(model: str, precision: str = "fp32", device: str = "cpu", calibration: str | None = None,
          **settings: Any) -> Any:
    """The application serving the model at ``model`` (a checkpoint or model folder)."""
    import mlkd
    from mlkd.serve.app import ServeSettings, create_app

    return create_app(mlkd.load(model, device=device, precision=precision, calibration=calibration),
                      ServeSettings(**settings))


def worker_app() -> Any:
    """The application of one worker process (uvicorn's factory when ``workers > 1``)."""
    return build(**json.loads(os.environ[ENV]))


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, precision: str = "fp32",
          device: str = "cpu", calibration: str | None = None, log_level: str = "info", **settings: Any) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM stop it cleanly: requests in flight are answered)."""
    import uvicorn

    require_extra()
    if not is_loopback(host):
        logger.warning("serving on %s: reachable from other machines, without authentication or TLS", host)
    _check_port(host, port)
    spec = dict(model=model, precision=precision, device=device, calibration=calibration, **settings)
    if workers == 1:
        app = build(**spec)  # load errors surface here, before the port is bound
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
        return
    build(**spec)  # check once here that the model loads, so a bad path is one clear error, not N
    os.environ[ENV] = json.dumps(spec)
    uvicorn.run("mlkd.serve.server:worker_app", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, timeout_graceful_shutdown=10)


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise BadInput(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port or --host") from None
