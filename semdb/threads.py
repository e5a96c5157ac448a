"""FAISS's thread count, set once when semdb is imported.

FAISS parallelises with its own OpenMP pool, and torch has another. On small or shared machines the
two pools spin against each other: on this project's 2-core machine, with torch busy in the same
process or another, ``codec.encode`` of 64 vectors took 564 ms with FAISS's default 2 threads and
0.6 ms with 1, and PQ training on 2,000 vectors 7.4 s against 1.3 s. semdb's FAISS work is either
tiny (a batch of codes, one query) or one-off (training), so it defaults to one thread. Set
``SEMDB_FAISS_THREADS`` (e.g. to the core count) before importing semdb to change it; ``0`` leaves
FAISS's own default alone.
"""

from __future__ import annotations

import os

import faiss

THREADS_ENV_VAR = "SEMDB_FAISS_THREADS"


def configure_faiss_threads() -> int:
    """Apply ``$SEMDB_FAISS_THREADS`` (default 1) to FAISS; returns the thread count in force."""
    wanted = os.environ.get(THREADS_ENV_VAR, "1").strip()
    count = int(wanted) if wanted.isdigit() else 1
    if count > 0:
        faiss.omp_set_num_threads(count)
    return int(faiss.omp_get_max_threads())
