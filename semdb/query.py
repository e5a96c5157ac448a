"""One query type for every interface: the Python API, the CLI and the web server.

A :class:`Query` is a weighted sum of *terms* — a text, an image file (or a decoded picture), an
image already in the database (searched by its stored code, decoded by the codec that made it, never
by re-reading the file), or a ready-made vector — plus *filters* (folder, modification dates, pixel
size, a score cut-off), ``limit`` and ``offset``. Negative weights mean "not": the query vector is
``normalise(Σ wᵢ·tᵢ)`` over the unit-norm term vectors, as rclip combines ``cat + dog - grass``.

The shape follows LanceDB (``table.search(q).where(...).limit(k).to_list()``): each builder step
returns a new query, and nothing runs until :meth:`Query.results`::

    db.query("a dog").under("~/Pictures/2023").min_size(640).limit(20).results()

llm's ``collection.similar(text, number=)`` / ``similar_by_id(id)`` is the one-call form, which
:meth:`~semdb.database.Database.search` keeps (``db.search("a dog", k=20, under=...)``), and
``similar_by_id`` is :meth:`Query.like`. Row filters become the sorted ``allowed`` ids that the
index restricts its FAISS scan to; the score cut-off trims the best-first list afterwards.

The string form, shared by ``semdb search`` and the page's search box (:func:`parse`)::

    red dress + 0.5:beach - night        terms joined by " + " / " - " (spaces around the sign)
    2:sneaker                            a weight before a colon
    id:42                                the database's image 42 ("more like this")
    ./query.jpg                          an image file (only where files may be read: the CLI)
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from semdb.arguments import MAX_INTEGER, real_number, whole_number
from semdb.arguments import image_id as checked_image_id
from semdb.errors import InvalidArgumentError

if TYPE_CHECKING:
    from PIL import Image

    from semdb.database import Database, SearchResult

TermKind = Literal["text", "image", "id", "vector"]
MAX_LIMIT = 1000
MAX_TERMS = 16
MAX_FOLDERS = 64  # each folder is a range test in SQL; SQLite refuses expressions nested 1,000 deep
_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*:\s*(.*)$", re.DOTALL)
_OPERATOR = re.compile(r"\s+([+-])\s+")
_IMAGE_ID = re.compile(r"^id:(\d+)$")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif", ".jxl")


@dataclass(frozen=True)
class Term:
    """One part of a query: ``kind`` and ``value`` (text ``str``; image path ``str`` or PIL image;
    stored image id ``int``; vector ``(d,)`` float32), with its ``weight`` (negative: "not")."""

    kind: TermKind
    value: Any
    weight: float = 1.0

    def describe(self) -> str:
        """A short readable form, e.g. ``-0.5 × "night"``."""
        shown = {
            "text": lambda: f"“{self.value}”",
            "image": lambda: str(self.value) if isinstance(self.value, str) else "an uploaded image",
            "id": lambda: f"image {self.value}",
            "vector": lambda: f"a {len(self.value)}-d vector",
        }[self.kind]()
        return shown if self.weight == 1 else f"{self.weight:g} × {shown}"


@dataclass(frozen=True)
class Filters:
    """Which images may be returned. ``under``: folders (any of them); ``modified_after`` ≤ mtime <
    ``modified_before``; ``min_width``/``min_height`` in pixels; ``min_score``: drop weaker hits."""

    under: tuple[str, ...] = ()
    modified_after: datetime | None = None
    modified_before: datetime | None = None
    min_width: int | None = None
    min_height: int | None = None
    min_score: float | None = None

    @property
    def restricts_rows(self) -> bool:
        """Whether any filter other than the score cut-off is set (they need ids from the store)."""
        return bool(self.under) or any(
            value is not None for value in (self.modified_after, self.modified_before, self.min_width, self.min_height)
        )


@dataclass(frozen=True)
class Timings:
    """Where one query's time went, in milliseconds: encoding the terms, the store filters, FAISS
    and the paths lookup (``search``), and the whole :meth:`Query.page` call."""

    encode_ms: float
    filter_ms: float
    search_ms: float
    total_ms: float


@dataclass(frozen=True)
class ResultPage:
    """One page of results, best first; ``more``: whether a next page (``offset + limit``) has any."""

    results: list[SearchResult]
    more: bool
    timings: Timings


@dataclass(frozen=True)
class Query:
    """An immutable query (see the module docstring); builder methods return changed copies."""

    terms: tuple[Term, ...] = ()
    filters: Filters = Filters()
    k: int = 10
    start: int = 0
    exhaustive: bool = False
    database: Database | None = field(default=None, compare=False, repr=False)

    # --- terms ----------------------------------------------------------------------------------

    def _with(self, term: Term) -> Query:
        if not np.isfinite(term.weight) or term.weight == 0:
            raise InvalidArgumentError(f"a term's weight must be a non-zero number, got {term.weight}")
        if len(self.terms) >= MAX_TERMS:
            raise InvalidArgumentError(f"a query has at most {MAX_TERMS} terms")
        return dataclasses.replace(self, terms=(*self.terms, term))

    def text(self, text: str, weight: float = 1.0) -> Query:
        """Add a text term."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"a text query is a str, got {type(text).__name__}: {text!r:.60}")
        if not text.strip():
            raise InvalidArgumentError("empty query: give some text to search for")
        return self._with(Term("text", text, real_number(weight, "a term's weight")))

    def image(self, image: str | os.PathLike[str] | Image.Image, weight: float = 1.0) -> Query:
        """Add an image term: a file path, or an already decoded PIL image (an upload)."""
        from PIL import Image

        if not isinstance(image, str | os.PathLike | Image.Image):
            raise InvalidArgumentError(f"an image term is a file path or a PIL image, got {type(image).__name__}")
        value = os.fspath(image) if isinstance(image, str | os.PathLike) else image
        return self._with(Term("image", value, real_number(weight, "a term's weight")))

    def like(self, image_id: int, weight: float = 1.0) -> Query:
        """Add the database's image ``image_id`` ("more like this"), by its stored code."""
        return self._with(Term("id", checked_image_id(image_id), real_number(weight, "a term's weight")))

    def vector(self, vector: np.ndarray, weight: float = 1.0) -> Query:
        """Add a ready-made embedding ``(d,)`` float32 (normalised here)."""
        try:
            array = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"a query vector is an array of numbers, got {type(vector).__name__}") from None
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 1:
            raise InvalidArgumentError(f"a query vector is one (d,) embedding, got shape {array.shape}")
        if not np.isfinite(array).all() or not np.linalg.norm(array) > 0:
            raise InvalidArgumentError("a query vector must be finite and non-zero")
        return self._with(Term("vector", array, real_number(weight, "a term's weight")))

    def parse(self, expression: str, *, allow_paths: bool = True) -> Query:
        """Add the terms of a query string (see :func:`parse_terms`)."""
        if not isinstance(expression, str):
            raise InvalidArgumentError(f"a query is a str, got {type(expression).__name__}: {expression!r:.60}")
        query = self
        for term in parse_terms(expression, allow_paths=allow_paths):
            query = query._with(term)
        return query

    # --- filters, paging ------------------------------------------------------------------------

    def _filter(self, **changes: Any) -> Query:
        return dataclasses.replace(self, filters=dataclasses.replace(self.filters, **changes))

    def under(self, *folders: str | os.PathLike[str]) -> Query:
        """Only images in one of ``folders`` (at any depth); ``~`` is expanded."""
        for folder in folders:
            if not isinstance(folder, str | os.PathLike):
                raise InvalidArgumentError(f"a folder to search under is a path, got {type(folder).__name__}")
        resolved = tuple(os.path.abspath(os.path.expanduser(os.fspath(folder))) for folder in folders if folder)
        if len(self.filters.under) + len(resolved) > MAX_FOLDERS:
            raise InvalidArgumentError(f"search under at most {MAX_FOLDERS} folders at once: give their parent instead")
        return self._filter(under=(*self.filters.under, *resolved))

    def modified(self, after: str | date | None = None, before: str | date | None = None) -> Query:
        """Only files modified at or after ``after`` and before ``before`` (ISO dates or datetimes;
        a bare date as ``before`` includes that whole day)."""
        low = as_datetime(after, "after") if after is not None else self.filters.modified_after
        high = as_datetime(before, "before", end_of_day=True) if before is not None else self.filters.modified_before
        if low is not None and high is not None and low >= high:
            raise InvalidArgumentError(f"modified after {low:%Y-%m-%d %H:%M} and before {high:%Y-%m-%d %H:%M}: empty")
        return self._filter(modified_after=low, modified_before=high)

    def min_size(self, width: int | None = None, height: int | None = None) -> Query:
        """Only images at least ``width`` pixels wide and ``height`` high."""
        checked = [
            None if value is None else whole_number(value, f"the minimum {name} in pixels", low=1)
            for name, value in (("width", width), ("height", height))
        ]
        return self._filter(min_width=checked[0], min_height=checked[1])

    def min_score(self, score: float) -> Query:
        """Only hits scoring at least ``score`` (cosine, −1..1)."""
        cut = real_number(score, "a score threshold")
        if not -1.0 <= cut <= 1.0:
            raise InvalidArgumentError(f"a score threshold is a cosine between -1 and 1, got {score}")
        return self._filter(min_score=cut)

    def limit(self, k: int) -> Query:
        """At most ``k`` results (1..:data:`MAX_LIMIT`)."""
        return dataclasses.replace(self, k=whole_number(k, "the limit (results per page)", low=1, high=MAX_LIMIT))

    def offset(self, start: int) -> Query:
        """Skip the ``start`` best results (the next page)."""
        return dataclasses.replace(self, start=whole_number(start, "the offset", low=0, high=100 * MAX_LIMIT))

    def exact(self, exhaustive: bool = True) -> Query:
        """Ask the index for an exhaustive scan (approximate indexes otherwise probe a few lists)."""
        return dataclasses.replace(self, exhaustive=exhaustive)

    # --- running --------------------------------------------------------------------------------

    def on(self, database: Database) -> Query:
        """This query bound to ``database`` (what :meth:`results` runs against)."""
        return dataclasses.replace(self, database=database)

    def page(self) -> ResultPage:
        """Run the query: the page of results, whether more follow, and the timings."""
        if self.database is None:
            raise InvalidArgumentError("this query is bound to no database: use db.query(...) or query.on(db)")
        return run(self.database, self)

    def results(self) -> list[SearchResult]:
        """Run the query: its results, best first."""
        return self.page().results

    def describe(self) -> str:
        """The terms, readable: ``“red dress” + 0.5 × “beach”``."""
        return " + ".join(term.describe() for term in self.terms).replace("+ -", "- ")


