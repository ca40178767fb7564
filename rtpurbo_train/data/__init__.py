"""Training data: sources read through `datasets`, a tokenisation cache, one-document-per-sequence
packing, and a resumable, sharded mixture loader. See docs/DATA.md."""
from .build import build_train_loader, check_sources, iter_texts
from .config import DataConfig, SourceConfig
from .loader import TrainLoader
from .packing import IGNORE_INDEX, chunk_documents, collate
from .records import SKIP_REASONS, clean_text

__all__ = [
    "DataConfig",
    "IGNORE_INDEX",
    "SKIP_REASONS",
    "SourceConfig",
    "TrainLoader",
    "build_train_loader",
    "check_sources",
    "chunk_documents",
    "clean_text",
    "collate",
    "iter_texts",
]
