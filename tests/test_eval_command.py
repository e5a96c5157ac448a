"""``semdb eval`` on a tiny generated data set, with the fake encoder standing in for a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FakeEncoder, write_colour_images

import semdb.encoder
from semdb import eval_command
from semdb.cli import main
from semdb.errors import DatasetMissingError, InvalidArgumentError


@pytest.fixture
def data_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """``(test, train)`` folders of colour images, the test one with one sub-folder per colour."""
    encoders: list[FakeEncoder] = []

    def fake_load_encoder(spec: str, **_: object) -> FakeEncoder:
        encoders.append(FakeEncoder())
        return encoders[-1]

    monkeypatch.setattr(semdb.encoder, "load_encoder", fake_load_encoder)
    monkeypatch.setattr(eval_command, "_encoders", {})
    test, train = tmp_path / "test", tmp_path / "train"
    for path, colour in write_colour_images(tmp_path / "flat", per_colour=4, seed=1).items():
        target = test / colour / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        Path(path).rename(target)
    write_colour_images(train, per_colour=8, seed=2)
    (test / "red" / "broken.png").write_bytes(b"not an image")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")  # rich's table width when stderr is not a terminal
    return test, train


def test_eval_prints_a_complete_table_and_json(
    data_sets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test, train = data_sets
    plot = tmp_path / "curves.png"
    argv = ["eval", str(test), "--train", str(train), "--codec", "pq,rq,pqvae,pqvae-pca,pcapq", "--bits", "8,16"]
    assert main([*argv, "--json", "--plot", str(plot)]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [(row["codec"], row["bits"]) for row in rows] == [
        ("float", None),
        *[(codec, bits) for codec in ("pq", "rq", "pqvae", "pqvae-pca", "pcapq") for bits in (8, 16)],
    ]
    for row in rows:
        assert 0 <= row["zero_shot"] <= 1 and 0 <= row["map100"] <= 1 and 0 <= row["recall10"] <= 1
        assert row["bpp_224"] == pytest.approx(row["bits_per_image"] / 224**2)
    assert rows[0]["zero_shot"] == 1.0  # colours are separable for the fake encoder
    assert rows[0]["bits_per_image"] == 32 * 32
    assert "pqvae" in err and "broken.png" in err and "zero-shot" in err
    assert plot.stat().st_size > 0

    # The second run reads the cached embeddings: no image is encoded again.
    eval_command._encoders.clear()
    assert main([*argv[:4], "--codec", "pq", "--bits", "8,16", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [{**row, "train_seconds": 0} for row in again] == [{**row, "train_seconds": 0} for row in rows[:3]]
    assert [encoder.images_encoded for encoder in eval_command._encoders.values()] == [0]


def test_query_weighted_eval_uses_the_training_classes(
    data_sets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test, flat_train = data_sets
    with pytest.raises(InvalidArgumentError, match="no class sub-folders"):
        eval_command.run(eval_command_args([str(test), "--train", str(flat_train), "--query-weighted"]))
    # A training set of its own three classes (the fake encoder tells only colour words apart).
    train = tmp_path / "train_classes"
    for number, path in enumerate(sorted(flat_train.iterdir())):
        target = train / ["dark red", "bright green", "deep blue"][number % 3] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    argv = ["eval", str(test), "--train", str(train), "--codec", "pq", "--bits", "8,16", "--json"]
    assert main([*argv, "--query-weighted"]) == 0
    weighted = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert [(row["codec"], row["bits"]) for row in weighted] == [("float", None), ("pq", 8), ("pq", 16)]
    assert weighted[0] == plain[0]  # the float row does not depend on the codec
    # Weighted codecs are other codecs: their codes, hence some metric, differ from the plain ones.
    assert [row["recall10"] for row in weighted[1:]] != [row["recall10"] for row in plain[1:]]


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--bits", "12"], InvalidArgumentError, "multiple of 8"),
        (["--bits", "a,b"], InvalidArgumentError, "comma-separated"),
        (["--codec", "zip"], InvalidArgumentError, "unknown codec"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    data_sets: tuple[Path, Path], extra: list[str], error: type[Exception], message: str
) -> None:
    test, train = data_sets
    args = eval_command_args([str(test), "--train", str(train), *extra])
    with pytest.raises(error, match=message):
        eval_command.run(args)


def test_missing_and_flat_folders_are_reported(data_sets: tuple[Path, Path], tmp_path: Path) -> None:
    _, train = data_sets
    with pytest.raises(DatasetMissingError, match="no such folder"):
        eval_command.run(eval_command_args([str(tmp_path / "nope"), "--train", str(train)]))
    with pytest.raises(InvalidArgumentError, match="no class sub-folders"):
        eval_command.run(eval_command_args([str(train), "--train", str(train)]))


def eval_command_args(argv: list[str]) -> object:
    import argparse

    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    return parser.parse_args(argv)
