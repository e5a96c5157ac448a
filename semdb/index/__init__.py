"""The search index: FAISS over the stored codes, cached next to the database.

The index is derived data (:mod:`semdb.index.build` builds it from the store, one group per
codec); :mod:`semdb.index.cache` keeps it in ``<database>.index`` and trusts that file only when it
provably belongs to the store's current state. Deleting the cache loses nothing.
"""

from semdb.index.build import current_index
from semdb.index.cache import cache_path, load_cache, save_cache
from semdb.index.search_index import CodedGroup, SearchIndex, flat_index

__all__ = ["CodedGroup", "SearchIndex", "cache_path", "current_index", "flat_index", "load_cache", "save_cache"]
