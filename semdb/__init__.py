"""semdb: a semantic retrieval database for images.

Images are embedded once with a CLIP model, compressed to codes of a few bytes, stored in SQLite,
and searched by text with FAISS directly over the codes::

    import semdb
    db = semdb.connect("photos.semdb", model="tiny-fashion", bits=64)
    db.ingest(["~/Pictures"])
    for hit in db.search("a dog on a beach", k=5):
        print(hit.score, hit.path)
"""

from semdb.threads import configure_faiss_threads

configure_faiss_threads()

from semdb.database import Database, SearchResult, Stats, connect  # noqa: E402
from semdb.errors import SemdbError  # noqa: E402
from semdb.ingest import IngestReport  # noqa: E402

__all__ = ["Database", "IngestReport", "SearchResult", "SemdbError", "Stats", "connect"]
__version__ = "0.1.0"
