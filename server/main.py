"""`tokenrm serve`: run the app under uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import logging

import uvicorn

from tokenrm.server.app import create_app, load_model
from tokenrm.server.settings import Settings

GRACE_S = 10.0  # in-flight requests get this long to finish on shutdown


def run(settings: Settings) -> None:
    """Load the model first, so that a bad checkpoint fails here with its reason, then serve."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, load_model(settings))
    config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level="info",
                            timeout_graceful_shutdown=int(GRACE_S), access_log=False)
    uvicorn.Server(config).run()
