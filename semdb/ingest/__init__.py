"""Ingest: the read/decode/encode pipeline (:mod:`~semdb.ingest.pipeline`) and the batch writer
with the once-only codec step (:mod:`~semdb.ingest.writer`)."""

from semdb.ingest.pipeline import DEFAULT_BATCH_SIZE, DEFAULT_TRAIN_SIZE, Ingestor, resolve_roots
from semdb.ingest.report import IngestReport
from semdb.ingest.writer import BatchWriter, CodecChoice

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_TRAIN_SIZE",
    "BatchWriter",
    "CodecChoice",
    "IngestReport",
    "Ingestor",
    "resolve_roots",
]
