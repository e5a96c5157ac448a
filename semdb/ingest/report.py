"""What an ingest run did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IngestReport:
    """Counts of what an ingest run did, and every file it skipped with the reason."""

    added: int = 0
    unchanged: int = 0
    duplicates: int = 0
    updated: int = 0
    pruned: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    codec_trained_on: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {
            "added": self.added,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "updated": self.updated,
            "pruned": self.pruned,
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
            "codec_trained_on": self.codec_trained_on,
            "seconds": round(self.seconds, 3),
        }
