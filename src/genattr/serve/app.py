"""The web service: upload a generated image, get the training images it leans on.

Everything heavy (index, head, calibrator, backbone, gallery metadata) is loaded once when the
app starts (its lifespan). Uploads are checked in the request (size) and in the worker thread
(decoding, with the same `load_rgb` guard as extraction: decompression bombs and side limits
are refused on the header, before pixels are decoded); every refusal is a 4xx with a JSON
`{"detail": ...}` body and the service carries on. Requests that arrive together are embedded
and searched as one batch in a worker thread (`MicroBatcher`), so the event loop never waits
on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from genattr.attribution import Attributor
from genattr.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb
from genattr.report.attribution_html import thumbnail_side
from genattr.serve.batcher import MicroBatcher, QueueFull
from genattr.serve.examples import world_examples
from genattr.serve.gallery import Gallery
from genattr.serve.world_index import default_world_index

if TYPE_CHECKING:
    from genattr.attribution import Attribution

MULTIPART_SLACK = 64 * 1024  # form framing and the top_k field around the image itself


@dataclass(frozen=True)
class Limits:
    """What an upload may be. Sizes are checked on the image header, before decoding."""

    max_upload_bytes: int = 20 * 2**20
    min_side: int = 16
    max_side: int = 16384
    max_pixels: int = DEFAULT_MAX_PIXELS  # more is a decompression bomb (Pillow's ~89.5 M)
    default_top_k: int = 20
    max_top_k: int = 100


class TrainingImage(BaseModel):
    rank: int = Field(description="1 for the most similar training image")
    id: str = Field(description="gallery id; its thumbnail is GET /images/{id}")
    path: str = Field(description="where the index says the training image came from")
    caption: str | None = Field(description="the image's caption, where the gallery has one")
    similarity: float = Field(description="cosine similarity in the (head-mapped) feature space")
    influence: float | None = Field(
        description="percent of the generated image's influence (over the whole gallery); "
        "null without a calibrator"
    )
    thumbnail: str = Field(description="URL of the thumbnail")
    display_side: int = Field(
        description="suggested display size in px: side ~ sqrt(influence), as the HTML report"
    )


class AttributeResponse(BaseModel):
    query: str = Field(description="the uploaded file's name")
    width: int
    height: int
    top_k: int
    results: list[TrainingImage]
    remaining: float | None = Field(
        description="percent of influence outside the top K; null without a calibrator"
    )
    estimated: bool = Field(
        description="true when the index is approximate (IVF): candidates, and so the "
        "normalisation of influence, are estimates"
    )
    calibrated: bool
    notes: list[str]


class ExampleQuery(BaseModel):
    index: int
    label: str = Field(description="the test model, its test case and the sample's prompt")
    image: str = Field(description="URL of the sample (PNG)")
    exemplar_ids: list[str] = Field(description="gallery ids of its true training images")


class About(BaseModel):
    """What the service serves, for the page's header and for clients."""

    images: int = Field(description="gallery images in the index")
    index: str = Field(description="the index folder")
    index_kind: str
    backbone: str
    weights_id: str
    head: str | None = Field(description="the head's kind, null for raw features")
    calibrator: dict[str, float] | None = Field(description="inv_tau and bias, or null")
    examples: list[ExampleQuery] = Field(
        description="test samples of the world's benchmark whose exemplars are in the gallery"
    )


class Health(BaseModel):
    status: str
    images: int
    backbone: str
    index_kind: str
    calibrated: bool
    batches: int
    requests: int


@dataclass
class Upload:
    data: bytes
    name: str
    top_k: int


class UploadRefused(Exception):
    """An upload that is not a usable image; the message says why (HTTP 422)."""


