"""The web page for looking at token rewards: GET / and its static files (server/static/)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(str(files("tokenrm.server") / "static"))
# Everything the page loads is its own; the browser refuses anything else (a CDN, a frame).
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def add_page(app: FastAPI) -> None:
    """GET / (the page) and GET /static/<file>, public even with API keys: they hold no data,
    and the page sends the key the user types to POST /score from the browser.
    follow_symlink: an editable install links each file into the package from the checkout."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers=HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC, follow_symlink=True), name="static")
