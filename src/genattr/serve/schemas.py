"""The service's JSON answers, as pydantic models: what `/attribute`, `/about` and `/healthz`
return (and what `/docs` shows)."""

from __future__ import annotations

from pydantic import BaseModel, Field


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


class MemoryBudget(BaseModel):
    total: int = Field(description="bytes uploads being decoded or answered may hold at once")
    used: int = Field(description="bytes held now")
    peak: int = Field(description="most bytes held at once since the service started")
    waiting: int = Field(description="uploads waiting for memory now")
    granted: int = Field(description="uploads granted memory so far")
    waited: int = Field(description="of those, how many had to wait")


class Health(BaseModel):
    status: str
    images: int
    backbone: str
    index_kind: str
    calibrated: bool
    batches: int
    requests: int
    memory: MemoryBudget
