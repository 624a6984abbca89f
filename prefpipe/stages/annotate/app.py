"""The web side: a FastAPI app over a :class:`Session`, served by uvicorn on one socket.

    GET  /                      the labelling page (templates/annotate.html + static/annotate.js, .css)
    GET  /stats                 the live statistics page (re-rendered every few seconds)
    GET  /api/stats             the same as JSON, plus `image_reads` (row groups read from disk so far)
    GET  /api/next?user=NAME    the pair to show NAME now, and their progress
    POST /api/judge             {"user", "pair", "choice": left|right|tie|skip}: recorded and fsynced, then the next pair
    POST /api/undo              {"user"}: NAME's last judgment or skip taken back; that pair is shown next
    GET  /image/PAIR/SIDE       image SIDE (0 or 1) of pair PAIR (16 hex digits, one of the session's)

Input safety: a pair is named only by its id, checked against the session's pairs before anything is read
(an unknown id is 404, a malformed one 422; there are no paths in requests); annotator names are plain text
of at most 64 characters without control characters. Captions and names reach the page as text (the script
sets `textContent`; the stats template autoescapes). Every response forbids scripts, styles and images from
anywhere but this server (Content-Security-Policy), so the page works offline and injected markup could not run.
"""

from __future__ import annotations

import io
import socket
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, StringConstraints

from prefpipe.core.errors import PrefpipeError
from prefpipe.stages.annotate.items import ImageStore, Item
from prefpipe.stages.annotate.session import Refused, Session, UnknownPair, left_image, user_id_of
from prefpipe.stages.annotate.stats import session_stats
from prefpipe.stages.eval.pages import BROWSER_MIMES, fmt, pct

HERE = Path(__file__).resolve().parent
PAIR_PATTERN = r"^[0-9a-f]{16}$"
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64,
                                        pattern=r"^[^\x00-\x1f\x7f]+$")]
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class UserRequest(BaseModel):
    user: Name


class JudgeRequest(UserRequest):
    pair: Annotated[str, StringConstraints(pattern=PAIR_PATTERN)]
    choice: Literal["left", "right", "tie", "skip"]


@cache
def templates():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, pct=pct)
    return env


def create_app(session: Session, store: ImageStore, title: str) -> FastAPI:
    app = FastAPI(title="prefpipe annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def view(name: str, last: dict | None = None) -> dict:
        item = session.next_item(name)
        return {"user": name, "user_id": user_id_of(name), "pair": item and pair_view(name, item),
                "progress": session.progress(name), "last": last}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return templates().get_template("annotate.html").render(title=title, pairs=len(session.items))

    @app.get("/stats", response_class=HTMLResponse)
    def stats_page():
        return templates().get_template("stats.html").render(title=title, stats=session_stats(session))

    @app.get("/api/stats")
    def api_stats():
        return {**session_stats(session), "image_reads": store.reads}

    @app.get("/api/next")
    def next_pair(user: Annotated[Name, Query()]):
        return view(user)

    @app.post("/api/judge")
    def judge(body: JudgeRequest):
        try:
            event = session.judge(body.user, body.pair, body.choice)
        except UnknownPair:
            raise HTTPException(404, "no such pair") from None
        except Refused as e:
            return JSONResponse({"detail": str(e), **view(body.user)}, status_code=409)
        return view(body.user, {"pair": body.pair, "event": event["event"], "choice": body.choice})

    @app.post("/api/undo")
    def undo(body: UserRequest):
        try:
            event = session.undo(body.user)
        except Refused as e:
            return JSONResponse({"detail": str(e), **view(body.user)}, status_code=409)
        return view(body.user, {"pair": event["pair"], "event": "undo"})

    @app.get("/image/{pair_id}/{side}")
    def image(pair_id: Annotated[str, PathParam(pattern=PAIR_PATTERN)], side: Annotated[int, PathParam(ge=0, le=1)]):
        item = session.input.by_id.get(pair_id)
        if item is None:
            raise HTTPException(404, "no such pair")
        data = store.read(item.image(side))
        return Response(data, media_type=image_type(data), headers={"Cache-Control": "private, max-age=86400"})

    return app


def pair_view(name: str, item: Item) -> dict:
    """A pair as annotator `name` sees it: the caption, and the images on the left and on the right."""
    left = left_image(name, item.pair_id)
    return {"id": item.pair_id, "caption": item.caption, "left": f"/image/{item.pair_id}/{left}",
            "right": f"/image/{item.pair_id}/{1 - left}"}


def image_type(data: bytes) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only
            return BROWSER_MIMES.get(im.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        return "application/octet-stream"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or a PrefpipeError naming the option (port 0: a free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PrefpipeError(f"--host {host}: not an address of this machine ({e})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise PrefpipeError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another --port") from None
    sock.listen(64)
    return sock


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve until Ctrl-C or SIGTERM (uvicorn stops gracefully: requests in flight are answered first)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
