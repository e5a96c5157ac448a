"""The ASGI app of ``semdb serve``: a JSON API and one search page over an open :class:`Database`.

A thin shell, like the CLI: a request becomes a :class:`~semdb.query.Query` (parsed without file
paths: a request never makes the server read a file by name) and the answer is its results.
The model stays loaded between requests. Files are served only by image id, and only when the
file still is the picture that was ingested (:func:`semdb.server.thumbnails.read_original`).

Routes: ``GET /`` the page, ``GET /api/search`` and ``POST /api/search`` (the body: an image to
search by, at most ``max_upload_bytes``), ``GET /api/stats``, ``GET /api/images/{id}``,
``GET /api/images/{id}/thumbnail``, ``GET /api/images/{id}/file``; OpenAPI at ``/openapi.json``
(FastAPI's ``/docs`` and ``/redoc`` pages are off: they load their scripts from CDNs, and semdb
serves offline machines).
"""

from __future__ import annotations

import mimetypes
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from semdb import __version__
from semdb.database import Database
from semdb.errors import (
    DatabaseDamagedError,
    DatabaseLockedError,
    DatabaseNotFoundError,
    DiskFullError,
    ImageReadError,
    InvalidArgumentError,
    NotASemdbDatabaseError,
    NotReadyError,
    ReadOnlyDatabaseError,
    SchemaVersionError,
    SemdbError,
)
from semdb.images import decode_image
from semdb.query import MAX_LIMIT
from semdb.query import Query as SemdbQuery
from semdb.server.thumbnails import OriginalUnavailableError, ThumbnailCache, read_original
from semdb.store.repository import ImageDetails

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_PAGE = 30
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
# Errors of the database's state, not of the request: the service is unavailable until someone acts.
SERVER_SIDE_ERRORS = (
    NotReadyError,
    DatabaseDamagedError,
    DatabaseLockedError,
    DatabaseNotFoundError,
    DiskFullError,
    NotASemdbDatabaseError,
    ReadOnlyDatabaseError,
    SchemaVersionError,
)
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image's bytes (e.g. `curl --data-binary @photo.jpg`), not a form",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# Query parameters (module level: FastAPI resolves the annotations through this module's names).
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Offset = Annotated[int, Query(ge=0, le=100 * MAX_LIMIT)]
Folders = Annotated[list[str], Query(description="only images in one of these folders")]
Likes = Annotated[list[int], Query(description="stored image ids to search by (more like this)")]
Pixels = Annotated[int | None, Query(ge=1)]
Score = Annotated[float | None, Query(ge=-1, le=1)]


@dataclass
class SearchParams:
    """The query string of ``/api/search``, the same for GET and for POST (an upload)."""

    q: str | None
    like: list[int]
    limit: int
    offset: int
    under: list[str]
    after: str | None
    before: str | None
    min_width: int | None
    min_height: int | None
    min_score: float | None
    exact: bool


def search_params(
    q: str | None = None,
    like: Likes = [],  # noqa: B006 (FastAPI copies defaults per request)
    limit: Limit = DEFAULT_PAGE,
    offset: Offset = 0,
    under: Folders = [],  # noqa: B006
    after: str | None = None,
    before: str | None = None,
    min_width: Pixels = None,
    min_height: Pixels = None,
    min_score: Score = None,
    exact: bool = False,
) -> SearchParams:
    """The one declaration of ``/api/search``'s parameters (a FastAPI dependency)."""
    return SearchParams(q, like, limit, offset, under, after, before, min_width, min_height, min_score, exact)


Params = Annotated[SearchParams, Depends(search_params)]


class Hit(BaseModel):
    """One result: the image, its score, its pixel size, and where the page gets its pictures."""

    id: int
    path: str
    score: float
    width: int | None
    height: int | None
    modified: str | None
    missing: bool
    thumbnail: str
    file: str


class Timings(BaseModel):
    """Server-side milliseconds: encoding the query, the store filters, the FAISS search, all."""

    encode_ms: float
    filter_ms: float
    search_ms: float
    total_ms: float


class SearchResponse(BaseModel):
    """A page of results, best first; ``more``: whether ``offset + limit`` has a next page."""

    query: str
    offset: int
    limit: int
    more: bool
    results: list[Hit]
    timings: Timings


class ImageInfo(BaseModel):
    """An indexed image."""

    id: int
    path: str
    width: int
    height: int
    modified: str | None
    missing: bool


def _modified(mtime_ns: int | None) -> str | None:
    return None if mtime_ns is None else datetime.fromtimestamp(mtime_ns / 1e9, UTC).isoformat()