def as_datetime(value: str | date, name: str, *, end_of_day: bool = False) -> datetime:
    """An ISO date or datetime (naive: local time) → aware datetime; a bare date as ``before`` with
    ``end_of_day`` is the next midnight, so that the day itself is included."""
    if isinstance(value, datetime):
        moment, whole_day = value, False
    elif isinstance(value, date):
        moment, whole_day = datetime(value.year, value.month, value.day), True
    elif isinstance(value, str):
        text = value.strip()
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidArgumentError(
                f"modified {name} {value!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
            ) from None
        whole_day = len(text) == 10
    else:
        raise InvalidArgumentError(f"modified {name} is a date (YYYY-MM-DD or a date object), got {value!r}")
    try:
        if end_of_day and whole_day:
            # The next midnight; the last day there is (9999-12-31) ends at its last microsecond.
            last_day = moment.date() == date.max
            moment = datetime.combine(moment, datetime.max.time()) if last_day else moment + timedelta(days=1)
        return moment if moment.tzinfo is not None else moment.astimezone()
    except (OverflowError, ValueError, OSError):  # astimezone of a date at either end of the calendar
        raise InvalidArgumentError(f"modified {name} {value!r} is out of the range of file times") from None


def parse_terms(expression: str, *, allow_paths: bool = True) -> list[Term]:
    """A query string → its terms (see the module docstring).

    Terms are joined by ``+`` or ``-`` with spaces around them (so ``t-shirt`` stays one word); a
    leading ``WEIGHT:`` scales a term; ``id:N`` is a stored image; with ``allow_paths``, a term that
    names an image file (by its suffix, and existing or written as a path) is that image. The web
    server parses with ``allow_paths=False``: a request never makes it read a file by name.
    """
    pieces = _OPERATOR.split(" " + expression.strip() + " ")
    # split() gives [first, sign, term, sign, term, ...]; the first term has an implied "+".
    signed = [("+", pieces[0]), *zip(pieces[1::2], pieces[2::2], strict=True)]
    terms = []
    for index, (sign, raw) in enumerate(signed):
        text = raw.strip()
        if not text:
            if sign == "-" or len(signed) > 1:
                # The first term's sign is implied: name the operator that stands next to it.
                operator = sign if index else signed[1][0]
                hint = " (a query cannot start with '-': write 'dress - red')" if operator == "-" and not index else ""
                raise InvalidArgumentError(f"query {expression!r} has an empty term around {operator!r}{hint}")
            continue
        weight = 1.0
        match = _WEIGHT.match(text)
        if match:
            weight, text = float(match.group(1)), match.group(2).strip()
            if not text:
                raise InvalidArgumentError(f"query {expression!r}: weight {weight:g} is given to nothing")
        if sign == "-":
            weight = -weight
        if weight == 0:
            raise InvalidArgumentError(f"query {expression!r}: a weight of 0 is no term; remove it")
        stored = _IMAGE_ID.match(text)
        if stored:
            terms.append(Term("id", int(stored.group(1)), weight))
        elif allow_paths and _looks_like_image_file(text):
            terms.append(Term("image", os.path.expanduser(text), weight))
        else:
            terms.append(Term("text", text, weight))
    if not terms:
        raise InvalidArgumentError("empty query: give some text to search for")
    if len(terms) > MAX_TERMS:
        raise InvalidArgumentError(f"a query has at most {MAX_TERMS} terms, this one has {len(terms)}")
    return terms


