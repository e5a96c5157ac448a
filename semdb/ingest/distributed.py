"""Distributed ingest on Ray Data: read and decode in tasks, embed and write in a pool of encoder actors.

The driver (the process that runs ``semdb ingest --ray``) does what needs the whole picture and is
cheap: it walks the folders (the same discovery as a local ingest, so bad paths are recorded with
their reasons), asks the database which files are new or changed (a killed ingest resumes where it
stopped), and at the end trains the codec if nobody did, prunes and deletes orphans. The work in
between is one Ray Data pipeline::

    from_items(files) ─► map_batches(_prepare_rows)            tasks: read, sha256, decode (CPU)
                      ─► map_batches(_EncodeAndWrite, ActorPoolStrategy(size=N))
                                   actors (num_gpus=1 each when there are GPUs): embed the new contents, commit

Each actor holds one model and one connection to the shared database and commits through the same
:class:`~semdb.ingest.writer.BatchWriter` as a local ingest: one transaction per batch under the
database's write lock, dedup by content hash, bad files recorded with their reason, and the codec
trained exactly once — by whichever writer's batch first brings ``train_size`` embeddings into the
staging table (or by the driver at the end, if fewer); every other actor then loads that codec from
the database (the broadcast) and codes its own embeddings with it. Staged embeddings are trained on
in content-hash order, so the result does not depend on which actor committed first: it is the
database a single-process ingest of the same files makes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from semdb.encoder import Encoder, OpenClipEncoder
from semdb.errors import InvalidArgumentError, SemdbError
from semdb.images import FoundFile
from semdb.ingest.pipeline import Ingestor, prepare
from semdb.ingest.report import IngestReport
from semdb.ingest.writer import BatchWriter, CodecChoice, Prepared

if TYPE_CHECKING:
    from semdb.database import Database

INSTALL_HINT = "install Ray: pip install 'semdb[ray]'"
# Logical CPUs a read-and-decode task asks for: a fraction, so that the encoder actors (which hold
# theirs for the whole run) never leave the decoding without a slot on a small cluster.
PREPARE_CPUS = 0.25


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidArgumentError(f"--ray needs Ray: {INSTALL_HINT}") from None
    return ray


def connect_cluster(address: str | None) -> Any:
    """Ray, connected to the cluster at ``address`` (``None``: ``$RAY_ADDRESS``, else a new local one).

    A cluster already connected in this process (an application's own ``ray.init``) is used as is.
    """
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as error:
            where = address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SemdbError(f"cannot connect to the Ray cluster at {where}: {message}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # semdb shows its own progress
    context.enable_auto_log_stats = False
    return ray


def _prepare_rows(batch: dict[str, np.ndarray], max_pixels: int, min_side: int | None) -> dict[str, Any]:
    """Ray Data task: read, hash and decode a batch of files → the columns the actors take.

    ``path`` holds the file system's bytes (a name need not be valid UTF-8); ``pixels`` one
    ``(h, w, 3)`` uint8 array per row, an empty ``(0, 0, 3)`` one for a file that could not be decoded.
    """
    rows: dict[str, list[Any]] = {key: [] for key in ("path", "size", "mtime_ns", "sha256", "error", "width", "height")}
    pixels: list[np.ndarray] = []
    for path, size, mtime_ns in zip(batch["path"], batch["size"], batch["mtime_ns"], strict=True):
        item = prepare(FoundFile(os.fsdecode(bytes(path)), int(size), int(mtime_ns)), max_pixels, min_side)
        rows["path"].append(bytes(path))
        rows["size"].append(int(size))
        rows["mtime_ns"].append(int(mtime_ns))
        rows["sha256"].append(item.sha256 or "")
        rows["error"].append(item.error or "")
        width, height = item.original_size or (0, 0)
        rows["width"].append(width)
        rows["height"].append(height)
        pixels.append(
            np.asarray(item.image, dtype=np.uint8) if item.image is not None else np.zeros((0, 0, 3), np.uint8)
        )
    columns: dict[str, Any] = {key: np.array(values) for key, values in rows.items()}
    columns["path"] = np.array(rows["path"], dtype=object)
    columns["pixels"] = pixels
    return columns


def _rows_to_prepared(batch: dict[str, Any]) -> list[Prepared]:
    """The actor's side of :func:`_prepare_rows`."""
    items = []
    for number, path in enumerate(batch["path"]):
        item = Prepared(os.fsdecode(bytes(path)), int(batch["size"][number]), int(batch["mtime_ns"][number]))
        item.sha256 = str(batch["sha256"][number]) or None
        item.error = str(batch["error"][number]) or None
        pixels = np.asarray(batch["pixels"][number], dtype=np.uint8)
        if item.error is None and pixels.size:
            item.image = Image.fromarray(pixels, "RGB")
            item.original_size = (int(batch["width"][number]), int(batch["height"][number]))
        items.append(item)
    return items


def _report_delta(report: IngestReport, files: int) -> str:
    return json.dumps({"files": files, **report.to_dict()})


class _EncodeAndWrite:
    """Ray Data actor: one model and one connection to the shared database; embeds and commits batches.

    A user's mistake met here (the database or the model out of this worker's reach, a refused
    write) is returned as the batch's result instead of raised, so that the driver stops with the same
    one-line error as a local ingest rather than Ray's wrapped traceback.
    """

    def __init__(
        self,
        location: str,
        encoder: Encoder | tuple[str, str | None],
        choice: CodecChoice,
        train_size: int,
        batch_size: int,
        max_pixels: int,
        threads: int | None,
    ) -> None:
        self.failure: SemdbError | None = None
        if threads:
            import torch

            torch.set_num_threads(threads)
        from semdb.database import Database
        from semdb.encoder import load_encoder

        try:
            if isinstance(encoder, tuple):
                spec, device = encoder
                encoder = load_encoder(spec, device=device, batch_size=batch_size)
            self.database = Database(location, encoder=encoder)
            writer = self.database.batch_writer(choice, train_size=train_size, report=IngestReport())
        except SemdbError as error:
            self.failure = error
            return
        self.ingestor = Ingestor(writer.store, encoder, writer, batch_size=batch_size, max_pixels=max_pixels)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.failure is not None:
            return {"report": np.array([_failure(self.failure)])}
        prepared = _rows_to_prepared(batch)
        report = IngestReport()
        self.ingestor.writer.report = self.ingestor.report = report
        try:
            # The same step as a local ingest's batch: embed only contents the database does not hold
            # yet (another actor may have stored them), then commit through the BatchWriter.
            self.ingestor._commit(prepared)
        except SemdbError as error:
            return {"report": np.array([_failure(error)])}
        return {"report": np.array([_report_delta(report, len(prepared))])}


def _failure(error: SemdbError) -> str:
    return json.dumps({"error": str(error), "error_class": type(error).__name__})


def _raise_failure(delta: dict[str, Any]) -> None:
    """Raise, in the driver, the error a worker returned (the same :mod:`semdb.errors` class)."""
    import semdb.errors

    error_class = getattr(semdb.errors, str(delta.get("error_class")), SemdbError)
    if not (isinstance(error_class, type) and issubclass(error_class, SemdbError)):
        error_class = SemdbError
    try:
        error = error_class(str(delta["error"]))
    except TypeError:
        error = SemdbError(str(delta["error"]))
    raise error


def _merge(report: IngestReport, delta: dict[str, Any]) -> None:
    for key in ("added", "unchanged", "duplicates", "updated"):
        setattr(report, key, getattr(report, key) + int(delta[key]))
    report.skipped.extend((entry["path"], entry["reason"]) for entry in delta["skipped"])
    if delta["codec_trained_on"] is not None:
        report.codec_trained_on = int(delta["codec_trained_on"])


def run_on_ray(
    database: Database,
    roots: Sequence[str],
    writer: BatchWriter,
    *,
    address: str | None,
    actors: int | None,
    batch_size: int,
    train_size: int,
    max_pixels: int,
    prune: bool,
    progress: Callable[[int], None] | None = None,
    set_total: Callable[[int], None] | None = None,
) -> IngestReport:
    """Ingest ``roots`` into ``database`` on a Ray cluster (see the module docstring); ``writer`` is the
    driver's own, for the bad paths found by the walk and the steps at the end."""
    started = time.perf_counter()
    report = writer.report
    encoder = database.encoder
    driver = Ingestor(writer.store, encoder, writer, batch_size=batch_size, max_pixels=max_pixels)
    # The walk streams as in a local ingest (unchanged files are never all held); only the files
    # to read are listed, because Ray's dataset is made from them.
    candidates = list(driver._candidates(roots, None))
    if set_total is not None:
        set_total(len(candidates))
    if candidates:
        ray = connect_cluster(address)  # only when there is work: a re-run with nothing new stays local
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if database.device in (None, "cuda") else 0
        actors = actors or max(1, gpus)
        if actors < 1:
            raise InvalidArgumentError(f"--actors must be at least 1, got {actors}")
        cpus = float(resources.get("CPU", 1))
        # A model on a CPU keeps the cores it is given busy: share the cluster's between the actors.
        actor_cpus = 1.0 if gpus else max(0.25, min(1.0, (cpus - PREPARE_CPUS) / actors))
        threads = None if gpus else max(1, int(cpus // actors))
        # A user's own encoder object (an application's, or a test's fake) is shipped as it is; an
        # open_clip model is loaded by each actor from its spec, on the actor's device.
        source: Encoder | tuple[str, str | None] = (
            (encoder.spec, database.device) if isinstance(encoder, OpenClipEncoder) else encoder
        )
        dataset = ray.data.from_items(
            [{"path": os.fsencode(item.path), "size": item.size, "mtime_ns": item.mtime_ns} for item in candidates],
            # A block per batch (up to a bound), so that every actor of the pool gets work from the start.
            override_num_blocks=max(1, min(-(-len(candidates) // batch_size), 1000)),
        )
        dataset = dataset.map_batches(
            _prepare_rows,
            batch_size=batch_size,
            batch_format="numpy",
            fn_kwargs={"max_pixels": max_pixels, "min_side": driver.min_side},
            num_cpus=PREPARE_CPUS,
        )
        dataset = dataset.map_batches(
            _EncodeAndWrite,
            batch_size=batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "location": database.url or os.path.abspath(str(database.path)),
                "encoder": source,
                "choice": writer.choice,
                "train_size": train_size,
                "batch_size": batch_size,
                "max_pixels": max_pixels,
                "threads": threads,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus,
            num_gpus=1 if gpus else 0,
        )
        for row in dataset.iter_rows():
            delta = json.loads(str(row["report"]))
            if "error" in delta:
                _raise_failure(delta)
            _merge(report, delta)
            if progress is not None:
                progress(int(delta["files"]))
    writer.finish_training()
    if prune:
        driver._prune(roots)
    writer.delete_orphans()
    if report.codec_trained_on is not None:
        writer.store.compact()
    report.seconds = time.perf_counter() - started
    return report