def create_app(
    db: Database,
    thumbnails: ThumbnailCache,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The app serving ``db``. ``allowed_hosts``: the ``Host`` headers accepted (default: the
    loopback names, which keeps a web page elsewhere from reaching it through DNS rebinding)."""
    app = FastAPI(
        title="semdb",
        version=__version__,
        description="Semantic image search over compressed CLIP codes. The query language: "
        "`red dress + 0.5:beach - night`, `id:42` for a stored image.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost", "[::1]"])
    # One query at a time through the database: the index is rebuilt in place when the store
    # changes, and the model's numpy/torch work gains nothing from running twice at once here.
    lock = threading.Lock()

    def details(image_id: int) -> ImageDetails:
        with lock:
            found = db.image_details([image_id]).get(image_id)
        if found is None:
            raise HTTPException(404, f"no image with id {image_id} in the database")
        return found

    @app.exception_handler(SemdbError)
    async def user_error(_request: Request, error: SemdbError) -> JSONResponse:
        status = 503 if isinstance(error, SERVER_SIDE_ERRORS) else 400
        return JSONResponse({"detail": str(error)}, status_code=status)

    def run_search(params: SearchParams, upload: bytes | None) -> SearchResponse:
        query: SemdbQuery = db.query()
        if params.q is not None and params.q.strip():
            query = query.parse(params.q, allow_paths=False)
        for image_id in params.like:
            query = query.like(image_id)
        if upload is not None:
            try:
                query = query.image(decode_image(upload))
            except ImageReadError as error:
                raise InvalidArgumentError(f"the uploaded file is not a usable image: {error}") from None
        if not query.terms:
            raise InvalidArgumentError("give a query (q), an image id (like) or an image to search by")
        query = query.limit(params.limit).offset(params.offset).under(*params.under).exact(params.exact)
        if params.after or params.before:
            query = query.modified(params.after or None, params.before or None)
        if params.min_width is not None or params.min_height is not None:
            query = query.min_size(params.min_width, params.min_height)
        if params.min_score is not None:
            query = query.min_score(params.min_score)
        with lock:
            page = query.page()
            found = db.image_details([hit.id for hit in page.results])
        hits = []
        for hit in page.results:
            info = found.get(hit.id)
            hits.append(
                Hit(
                    id=hit.id,
                    path=hit.path,
                    score=hit.score,
                    width=info.width if info else None,
                    height=info.height if info else None,
                    modified=_modified(info.mtime_ns) if info else None,
                    missing=not os.path.lexists(os.fsdecode(info.path_bytes)) if info else True,
                    thumbnail=f"/api/images/{hit.id}/thumbnail",
                    file=f"/api/images/{hit.id}/file",
                )
            )
        description = query.describe() if upload is None else query.describe().replace("an uploaded image", "upload")
        return SearchResponse(
            query=description,
            offset=params.offset,
            limit=params.limit,
            more=page.more,
            results=hits,
            timings=Timings(**vars(page.timings)),
        )

    @app.get("/api/search", response_model=SearchResponse)
    def search(params: Params) -> SearchResponse:
        """Search by the query language (``q``) and/or stored images (``like``), with filters."""
        return run_search(params, None)

    @app.post("/api/search", response_model=SearchResponse, openapi_extra=UPLOAD_BODY)
    async def search_by_upload(request: Request, params: Params) -> Any:
        """Search by the image in the request body (raw bytes), plus ``q``/``like`` terms if given."""
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            raise HTTPException(
                415, "send the image's bytes as the request body (curl --data-binary @photo.jpg), not as a form"
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise HTTPException(413, f"upload is over the {max_upload_bytes} byte limit")
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > max_upload_bytes:
                raise HTTPException(413, f"upload is over the {max_upload_bytes} byte limit")
        if not received:
            raise HTTPException(400, "the request body is empty: send the image's bytes")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(run_search, params, bytes(received))

    @app.get("/api/stats")
    def stats() -> dict[str, Any]:
        """What the database holds, and the thumbnail cache's use."""
        with lock:
            payload = db.stats().to_dict()
        payload["thumbnail_cache"] = {
            "folder": str(thumbnails.folder),
            "bytes": thumbnails.total_bytes,
            "max_bytes": thumbnails.max_bytes,
        }
        return payload

    @app.get("/api/images/{image_id}", response_model=ImageInfo)
    def image_info(image_id: int) -> ImageInfo:
        """An indexed image's path, pixel size, modification time and whether its file is there."""
        info = details(image_id)
        return ImageInfo(
            id=info.id,
            path=info.path,
            width=info.width,
            height=info.height,
            modified=_modified(info.mtime_ns),
            missing=not os.path.lexists(os.fsdecode(info.path_bytes)),
        )

    def unavailable(error: OriginalUnavailableError) -> HTTPException:
        return HTTPException(404 if error.missing else 409, str(error))

    @app.get("/api/images/{image_id}/thumbnail")
    def thumbnail(image_id: int) -> Response:
        """A WebP thumbnail made from the original (then cached); 404 if the original is gone,
        409 if it changed since ingest."""
        info = details(image_id)
        started = time.perf_counter()
        try:
            data, cached = thumbnails.get(info)
        except OriginalUnavailableError as error:
            raise unavailable(error) from None
        took = (time.perf_counter() - started) * 1e3
        headers = {"Cache-Control": "private, max-age=3600", "Server-Timing": f"thumb;dur={took:.1f}"}
        headers["X-Thumbnail-Cache"] = "hit" if cached else "miss"
        return Response(data, media_type="image/webp", headers=headers)

    @app.get("/api/images/{image_id}/file")
    def original(image_id: int) -> Response:
        """The original file, only while it is the picture that was ingested."""
        info = details(image_id)
        try:
            data = read_original(info)
        except OriginalUnavailableError as error:
            raise unavailable(error) from None
        media_type = mimetypes.guess_type(info.path)[0] or "application/octet-stream"
        if not media_type.startswith("image/"):
            media_type = "application/octet-stream"
        # nosniff: the browser takes the type from the header, never from bytes that look like HTML.
        headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type=media_type, headers=headers)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
