"""Rich progress bars on stderr for long-running work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr_console = Console(stderr=True)


@contextmanager
def ingest_progress() -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A progress bar for an ingest: yields ``(advance(n), set_total(n))``."""
    columns = (
        TextColumn("[bold]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("files"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr_console, transient=False) as progress:
        task = progress.add_task("ingest", total=None)

        def advance(count: int) -> None:
            progress.advance(task, count)

        def set_total(total: int) -> None:
            # Nothing new to read (a re-run over unchanged files): no empty "0/0" bar.
            progress.update(task, total=total, visible=total > 0)

        yield advance, set_total
