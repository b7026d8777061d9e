"""The web service: upload a generated image, get the training images it leans on.

Everything heavy (index, head, calibrator, backbone, gallery metadata) is loaded once when the
app starts (its lifespan). Uploads are checked in the request (size) and in decoding threads
(with the same guard as extraction: decompression bombs and side limits are refused on the
header, before pixels are decoded); every refusal is a 4xx with a JSON `{"detail": ...}` body
and the service carries on.

Memory is bounded per service, not per image: each upload reserves what decoding it will
hold at its peak (from its header) in a byte budget shared by all requests (`ByteBudget`)
before a pixel is decoded, and waits when the budget is spent; images larger than a working
size are shrunk as they are decoded (a JPEG at a reduced DCT scale, anything else box-averaged
strip by strip), so a micro-batch holds working-size images only, and those stay reserved
until answered. Uploads are read from the request's spooled file, not copied into memory.
Requests that arrive together are embedded and searched as one batch in a worker thread
(`MicroBatcher`), so the event loop never waits on the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from importlib import resources
from typing import TYPE_CHECKING, Annotated, BinaryIO, TypeVar
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from genattr.attribution import Attributor
from genattr.data.images import (
    DEFAULT_MAX_PIXELS,
    UPLOAD_FORMATS,
    ImageDecodeError,
    decode_rgb,
    decoded_bytes,
    open_image,
)
from genattr.errors import GenattrError
from genattr.report.attribution_html import thumbnail_side
from genattr.serve.batcher import MicroBatcher, QueueFull
from genattr.serve.budget import Busy, ByteBudget, Hold, trim_heap
from genattr.serve.examples import world_examples
from genattr.serve.gallery import Gallery
from genattr.serve.http import (
    BodyLimit,
    check_listen,
    spooled_size,
    too_large_text,
    with_header_deadline,
)
from genattr.serve.schemas import (
    About,
    AttributeResponse,
    ExampleQuery,
    Health,
    MemoryBudget,
    TrainingImage,
)
from genattr.serve.world_index import default_world_index

__all__ = ["Limits", "Service", "check_listen", "create_app", "serve"]

if TYPE_CHECKING:
    from genattr.attribution import Attribution

MULTIPART_SLACK = 64 * 1024  # form framing and the top_k field around the image itself
# Images with more pixels decode in the large images' threads even when they take little
# memory (a 89 M pixel JPEG decoded at 1/8 scale: 25 MB, but ~0.3 s of CPU).
HEAVY_PIXELS = 4_000_000
T = TypeVar("T")
# What each Limits field is called on `genattr serve`'s command line, for its errors.
_OPTION = {
    "max_upload_bytes": "the upload limit (--max-upload-mb)",
    "default_top_k": "--top-k",
    "max_top_k": "--max-top-k",
    "max_decoded_bytes": "--max-decode-mb",
}


@dataclass(frozen=True)
class Limits:
    """What an upload may be, and the memory the service may use decoding them. Sizes are
    checked on the image header, before decoding. All positive: `GenattrError` otherwise,
    when the limits are made (before a server starts)."""

    max_upload_bytes: int = 20 * 2**20
    min_side: int = 16
    max_side: int = 16384
    max_pixels: int = DEFAULT_MAX_PIXELS  # more is a decompression bomb (Pillow's ~89.5 M)
    default_top_k: int = 20
    max_top_k: int = 100
    # Bytes all uploads being decoded or waiting for their batch may hold at once, as
    # `decoded_bytes` counts them; the worst legal PNG (89 M pixels of 16-bit RGBA) needs
    # ~380 MB. An upload that needs more than the share for large ones (7/8) is refused:
    # WebP above ~44 M pixels, one-strip TIFF above ~82 M. BENCHMARKS.md, "Service memory
    # under hostile uploads".
    max_decoded_bytes: int = 768 * 2**20
    # Longer sides are shrunk (by an integer factor) as they are decoded: backbones take at
    # most 518 px, and images up to this size are embedded exactly as `genattr attribute` does.
    max_work_side: int = 2048
    # Seconds a connection may take to send a request's head (from opening, or from its last
    # answer), and may go without sending a byte of a body it announced: half-sent requests
    # are dropped (408 for a body) instead of holding their sockets and tasks for ever.
    header_timeout: int = 10
    body_timeout: int = 30

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                what = _OPTION.get(f.name, f.name)
                if f.name == "max_upload_bytes" and isinstance(value, int):
                    raise GenattrError(f"{what} must be positive, got {value / 2**20:g} MB")
                raise GenattrError(f"{what} must be a positive whole number, got {value!r}")
        if self.max_side < self.min_side:
            raise GenattrError(f"max_side {self.max_side} is below min_side {self.min_side}")
        if self.default_top_k > self.max_top_k:
            raise GenattrError(
                f"--top-k {self.default_top_k} is more than --max-top-k {self.max_top_k}"
            )


@dataclass
class Upload:
    """A decoded upload waiting for its batch: RGB at working size, and its own size."""

    image: Image.Image
    size: tuple[int, int]
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
        decode_threads: int | None = None,
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
        self.gallery = Gallery(*self.attributor.gallery, files=self.index.file_paths())
        self.index_path = str(index_path)
        self.examples = world_examples(self.gallery)
        self.max_top_k = min(limits.max_top_k, self.index.count)
        self.batcher: MicroBatcher[Upload, AttributeResponse] = MicroBatcher(
            self.attribute_batch, max_batch, max_wait
        )
        self.budget = ByteBudget(limits.max_decoded_bytes)
        self.budget.on_idle.append(self._trim_when_idle)
        # Decoding threads, beside the batcher's (the model): large images (by memory or by
        # pixels to decode) in one pool, headers and small images in another, so that
        # ordinary uploads never wait for a thread behind huge ones; the large pool leaves a
        # core to the rest. The budget, not the thread count, bounds their memory.
        self.decode_threads = decode_threads or max(1, min(4, (os.cpu_count() or 1) - 1))
        self._pools: dict[bool, ThreadPoolExecutor] = {}
        self._large_since_trim = False

    async def start(self) -> None:
        self._pools = {
            True: ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode-large"),
            False: ThreadPoolExecutor(2, thread_name_prefix="decode"),
        }
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    async def attribute_upload(self, file: BinaryIO, name: str, top_k: int) -> AttributeResponse:
        """One upload: its header read, its memory reserved, decoded to working size, then
        answered in a batch. UploadRefused for an unusable image, Busy or QueueFull when the
        service is full."""
        cost, size = await self._in_thread(None, False, self._probe, file, name)
        if cost > self.budget.large_total:  # granting it would break the bound
            raise UploadRefused(
                f"{name}: {size[0]}x{size[1]} pixels in this format take ~{cost / 2**20:.0f} MB "
                f"to decode, more than this service decodes at once "
                f"({self.budget.large_total / 2**20:.0f} MB; --max-decode-mb raises it)"
            )
        hold = await self.budget.acquire(cost)
        heavy = hold.large or size[0] * size[1] > HEAVY_PIXELS
        try:
            image = await self._in_thread(hold, heavy, self._decode, file, name, heavy)
            hold.shrink_to(image.width * image.height * 4)  # Pillow keeps RGB in 4 bytes
            return await self.batcher.submit(Upload(image, size, name, top_k))
        finally:
            hold.release()

    async def _in_thread(self, hold: Hold | None, heavy: bool, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in a decoding thread: the large images' pool when `heavy`. Should the
        request be cancelled meanwhile, the thread runs to its end, and the memory it holds
        stays reserved until then."""
        assert self._pools, "the service is not started"
        future = asyncio.get_running_loop().run_in_executor(self._pools[heavy], fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if hold is not None and not future.done():
                kept = Hold(self.budget, hold.n, hold.large)
                hold.n = 0
                future.add_done_callback(lambda _: kept.release())
            raise

    def _open(self, file: BinaryIO) -> Image.Image:
        """The upload opened, header checked against the limits; no pixel decoded yet."""
        lim = self.limits
        return open_image(
            file, lim.max_pixels, min_side=lim.min_side, max_side=lim.max_side,
            formats=UPLOAD_FORMATS,
        )  # fmt: skip

    def _probe(self, file: BinaryIO, name: str) -> tuple[int, tuple[int, int]]:
        """Bytes decoding the upload will hold at its peak, and its size: header only."""
        lim = self.limits
        try:
            image = self._open(file)
        except ImageDecodeError as e:
            reason = str(e)
        else:
            return decoded_bytes(image, lim.max_work_side), image.size
        raise UploadRefused(f"{name}: not a usable image: {reason}")

    def _decode(self, file: BinaryIO, name: str, heavy: bool) -> Image.Image:
        lim = self.limits
        try:
            image = self._open(file)
            rgb = decode_rgb(image, lim.max_pixels, max_work_side=lim.max_work_side)
        except ImageDecodeError as e:
            reason = str(e)  # raised below, outside this block: its frames hold the pixels
        else:
            del image
            if heavy:  # the full-size pixels are freed: hand their pages back now, and
                trim_heap()  # again when the burst is over (`_trim_when_idle`)
                self._large_since_trim = True
            return rgb
        raise UploadRefused(f"{name}: not a usable image: {reason}")

    def _trim_when_idle(self) -> None:
        """Nothing decoded or waiting for a batch: give freed pages back once, in a thread."""
        if self._large_since_trim and self._pools:
            self._large_since_trim = False
            self._pools[False].submit(trim_heap)

    def attribute_batch(self, uploads: Sequence[Upload]) -> list[AttributeResponse | Exception]:
        """Embed, search and describe a batch of decoded uploads, in the batcher's thread."""
        answers = self.attributor.attribute(
            [up.image for up in uploads], [up.top_k for up in uploads], [up.name for up in uploads]
        )
        out: list[AttributeResponse | Exception] = []
        for up, answer in zip(uploads, answers, strict=True):
            if up.image.size != up.size:
                answer.notes.append(
                    f"shrunk from {up.size[0]}x{up.size[1]} to "
                    f"{up.image.width}x{up.image.height} pixels before embedding"
                )
            out.append(self.response(answer, up.size, up.top_k))
        return out

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
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="genattr",
        summary="Which training images made this generated image, and how much?",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodyLimit,
        max_bytes=limits.max_upload_bytes + MULTIPART_SLACK,
        timeout=limits.body_timeout,
    )

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
            503: {"description": "too many requests waiting (for memory or for the model)"},
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
        fields = (await request.form()).getlist("image")  # parsed once already: cached
        if len(fields) > 1:
            raise HTTPException(422, f"one image per request, got {len(fields)} 'image' fields")
        k = top_k if top_k is not None else top_k_query
        k = min(limits.default_top_k, svc.max_top_k) if k is None else k
        if not 1 <= k <= svc.max_top_k:
            raise HTTPException(422, f"top_k must be between 1 and {svc.max_top_k}, got {k}")
        size = image.size if image.size is not None else spooled_size(image)
        if size > limits.max_upload_bytes:
            raise HTTPException(413, too_large_text(limits.max_upload_bytes))
        try:
            return await svc.attribute_upload(image.file, image.filename or "upload", k)
        except UploadRefused as e:
            raise HTTPException(422, str(e)) from None
        except (QueueFull, Busy) as e:
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
            memory=MemoryBudget(**svc.budget.stats()),
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
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    weights: str | None = None,
    device: str = "cpu",
) -> None:
    """`genattr serve`: check that the address can be listened on, load, then run the app
    with uvicorn (the world's index when none is given). GenattrError for a port out of
    range, a host that does not resolve, or an address in use, before anything loads."""
    import uvicorn

    check_listen(host, port)
    if index_path is None:
        index_path = default_world_index()
    limits = limits or Limits()
    svc = Service(index_path, calibrator_path, limits, weights, device)
    uvicorn.run(
        create_app(service=svc),
        host=host,
        port=port,
        http=with_header_deadline(limits.header_timeout),
    )
