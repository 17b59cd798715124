"""`cifar-pipeline app`: the HTTP prediction API and the web page (drag-and-drop, webcam, registry).

Routes:
- `GET /`: the page (`flows/app_page.html`, one self-contained file: no build step, nothing from the internet);
- `POST /api/predict`: images in the multipart field `file` (repeated) -> one JSON object per image
  with the prediction CSV's columns (`flows/live.py`);
- `GET /api/models`: the registry (names, versions, aliases, test accuracy) and what is served;
- `GET /api/models/{name}/v{version}/plots/{file}`: a version's report plots, checksums verified;
- `GET /api/health`: the served version, and why it could not follow its reference, if so.

Every `/api/` call needs the token when the app has one (`Authorization: Bearer <token>`, or
`?token=` for an `<img>`); the CLI refuses to listen beyond loopback without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from flows.live import (
    MAX_FILES,
    Batcher,
    LiveModel,
    ModelChanged,
    decode_upload,
    prediction_rows,
)
from model_lib.config import MAX_MEGAPIXELS, MAX_UPLOAD_MB, RELOAD_SECONDS, TOP_K
from model_lib.fileio import read_json
from model_lib.progress import Stopped, check_stop
from model_lib.registry import Registry
from model_lib.report import PLOTS
from model_lib.requests import DEFAULT_MODEL
from model_lib.settings import REGISTRY_FOLDER
from model_lib.stores import StoreError, open_store
from model_lib.versions import MANIFEST_FILE, RegistryError, verify_version

PAGE = Path(__file__).with_name("app_page.html")
LOG = logging.getLogger("cifar_pipeline.app")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class AppSettings:
    """What `cifar-pipeline app` was asked to serve, and its limits."""

    model: str = DEFAULT_MODEL
    artifacts_root: str = "artifacts"
    token: str | None = None  # required on every /api/ call when set
    max_upload_mb: float = MAX_UPLOAD_MB  # MB per request body
    max_megapixels: float = MAX_MEGAPIXELS  # per image
    reload_seconds: float = RELOAD_SECONDS  # how often the reference is resolved again
    engine: str = "auto"
    # Host header names answered, beside the loopback names; ("*",) answers any (a wildcard listen with a token).
    allowed_hosts: tuple[str, ...] = ()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def host_name(header: str) -> str:
    """The name in a Host header, without its port or an IPv6 address's brackets ("" when malformed)."""
    try:
        return (urlsplit(f"//{header}").hostname or "").lower()
    except ValueError:
        return ""


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn, bound before the model loads, so a port in use is known at once.

    Made with the protocol named: asyncio disables Nagle's algorithm only on sockets whose `proto` says TCP,
    and without that every answer on a kept-alive connection waited ~40 ms for the client's delayed ACK.
    """
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(2048)
    except OSError:
        listener.close()
        raise
    return listener


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware in front of every route: the token on `/api/` calls (401 without it), and a request
    body over `limit` bytes refused with 413 before it is read (Content-Length) or as soon as it passes
    the limit (a chunked upload)."""

    def __init__(self, app, limit: int, token: str | None, hosts: tuple[str, ...] = ()):
        self.app, self.limit, self.token = app, limit, token
        # A web page the user visits can point a name of its own at 127.0.0.1 (DNS rebinding) and read a
        # token-less loopback app: its requests carry that name in Host, so only the names served are answered.
        self.hosts = None if "*" in hosts else frozenset(host_name(h) or h for h in (*LOOPBACK, *hosts))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self._served(host_name(host)):
            detail = (f"Host {host!r} is not a name this app serves ({', '.join(sorted(self.hosts))}); start it "
                      "with --allowed-hosts to add one")  # fmt: skip
            return await self._answer(send, 400, detail)
        # A page elsewhere can make the browser send a form here (no preflight for multipart): whatever changes or
        # costs something takes requests from the app's own page only.
        origin = headers.get(b"origin", b"").decode("latin-1")
        if scope["method"] not in SAFE_METHODS and origin and origin != "null":
            origin_host = host_name(urlsplit(origin).netloc) if "://" in origin else ""
            if origin_host != host_name(host) and not (self.hosts is not None and self._served(origin_host)):
                detail = f"requests from the page at {origin} are refused: only this app's own page may send them"
                return await self._answer(send, 403, detail)
        if self.token and scope["path"].startswith("/api/") and not self._authorised(scope, headers):
            detail = "missing or wrong token: send the header 'Authorization: Bearer <token>'"
            return await self._answer(send, 401, detail, {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await self._too_large(send, int(length))
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched_send)
        except BodyTooLarge:
            if not started:
                await self._too_large(send, received)

    def _served(self, name: str) -> bool:
        return self.hosts is None or name in self.hosts or is_loopback(name)

    def _authorised(self, scope, headers: dict) -> bool:
        header = headers.get(b"authorization", b"").decode("latin-1")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not given:  # an <img> cannot send a header: ?token= in the query
            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _too_large(self, send, size: int) -> None:
        detail = f"upload of {size / 1e6:.1f} MB is over the limit of {self.limit / 1e6:g} MB per request"
        await self._answer(send, 413, detail)

    @staticmethod
    async def _answer(send, status: int, detail: str, headers: dict | None = None) -> None:
        await JSONResponse({"detail": detail}, status_code=status, headers=headers)({"type": "http"}, None, send)


def create_app(settings: AppSettings, live: LiveModel | None = None) -> FastAPI:
    """The app for `settings`; `live` is the already loaded model (loaded here when not given).

    Raises:
        RegistryError: The model reference does not resolve or its checksums fail (before serving).
    """
    live = live or LiveModel(settings.model, settings.artifacts_root, settings.engine)
    # Starlette spools an uploaded file to a temporary file past 1 MB; uploads stay in memory here, and the
    # body limit bounds that memory.
    MultiPartParser.spool_max_size = settings.max_upload_bytes + 1

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        stop = threading.Event()
        live.follow(stop, settings.reload_seconds)
        yield
        stop.set()
        app.state.batcher.close()

    # No Swagger page: FastAPI's loads its scripts from a CDN, and nothing here comes from the internet.
    app = FastAPI(title="cifar-pipeline", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")  # fmt: skip
    app.state.live, app.state.batcher = live, Batcher(lambda: live.served)
    app.add_middleware(Guard, limit=settings.max_upload_bytes, token=settings.token, hosts=settings.allowed_hosts)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/api/health")
    async def health() -> dict:
        info = live.served.info
        return {"status": "ok", "model": info.reference, "version": info.version, "file": info.model_file,
                "notes": list(info.notes), "problem": live.problem or None, "batches": app.state.batcher.batches,
                "images": app.state.batcher.images}  # fmt: skip

    @app.post("/api/predict")
    async def predict(request: Request, top_k: int = TOP_K) -> dict:
        """Classify the images in the multipart field `file` (repeat it for several)."""
        classes = len(live.served.info.class_names)
        if not 1 <= top_k <= classes:
            raise HTTPException(422, f"top_k must be from 1 to the model's {classes} classes, not {top_k}")
        try:
            form = await request.form(max_files=MAX_FILES, max_fields=8)
        except ClientDisconnect:  # a closed tab or a flaky network: nobody is left to answer, nothing failed here
            LOG.debug("%s:%s went away during its upload", *(request.client or ("a client", "")))
            return Response(status_code=400)
        except MultiPartException as error:
            raise HTTPException(400, f"not a multipart upload this API takes: {error.message}") from None
        except AssertionError:  # Starlette's own check that python-multipart is there, or a non-form body
            raise HTTPException(400, "send the images as multipart/form-data in the field 'file'") from None
        files = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
        if not files:
            raise HTTPException(422, "no images: send one or more in the multipart field 'file'")
        data = [(file.filename or f"image {i + 1}", await file.read()) for i, file in enumerate(files)]
        await form.close()
        rows = await classify(data, top_k)
        if all(row["status"] == "error" for row in rows):
            raise HTTPException(422, "; ".join(f"{row['path']}: {row['error']}" for row in rows))
        served = rows[0]
        return {"model": served["model"], "version": served["version"], "predictions": rows}

    async def classify(data: list[tuple[str, bytes]], top_k: int) -> list[dict]:
        max_pixels = int(settings.max_megapixels * 1e6)
        for _ in range(2):  # a version of another image size swapped in between decoding and classifying
            size = live.served.info.image_size
            try:
                uploads = await run_in_threadpool(decode_uploads, data, size, max_pixels)
            except Stopped:
                raise HTTPException(503, "the app is stopping: send the request again once it is back") from None
            good = [upload.pixels for upload in uploads if not upload.error]
            if not good:
                nothing = np.zeros((0, len(live.served.info.class_names)), np.float32)
                return prediction_rows(live.served, uploads, None, nothing, top_k)
            pixels = np.stack(good)
            try:
                served, probabilities, outside = await asyncio.wrap_future(app.state.batcher.submit(pixels))
            except ModelChanged:
                continue
            return prediction_rows(served, uploads, pixels, probabilities, top_k, outside)
        raise HTTPException(503, "the served model changed twice during this request; send it again")

    @app.exception_handler(StoreError)
    async def store_unavailable(_request: Request, error: StoreError) -> JSONResponse:
        # The object store is down or refuses: the client gets the one sentence, the log no traceback.
        return JSONResponse({"detail": str(error)}, status_code=503)

    @app.get("/api/models")
    async def models() -> dict:
        return await run_in_threadpool(registry_view, settings.artifacts_root, live)

    @app.get("/api/models/{name}/v{version}/plots/{file}")
    async def plot(name: str, version: int, file: str) -> FileResponse:
        if file not in PLOTS:
            raise HTTPException(404, f"{file}: not a report plot (one of {', '.join(PLOTS)})")
        try:
            folder = await run_in_threadpool(Registry(settings.artifacts_root, name).version_dir, version)
        except RegistryError as error:
            raise HTTPException(404, str(error)) from None
        problems = await run_in_threadpool(verify_version, folder, (file,))
        if problems:  # named by the version, not by this server's folders
            raise HTTPException(404, "; ".join(p.replace(str(folder), f"{name} v{version}") for p in problems))
        return FileResponse(folder / file, media_type="image/png")

    return app


def decode_uploads(data: list[tuple[str, bytes]], image_size: int, max_pixels: int) -> list:
    """Decode a request's images in a worker thread, which no cancellation reaches: on Ctrl-C or SIGTERM it
    stops at the next image (`Stopped`), so a request of 120 large PNGs does not hold the exit for minutes."""
    uploads = []
    for name, content in data:
        check_stop()
        uploads.append(decode_upload(name, content, image_size, max_pixels))
    return uploads


def registry_view(artifacts_root: str, live: LiveModel) -> dict:
    """Every registered model's versions and aliases, and what this app serves."""
    names = open_store(f"{str(artifacts_root).rstrip('/')}/{REGISTRY_FOLDER}").list()
    models = []
    for name in names:
        try:
            state = Registry(artifacts_root, name).state()
        except RegistryError as error:
            models.append({"name": name, "problem": str(error)})
            continue
        if state["versions"]:
            models.append({"name": name, "aliases": state["aliases"], "versions": state["versions"]})
    info = live.served.info
    manifest = read_json(Path(info.path) / MANIFEST_FILE)
    plots = [file for file in PLOTS if file in manifest["files"]]
    serving = {"reference": info.reference, "version": info.version, "name": manifest.get("name"),
               "number": manifest["version"], "file": info.model_file, "plots": plots,
               "class_names": info.class_names}  # fmt: skip
    return {"serving": serving, "models": models}


def server_for(web: FastAPI):
    """The uvicorn server that runs `web` (on sockets from `listen`): warnings only, 5 s to finish requests."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(web, log_level="warning", timeout_graceful_shutdown=5))


@contextlib.contextmanager
def background_server(web: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Serve `web` from a thread of this process until the block ends; yields its base URL (tests, benches)."""
    listener = listen(host, port)
    server = server_for(web)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="app-server", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the app's server stopped while starting")
            threading.Event().wait(0.05)
        yield f"http://{host}:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        listener.close()