class Service:
    """What the app loads once: index, calibrator, backbone and head, gallery, batcher."""

    def __init__(
        self,
        index_path: str | os.PathLike,
        calibrator_path: str | os.PathLike | None,
        limits: Limits,
        weights: str | None = None,
        device: str = "cpu",
        max_batch: int = 16,
        max_wait: float = 0.005,
        model_batch: int | None = None,
    ) -> None:
        self.limits = limits
        # Images per forward pass. On CPU one: EfficientNet-Lite0 at one thread spent ~1.7x the
        # CPU per image on passes of 8 images as on single images here (activations outgrow
        # the cache; BENCHMARKS.md, Serving); GPUs want large batches. A request batch still
        # shares one decode hop and one search pass over the gallery.
        self.model_batch = model_batch or (max_batch if device.startswith("cuda") else 1)
        self.attributor = Attributor.load(
            index_path, calibrator_path, weights=weights, device=device, batch_size=self.model_batch
        )
        self.index, self.calibrator = self.attributor.index, self.attributor.calibrator
        self.backbone, self.head = self.attributor.backbone, self.attributor.head
        self.gallery = Gallery(*self.attributor.gallery)
        self.index_path = str(index_path)
        self.examples = world_examples(self.gallery)
        self.max_top_k = min(limits.max_top_k, self.index.count)
        self.batcher: MicroBatcher[Upload, AttributeResponse] = MicroBatcher(
            self.attribute_batch, max_batch, max_wait
        )

    def attribute_batch(self, uploads: Sequence[Upload]) -> list[AttributeResponse | Exception]:
        """Decode, embed, search and describe a batch: all of it in the worker thread."""
        lim = self.limits
        out: dict[int, AttributeResponse | Exception] = {}
        decoded = {}
        for k, up in enumerate(uploads):
            try:
                decoded[k] = load_rgb(
                    up.data, lim.max_pixels, min_side=lim.min_side, max_side=lim.max_side
                )
            except ImageDecodeError as e:
                out[k] = UploadRefused(f"{up.name}: not a usable image: {e}")
        if decoded:
            ups = [uploads[k] for k in decoded]
            answers = self.attributor.attribute(
                list(decoded.values()), [up.top_k for up in ups], [up.name for up in ups]
            )
            for (k, image), answer in zip(decoded.items(), answers, strict=True):
                out[k] = self.response(answer, image.size, uploads[k].top_k)
        return [out[k] for k in range(len(uploads))]

    def _caption(self, id_: str) -> str | None:
        row = self.gallery.row(id_)
        assert row is not None  # results come from this index, and the gallery is its metadata
        return self.gallery.caption(row)

    def response(self, a: Attribution, size: tuple[int, int], top_k: int) -> AttributeResponse:
        """The JSON answer: influence in percent, captions and thumbnail URLs added."""
        results = [
            TrainingImage(
                rank=r.rank,
                id=r.id,
                path=r.path,
                caption=self._caption(r.id),
                similarity=r.similarity,
                influence=_percent(r.influence),
                thumbnail="/images/" + quote(r.id, safe=""),
                display_side=thumbnail_side(r.influence),
            )
            for r in a.results
        ]
        return AttributeResponse(
            query=a.query,
            width=size[0],
            height=size[1],
            top_k=top_k,
            results=results,
            remaining=_percent(a.remaining_influence),
            estimated=not self.index.spec.exact,
            calibrated=self.calibrator is not None,
            notes=a.notes,
        )


def _percent(share: float | None) -> float | None:
    return None if share is None else 100.0 * share


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether they announce their length
    (refused before reading) or stream it (refused when the count passes the limit), so an
    oversized upload is never spooled to disk whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, _too_large_text(self.max_bytes))
            return message

        await self.app(scope, counted, send)


def _too_large_text(max_bytes: int) -> str:
    return f"upload too large: the limit is {max_bytes:,} bytes"


def _too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse({"detail": _too_large_text(max_bytes)}, status_code=413)


def _package_text(name: str) -> str:
    return resources.files("genattr.serve").joinpath(name).read_text(encoding="utf-8")