def _looks_like_image_file(text: str) -> bool:
    if not text.lower().endswith(_IMAGE_SUFFIXES):
        return False
    return text.startswith(("/", "./", "../", "~")) or os.path.exists(text)


# --- running a query against a database ---------------------------------------------------------


def query_vector(database: Database, terms: Sequence[Term]) -> np.ndarray:
    """The terms' weighted sum, normalised: ``(1, d)`` float32. Texts are encoded in one batch."""
    if not terms:
        raise InvalidArgumentError("empty query: give a text, an image or an image id to search by")
    texts = [term.value for term in terms if term.kind == "text"]
    encoded = iter(database.text_encoder.encode_texts(texts)) if texts else iter(())
    vectors: list[np.ndarray] = []
    for term in terms:  # in order, so that each text takes its own row of the batch
        if term.kind == "text":
            vectors.append(next(encoded))
        elif term.kind == "image":
            vectors.append(database.image_vector(term.value))
        elif term.kind == "id":
            vectors.append(database.stored_vector(term.value))
        else:
            vectors.append(term.value)
    dims = {len(vector) for vector in vectors}
    if len(dims) != 1:
        raise InvalidArgumentError(f"query terms have different dimensions {sorted(dims)}; the model's is needed")
    total = np.zeros(dims.pop(), dtype=np.float64)
    for term, vector in zip(terms, vectors, strict=True):
        total += term.weight * vector.astype(np.float64) / max(float(np.linalg.norm(vector)), 1e-12)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise InvalidArgumentError("the query's terms cancel out: change a weight or remove a term")
    return (total / norm).astype(np.float32)[None, :]


