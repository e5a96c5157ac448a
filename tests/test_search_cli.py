"""``semdb search`` habits with the bundled model: output formats, filters, the text tower alone
on the text path; ``semdb --version`` and ``semdb models``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import semdb
from semdb import fashion_mnist
from semdb.cli import main
from semdb.demo import write_images
from semdb.encoder import load_encoder
from semdb.text_tower import MiniLMTextEncoder

pytestmark = pytest.mark.skipif(
    not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
TEXTS = ["a pair of trousers", "  An  ANKLE boot &amp; more ", "word " * 100, "", "Ünïcödé — “quoted” tee"]


def run_semdb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "semdb.cli", *args], capture_output=True, text=True, env=full_env, timeout=600
    )


@pytest.fixture(scope="module")
def fashion_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """100 Fashion-MNIST test images (10 a class) ingested with tiny-fashion at 128 bits."""
    root = tmp_path_factory.mktemp("fashion")
    write_images(root / "images", 100)
    with semdb.connect(root / "db.semdb", model="tiny-fashion", bits=128) as db:
        db.ingest(root / "images")
    return root / "db.semdb", root / "images"


def test_text_tower_alone_equals_the_full_model() -> None:
    alone = MiniLMTextEncoder().encode_texts(TEXTS)
    full = load_encoder("tiny-fashion", device="cpu").encode_texts(TEXTS)
    assert alone.shape == full.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(alone, full, atol=1e-5)


@pytest.mark.slow
def test_text_search_loads_neither_torch_nor_open_clip(fashion_db: tuple[Path, Path]) -> None:
    db, _ = fashion_db
    code = (
        "import sys\nfrom semdb.cli import main\n"
        f"rc = main(['search', 'a pair of trousers', '--db', {str(db)!r}, '-k', '3'])\n"
        "heavy = [m for m in ('torch', 'torchvision', 'open_clip', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr
    assert [Path(line).parent.name for line in result.stdout.splitlines()] == ["trouser"] * 3


@pytest.mark.slow
def test_output_formats_never_truncate(fashion_db: tuple[Path, Path]) -> None:
    db, _ = fashion_db
    piped = run_semdb("search", "an ankle boot", "--db", str(db), "-k", "5")
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.splitlines()
    assert len(lines) == 5 and all(Path(line).is_file() for line in lines)
    assert sum(Path(line).parent.name == "ankle-boot" for line in lines) >= 4

    as_json = json.loads(run_semdb("search", "an ankle boot", "--db", str(db), "-k", "5", "--json").stdout)
    assert [hit["path"] for hit in as_json] == lines
    assert json.loads(run_semdb("search", "an ankle boot", "--db", str(db), "-k", "5", "--format", "json").stdout)

    narrow = run_semdb(
        "search", "an ankle boot", "--db", str(db), "-k", "5", "--format", "table", env={"COLUMNS": "40"}
    )
    assert narrow.returncode == 0, narrow.stderr
    flat = re.sub(r"[\s│┃|]", "", narrow.stdout)
    assert all(re.sub(r"\s", "", line) in flat for line in lines), narrow.stdout
    assert "…" not in narrow.stdout


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in this process (the model stays loaded between calls): exit code, stdout, stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_filters_and_terms_on_the_command_line(fashion_db: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    db, images = fashion_db
    code, out, err = cli(
        capsys, "search", "an ankle boot", "--db", str(db), "-k", "20", "--under", str(images / "trouser")
    )
    assert code == 0, err
    assert {Path(line).parent.name for line in out.splitlines()} == {"trouser"}
    assert len(out.splitlines()) == 10  # all ten of the folder, however badly they match

    hits = json.loads(cli(capsys, "search", "a handbag", "--db", str(db), "-k", "3", "--json")[1])
    like = json.loads(cli(capsys, "search", "--like", str(hits[0]["id"]), "--db", str(db), "-k", "3", "--json")[1])
    assert like[0]["id"] == hits[0]["id"]
    assert json.loads(cli(capsys, "search", f"id:{hits[0]['id']}", "--db", str(db), "-k", "3", "--json")[1]) == like
    threshold = str(hits[2]["score"])
    cut = json.loads(
        cli(capsys, "search", "a handbag", "--db", str(db), "-k", "50", "--min-score", threshold, "--json")[1]
    )
    # Every hit of the uncut top 50 that scores at least the threshold (ties with the third included).
    top = json.loads(cli(capsys, "search", "a handbag", "--db", str(db), "-k", "50", "--json")[1])
    assert [hit["id"] for hit in cut] == [hit["id"] for hit in top if hit["score"] >= hits[2]["score"]]
    code, out, _ = cli(capsys, "search", "--image", hits[0]["path"], "--db", str(db), "-k", "1")
    assert code == 0 and out.strip() == hits[0]["path"]

    code, _, err = cli(capsys, "search", "--db", str(db))
    assert code == 1 and "give search TEXT" in err
    code, _, err = cli(capsys, "search", "bag", "--db", str(db), "--after", "soon")
    assert code == 1 and "not a date" in err and len(err.splitlines()) == 1


def test_version_and_models(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out.strip() == f"semdb {semdb.__version__}"
    code, out, err = cli(capsys, "models", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert listed[0] == {"spec": "tiny-fashion", "where": "bundled (offline)"}
    assert "ViT-B-32:laion2b_s34b_b79k" in {model["spec"] for model in listed}
