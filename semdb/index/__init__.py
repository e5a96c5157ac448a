"""The search index: FAISS over the stored codes, cached next to the database.

The index is derived data (:mod:`semdb.index.build` builds it from the store, one group per
codec, and catches an earlier index up with the store row by row); :mod:`semdb.index.cache` keeps
it in ``<database>.index`` and trusts that file as it is only when it provably belongs to the
store's current state. Deleting the cache loses nothing. Each group is searched exactly
(:mod:`semdb.cosine`) or, for 4-bit-word codecs on large collections, by a FAISS fast scan over
inverted lists with an exact re-rank (:mod:`semdb.index.fastscan`, :mod:`semdb.index.lists`).
"""

from semdb.index.build import current_index
from semdb.index.cache import cache_path, load_cache, save_cache
from semdb.index.search_index import CodedGroup, SearchIndex, flat_index

__all__ = ["CodedGroup", "SearchIndex", "cache_path", "current_index", "flat_index", "load_cache", "save_cache"]