def allowed_ids(database: Database, filters: Filters) -> np.ndarray | None:
    """The sorted ``(m,)`` int64 ids passing the row filters, from the store; None: no row filter."""
    if not filters.restricts_rows:
        return None
    return database.filtered_ids(
        under=filters.under,
        modified_after_ns=_ns(filters.modified_after),
        modified_before_ns=_ns(filters.modified_before),
        min_width=filters.min_width,
        min_height=filters.min_height,
    )


def _ns(moment: datetime | None) -> int | None:
    """Nanoseconds since the epoch, as file times are stored; clamped to 64 bits (years 1677–2262),
    beyond which no file time lies, so that a bound at either end of the calendar means "no bound"."""
    if moment is None:
        return None
    return max(-MAX_INTEGER - 1, min(MAX_INTEGER, round(moment.timestamp() * 1e9)))


def run(database: Database, query: Query) -> ResultPage:
    """Run ``query`` on ``database``: encode, filter in the store, search inside FAISS, cut, page."""
    started = time.perf_counter()
    vector = query_vector(database, query.terms)
    encoded = time.perf_counter()
    allowed = allowed_ids(database, query.filters)
    filtered = time.perf_counter()
    wanted = query.start + query.k + 1  # one more than the page shows whether a next page exists
    if allowed is not None and len(allowed) == 0:
        hits: list[SearchResult] = []
    else:
        # Only images (files, or stored ones by id) in the query: it is an image query, scored through
        # the codec's item path where it has one; a query with any text in it is a text query.
        images_only = all(term.kind in ("image", "id") for term in query.terms)
        hits = database.search_vectors(
            vector, wanted, allowed=allowed, exact=query.exhaustive, image_queries=images_only
        )[0]
    searched = time.perf_counter()
    cut = query.filters.min_score
    if cut is not None:
        kept = [hit for hit in hits if hit.score >= cut]
        more = False if len(kept) < len(hits) else len(kept) > query.start + query.k
        hits = kept
    else:
        more = len(hits) > query.start + query.k
    page = hits[query.start : query.start + query.k]
    done = time.perf_counter()
    timings = Timings(
        encode_ms=(encoded - started) * 1e3,
        filter_ms=(filtered - encoded) * 1e3,
        search_ms=(searched - filtered) * 1e3,
        total_ms=(done - started) * 1e3,
    )
    return ResultPage(page, more, timings)