def create_app(
    index_path: str | os.PathLike | None = None,
    calibrator_path: str | os.PathLike | None = None,
    *,
    limits: Limits | None = None,
    weights: str | None = None,
    device: str = "cpu",
    max_batch: int = 16,
    max_wait: float = 0.005,
    service: Service | None = None,
) -> FastAPI:
    """The service over one index, loaded when the app starts (its lifespan: uvicorn, or a
    TestClient used as a context manager), or an already loaded `service` (`genattr serve`
    loads first, so a bad index is one line of error rather than a server traceback)."""
    if service is None and index_path is None:
        raise ValueError("create_app needs an index path or a loaded Service")
    limits = service.limits if service is not None else limits or Limits()
    page = _package_text("page.html")
    script = _package_text("page.js")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if service is not None:
            svc = service
        else:
            assert index_path is not None  # create_app refused that case above
            svc = Service(index_path, calibrator_path, limits, weights, device, max_batch, max_wait)
        app.state.service = svc
        await svc.batcher.start()
        try:
            yield
        finally:
            await svc.batcher.stop()

    app = FastAPI(
        title="genattr",
        summary="Which training images made this generated image, and how much?",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes + MULTIPART_SLACK)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, 500)

    def loaded(request: Request) -> Service:
        return request.app.state.service

    @app.post(
        "/attribute",
        response_model=AttributeResponse,
        responses={
            413: {"description": "upload over the size limit"},
            422: {"description": "not a usable image, or top_k out of range"},
            503: {"description": "too many requests waiting"},
        },
    )
    async def attribute(
        request: Request,
        image: Annotated[UploadFile, File(description="the generated image")],
        top_k: Annotated[int | None, Form(description="training images to list")] = None,
        top_k_query: Annotated[
            int | None, Query(alias="top_k", description="or as a query parameter")
        ] = None,
    ) -> AttributeResponse:
        """The generated image's top-K training images with similarity and influence."""
        svc = loaded(request)
        k = top_k if top_k is not None else top_k_query
        k = min(limits.default_top_k, svc.max_top_k) if k is None else k
        if not 1 <= k <= svc.max_top_k:
            raise HTTPException(422, f"top_k must be between 1 and {svc.max_top_k}, got {k}")
        data = await image.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(413, _too_large_text(limits.max_upload_bytes))
        try:
            return await svc.batcher.submit(Upload(data, image.filename or "upload", k))
        except UploadRefused as e:
            raise HTTPException(422, str(e)) from None
        except QueueFull as e:
            raise HTTPException(503, f"busy: {e}; retry shortly") from None

    @app.get("/images/{image_id:path}", responses={404: {"description": "unknown id"}})
    def image(request: Request, image_id: str) -> Response:
        """A gallery image's thumbnail, found by its id in the index (never by a path)."""
        gallery = loaded(request).gallery
        row = gallery.row(image_id)
        if row is None:
            raise HTTPException(404, "no gallery image with this id")
        thumb = gallery.thumbnail(row)
        if thumb is None:
            raise HTTPException(404, "this gallery image has no readable file")
        return Response(
            thumb.data, media_type=thumb.media_type, headers={"Cache-Control": "max-age=3600"}
        )

    @app.get("/healthz")
    def healthz(request: Request) -> Health:
        """Liveness and what is loaded."""
        svc = loaded(request)
        return Health(
            status="ok",
            images=svc.index.count,
            backbone=svc.backbone.name,
            index_kind=svc.index.spec.kind,
            calibrated=svc.calibrator is not None,
            batches=svc.batcher.batches,
            requests=svc.batcher.items,
        )

    @app.get("/about")
    def about(request: Request) -> About:
        """The gallery, backbone, head and calibrator served, and example queries to try."""
        svc = loaded(request)
        cal = svc.calibrator
        return About(
            images=svc.index.count,
            index=svc.index_path,
            index_kind=svc.index.spec.kind,
            backbone=svc.backbone.name,
            weights_id=svc.backbone.weights_id,
            head=None if svc.head is None else svc.head.kind,
            calibrator=None if cal is None else {"inv_tau": cal.inv_tau, "bias": cal.bias},
            examples=[
                ExampleQuery(
                    index=k, label=e.label, image=f"/examples/{k}", exemplar_ids=e.exemplar_ids
                )
                for k, e in enumerate(svc.examples)
            ],
        )

    @app.get("/examples/{k}", responses={404: {"description": "no such example"}})
    def example(request: Request, k: int) -> Response:
        """An example query's image (PNG)."""
        examples = loaded(request).examples
        if not 0 <= k < len(examples):
            raise HTTPException(404, "no example with this number")
        return Response(examples[k].png, media_type="image/png")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request) -> HTMLResponse:
        svc = loaded(request)
        settings = {
            "defaultTopK": min(limits.default_top_k, svc.max_top_k),
            "maxTopK": svc.max_top_k,
            "maxUploadBytes": limits.max_upload_bytes,
        }
        return HTMLResponse(page.replace("{{SETTINGS}}", json.dumps(settings)))

    @app.get("/page.js", include_in_schema=False)
    def page_js() -> Response:
        return Response(script, media_type="text/javascript")

    return app


def serve(
    index_path: str | os.PathLike | None = None,
    calibrator_path: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    weights: str | None = None,
    device: str = "cpu",
) -> None:
    """`genattr serve`: load, then run the app with uvicorn (the world's index when none is
    given)."""
    import uvicorn

    if index_path is None:
        index_path = default_world_index()
    svc = Service(index_path, calibrator_path, limits or Limits(), weights, device)
    uvicorn.run(create_app(service=svc), host=host, port=port)
