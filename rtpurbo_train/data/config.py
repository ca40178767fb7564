"""`data:` section of a recipe."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..synthetic.config import SyntheticConfig

SourceFormat = Literal["auto", "jsonl", "json", "parquet", "csv", "arrow", "text", "disk"]


class SourceConfig(BaseModel):
    """One data source.

    `path`: a jsonl / json / parquet / arrow / csv file, a glob of such files (one format), a folder
    of `.txt` files (searched recursively; each file is one document; a single `.txt` file is one
    document too), or a folder written by `datasets.Dataset.save_to_disk` (split `train` of a
    `DatasetDict`, or its only split). `format: auto` decides by extension / folder contents.
    """

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    text_field: str = Field("text", min_length=1, description="the record field that holds the document text")
    weight: float = Field(1.0, gt=0, description="relative sampling weight in the mixture")
    format: SourceFormat = "auto"


class DataConfig(BaseModel):
    """Training data: user sources and/or the synthetic long-context mix, with their weights.

    With no `sources` and no `synthetic`, the data is the synthetic mix alone (the tiny test recipes need no
    files; the shipped recipes list the public corpus, rtpurbo_train.corpora, as sources). Documents shorter than `min_tokens` (or longer than `max_tokens`) are skipped
    and counted. `eval_fraction` of each source's documents (chosen by a hash of the source path and
    the record index, so the choice is stable) is held out for evaluation and never trained on.
    """

    model_config = ConfigDict(extra="forbid")

    sources: list[SourceConfig] = Field(default_factory=list)
    synthetic: Optional[SyntheticConfig] = None
    min_tokens: int = Field(16, ge=1, description="shorter documents (and shorter tail chunks) are skipped")
    max_tokens: Optional[int] = Field(None, ge=1, description="longer documents are skipped (None: no limit)")
    shuffle_seed: int = Field(0, ge=0, description="combined with the run seed for the per-epoch shuffles")
    cache_dir: Optional[str] = Field(None, description="tokenisation cache; default: the run's output dir, else $RTPURBO_CACHE/data")
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="documents held out for evaluation")

    @model_validator(mode="after")
    def _defaults_and_ranges(self):
        if not self.sources and self.synthetic is None:
            self.synthetic = SyntheticConfig()
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})")
        return self
