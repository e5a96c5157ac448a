"""End to end through the real CLI with the bundled model, offline: ``semdb demo`` and ``semdb search``.

Searches run over the codes of semdb's default codec (64-bit PQ for the bundled model's
low-dimensional embeddings and a collection this small), so these check what users get, compression included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from semdb import fashion_mnist
from semdb.demo import label_from_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
        reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
    ),
]

COUNT = 400
# Wordings held out of the bundled model's training captions, with their Fashion-MNIST label.
HELD_OUT = (
    ("khaki chinos", 1),
    ("a knitted sweater", 2),
    ("a leather purse", 8),
    ("a suede bootie", 9),
)


def run_semdb(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI in a fresh interpreter, with networking disabled for Hugging Face."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "semdb.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def first_run(demo_dir: Path) -> dict:
    result = run_semdb("demo", "--count", str(COUNT), "--json", cwd=demo_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_demo_writes_ingests_and_answers(first_run: dict, demo_dir: Path) -> None:
    pngs = sorted((demo_dir / "semdb-demo" / "images").rglob("*.png"))
    assert len(pngs) == COUNT == first_run["images_written"]
    assert {label_from_path(path) for path in pngs} == set(range(10))
    assert first_run["ingest"]["added"] == COUNT and not first_run["ingest"]["skipped"]
    database = first_run["database"]
    assert database["bits_per_image"] == 64 and database["codec"] == "pq"
    report = database["codec_report"]
    assert report["chosen_by"] == "default" and f"only {COUNT * 4 // 5} images" in report["why"]
    assert report["fidelity"]["held_out"] == COUNT // 5 and 0 < report["fidelity"]["image_to_image"] <= 1
    queries = first_run["queries"]
    assert all(len(query["hits"]) == 10 for query in queries)
    for query in queries:
        right = sum(hit["label"] == query["expected"] for hit in query["hits"])
        assert query["precision_at_10"] == right / 10
    assert first_run["mean_precision_at_10"] >= 0.8, [(q["query"], q["precision_at_10"]) for q in queries]


def test_demo_rerun_skips_what_is_done(first_run: dict, demo_dir: Path) -> None:
    result = run_semdb("demo", "--count", str(COUNT), "--json", cwd=demo_dir)
    assert result.returncode == 0, result.stderr
    rerun = json.loads(result.stdout)
    assert rerun["images_written"] == 0
    assert rerun["ingest"]["added"] == 0 and rerun["ingest"]["unchanged"] == COUNT
    assert [q["hits"] for q in rerun["queries"]] == [q["hits"] for q in first_run["queries"]]


def test_demo_table_output(first_run: dict, demo_dir: Path) -> None:
    result = run_semdb("demo", "--count", str(COUNT), cwd=demo_dir)
    assert result.returncode == 0, result.stderr
    assert f"mean precision@10: {first_run['mean_precision_at_10']:.2f}" in result.stdout
    assert "64-bit codes" in result.stdout and "Ankle boot" in result.stdout


@pytest.mark.parametrize(("query", "label"), HELD_OUT)
def test_search_held_out_wordings_on_codes(first_run: dict, demo_dir: Path, query: str, label: int) -> None:
    database = demo_dir / "semdb-demo" / "demo.semdb"
    result = run_semdb("search", query, "--db", str(database), "-k", "10", "--json", cwd=demo_dir)
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert len(hits) == 10
    right = sum(label_from_path(hit["path"]) == label for hit in hits)
    assert right >= 7, (query, [hit["path"] for hit in hits])


def test_demo_without_the_data_set_says_what_to_install(tmp_path: Path) -> None:
    env = {**os.environ, fashion_mnist.ENV_VAR: str(tmp_path / "nowhere")}
    result = subprocess.run(
        [sys.executable, "-m", "semdb.cli", "demo", "--count", "20"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0], result.stderr
    assert not (tmp_path / "semdb-demo" / "demo.semdb").exists()
