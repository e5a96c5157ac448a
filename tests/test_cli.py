"""The ``semdb`` CLI: help on every command, and end-to-end runs as a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_colour_images

from semdb.cli import build_parser


def run_semdb(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a fresh interpreter, offline."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "semdb.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_every_command_has_help_with_an_example() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) >= {"ingest", "search", "stats", "demo", "eval"}
    assert "example" in parser.format_help()
    for name, command in subparsers.choices.items():
        text = command.format_help()
        assert "example" in text and f"semdb {name}" in text, name


@pytest.mark.slow
def test_ingest_search_stats_end_to_end(tmp_path: Path, tiny_model_spec: str) -> None:
    images = tmp_path / "images"
    write_colour_images(images, per_colour=4)
    (images / "broken.jpg").write_text("not an image")
    db = str(tmp_path / "photos.semdb")

    ingest = run_semdb("ingest", str(images), "--db", db, "--model", tiny_model_spec, "--bits", "32", "--json")
    assert ingest.returncode == 0, ingest.stderr
    report = json.loads(ingest.stdout)
    assert report["added"] == 20
    assert [Path(item["path"]).name for item in report["skipped"]] == ["broken.jpg"]

    stats = json.loads(run_semdb("stats", "--db", db, "--json").stdout)
    assert {"images", "skipped", "bits_per_image", "model", "codec"} <= set(stats)
    assert (stats["images"], stats["skipped"], stats["bits_per_image"], stats["codec"]) == (20, 1, 32, "pq")
    assert stats["model"] == tiny_model_spec

    search = run_semdb("search", "a red square", "--db", db, "-k", "5", "--json")
    assert search.returncode == 0, search.stderr
    hits = json.loads(search.stdout)
    assert len(hits) == 5 and all({"path", "score"} <= set(hit) for hit in hits)
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    exact = json.loads(run_semdb("search", "a red square", "--db", db, "-k", "5", "--json", "--exact").stdout)
    assert exact == hits  # 20 images: the exact scan is the only scan

    query = images / "green_0.png"
    by_image = json.loads(run_semdb("search", "--image", str(query), "--db", db, "-k", "4", "--json").stdout)
    # Even a random network maps the four near-identical green squares closest to each other.
    assert {Path(hit["path"]).name for hit in by_image} == {f"green_{i}.png" for i in range(4)}

    # The human-readable form prints a table (piped, the default is one path per line), and
    # SEMDB_DB stands in for --db.
    table = run_semdb("search", "a red square", "-k", "2", "--format", "table", env={"SEMDB_DB": db})
    assert table.returncode == 0 and "score" in table.stdout
    piped = run_semdb("search", "a red square", "-k", "2", env={"SEMDB_DB": db})
    assert piped.stdout.splitlines() == [hit["path"] for hit in hits[:2]]

    again = json.loads(run_semdb("ingest", str(images), "--db", db, "--json").stdout)
    assert (again["added"], again["unchanged"], len(again["skipped"])) == (0, 20, 1)


@pytest.mark.slow
def test_user_mistakes_are_one_line_errors(tmp_path: Path, tiny_model_spec: str) -> None:
    images = tmp_path / "images"
    write_colour_images(images, per_colour=1)
    db = str(tmp_path / "photos.semdb")
    assert_one_line_error(run_semdb("search", "x", "--db", str(tmp_path / "nope.semdb")), "does not exist")
    assert_one_line_error(run_semdb("stats", "--db", str(tmp_path / "nope.semdb")), "does not exist")
    assert_one_line_error(
        run_semdb("ingest", str(images), "--db", db, "--model", tiny_model_spec, "--bits", "12"), "multiple of 8"
    )
    assert not Path(db).exists() or run_semdb("stats", "--db", db, "--json").returncode == 0
    assert run_semdb("ingest", str(images), "--db", db, "--model", tiny_model_spec, "--quiet").returncode == 0
    assert_one_line_error(run_semdb("search", "x", "--db", db, "--model", "RN50:openai"), "built with model")
    assert_one_line_error(run_semdb("search", "--image", str(tmp_path / "missing.png"), "--db", db), "cannot read")
    # The database codes at the default 64 bits: another rate is refused.
    assert_one_line_error(run_semdb("ingest", str(images), "--db", db, "--bits", "128"), "bits per image")
    assert_one_line_error(
        run_semdb("ingest", str(images), "--db", str(tmp_path / "x.semdb"), "--model", "nonsense:foo"),
        "unknown open_clip architecture",
    )
    usage = run_semdb("search", "x", "-k", "zero", "--db", db)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    # Nothing committed was lost along the way.
    assert json.loads(run_semdb("stats", "--db", db, "--json").stdout)["images"] == 5


@pytest.mark.slow
def test_sigkilled_ingest_resumes_without_loss_or_duplicates(tmp_path: Path, tiny_model_spec: str) -> None:
    images = tmp_path / "images"
    labels = write_colour_images(images, per_colour=60, size=48)  # 300 files
    db = tmp_path / "photos.semdb"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "semdb.cli",
        "ingest",
        str(images),
        "--db",
        str(db),
        "--model",
        tiny_model_spec,
        "--bits",
        "32",
        "--batch-size",
        "8",
        "--quiet",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def committed() -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
                return int(connection.execute("SELECT count(*) FROM images").fetchone()[0])
        except sqlite3.Error:
            return 0

    deadline = time.monotonic() + 300
    while committed() < 40 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "ingest finished before it could be killed; make the corpus larger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = committed()
    assert 40 <= before < len(labels)

    resumed = run_semdb("ingest", str(images), "--db", str(db), "--json")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["unchanged"] >= before and report["added"] + report["unchanged"] == len(labels)

    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert connection.execute("SELECT count(*), count(DISTINCT path) FROM images").fetchone() == (300, 300)
        assert connection.execute("SELECT count(*) FROM codes").fetchone()[0] == 300
        assert connection.execute("SELECT count(*) FROM staged").fetchone()[0] == 0
        assert connection.execute("SELECT count(DISTINCT length(code)) FROM codes").fetchone()[0] == 1
    stats = json.loads(run_semdb("stats", "--db", str(db), "--json").stdout)
    assert (stats["images"], stats["skipped"]) == (300, 0)
