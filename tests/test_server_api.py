"""The ``semdb serve`` app through FastAPI's test client, with the fake encoder: the JSON API,
uploads, thumbnails and what the server refuses to serve."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import FakeEncoder, write_colour_images
from PIL import Image

import semdb

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from semdb.server.app import create_app
from semdb.server.thumbnails import ThumbnailCache


def colour_of(path: str) -> str:
    return Path(path).name.split("_")[0]


@pytest.fixture
def served(tmp_path: Path) -> tuple[TestClient, semdb.Database, Path, FakeEncoder, ThumbnailCache]:
    folder = tmp_path / "images"
    write_colour_images(folder / "a", per_colour=4, seed=1)
    write_colour_images(folder / "b", per_colour=4, seed=2)
    Image.new("RGB", (600, 400), (30, 200, 40)).save(folder / "a" / "green_big.png")
    encoder = FakeEncoder()
    db = semdb.connect(tmp_path / "db.semdb", encoder=encoder, bits=32)
    db.ingest(folder)
    thumbnails = ThumbnailCache(tmp_path / "thumbnails")
    app = create_app(db, thumbnails, max_upload_bytes=64 * 1024)
    return TestClient(app, base_url="http://127.0.0.1"), db, folder, encoder, thumbnails


def test_search_pages_and_filters(served: tuple) -> None:
    client, _, folder, *_ = served
    first = client.get("/api/search", params={"q": "green", "limit": 5})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["more"] and len(body["results"]) == 5 and body["query"] == "“green”"
    assert {colour_of(hit["path"]) for hit in body["results"]} == {"green"}
    hit = body["results"][0]
    assert hit["thumbnail"] == f"/api/images/{hit['id']}/thumbnail" and hit["missing"] is False
    assert set(body["timings"]) == {"encode_ms", "filter_ms", "search_ms", "total_ms"}
    second = client.get("/api/search", params={"q": "green", "limit": 5, "offset": 5}).json()
    both = client.get("/api/search", params={"q": "green", "limit": 10}).json()
    assert [h["id"] for h in body["results"] + second["results"]] == [h["id"] for h in both["results"]]

    under_b = client.get("/api/search", params={"q": "red", "limit": 50, "under": str(folder / "b")}).json()
    assert len(under_b["results"]) == 20 and all("/b/" in h["path"] for h in under_b["results"])
    big = client.get("/api/search", params={"q": "red", "min_width": 500}).json()["results"]
    assert [Path(h["path"]).name for h in big] == ["green_big.png"] and big[0]["width"] == 600
    like = client.get("/api/search", params={"q": f"id:{hit['id']}", "limit": 3}).json()["results"]
    assert like[0]["id"] == hit["id"]

    for bad in ({"q": "red", "limit": 0}, {"q": "red", "after": "yesterday"}, {"q": "red - red"}, {}):
        response = client.get("/api/search", params=bad)
        assert response.status_code in (400, 422), (bad, response.text)
        assert "Traceback" not in response.text


def test_upload_search_and_its_limit(served: tuple) -> None:
    client, _, folder, encoder, _ = served
    picture = (folder / "b" / "blue_0.png").read_bytes()
    before = encoder.images_encoded
    found = client.post("/api/search", params={"limit": 4}, content=picture, headers={"Content-Type": "image/png"})
    assert found.status_code == 200, found.text
    assert {colour_of(h["path"]) for h in found.json()["results"]} == {"blue"}
    assert encoder.images_encoded == before + 1
    mixed = client.post("/api/search", params={"q": "-0.2:blue", "limit": 2}, content=picture).json()
    assert "upload" in mixed["query"]
    too_big = client.post("/api/search", content=b"\0" * (64 * 1024 + 1))
    assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]
    garbage = client.post("/api/search", content=b"not an image at all")
    assert garbage.status_code == 400 and "not a usable image" in garbage.json()["detail"]
    assert client.post("/api/search", content=b"").status_code == 400


def test_a_query_never_makes_the_server_read_a_file_by_name(served: tuple, tmp_path: Path) -> None:
    client, _, folder, encoder, _ = served
    before = encoder.images_encoded
    named = str(folder / "a" / "red_0.png")  # a real image path: taken as text, not opened
    response = client.get("/api/search", params={"q": named, "limit": 2})
    assert response.status_code == 200 and response.json()["query"] == f"“{named}”"
    assert encoder.images_encoded == before


def test_thumbnails_are_made_once_then_cached_within_the_bound(served: tuple, tmp_path: Path) -> None:
    client, db, folder, *_ = served
    hit = client.get("/api/search", params={"q": "green", "min_width": 500}).json()["results"][0]
    first = client.get(hit["thumbnail"])
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    assert first.headers["x-thumbnail-cache"] == "miss"
    thumb = Image.open(io.BytesIO(first.content))
    assert thumb.size == (256, 171)  # 600 x 400 fitted into 256 x 256
    again = client.get(hit["thumbnail"])
    assert again.headers["x-thumbnail-cache"] == "hit" and again.content == first.content
    original = client.get(hit["file"])
    assert original.content == (folder / "a" / "green_big.png").read_bytes()
    assert original.headers["content-type"] == "image/png" and original.headers["x-content-type-options"] == "nosniff"

    small = ThumbnailCache(tmp_path / "small", max_bytes=3000)
    details = db.image_details(
        [h["id"] for h in client.get("/api/search", params={"q": "red", "limit": 40}).json()["results"]]
    )
    for info in details.values():
        small.get(info)
        assert small.total_bytes <= 3000
    on_disk = sum(entry.stat().st_size for entry in (tmp_path / "small").iterdir())
    assert on_disk == small.total_bytes and on_disk <= 3000 and len(list((tmp_path / "small").iterdir())) > 1


def test_missing_or_replaced_originals_are_not_served(served: tuple, tmp_path: Path) -> None:
    client, _, folder, *_ = served
    hits = client.get("/api/search", params={"q": "yellow", "limit": 3, "under": str(folder / "a")}).json()["results"]
    gone, swapped, changed = (Path(hit["path"]) for hit in hits)
    gone.unlink()
    secret = tmp_path / "secret.txt"
    secret.write_text("the launch codes")
    swapped.unlink()
    swapped.symlink_to(secret)  # the stored path now leads elsewhere
    Image.new("RGB", (24, 24), (0, 0, 0)).save(changed)

    after = client.get("/api/search", params={"q": "yellow", "limit": 3, "under": str(folder / "a")}).json()
    assert [hit["missing"] for hit in after["results"]] == [True, False, False]
    missing = client.get(hits[0]["thumbnail"])
    assert missing.status_code == 404 and "missing" in missing.json()["detail"]
    for hit in hits[1:]:
        for url in (hit["thumbnail"], hit["file"]):
            response = client.get(url)
            assert response.status_code == 409, url
            assert "changed since it was ingested" in response.json()["detail"]
            assert b"launch codes" not in response.content


def test_only_images_of_the_database_by_id(served: tuple) -> None:
    client, *_ = served
    for url in (
        "/api/images/999999/file",
        "/api/images/-1/thumbnail",
        "/api/images/..%2F..%2F..%2Fetc%2Fpasswd/file",
        "/api/images/%2Fetc%2Fpasswd/file",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2F..%2Fapp.py",
        "/etc/passwd",
    ):
        response = client.get(url)
        assert response.status_code in (404, 422), url
        assert b"root:" not in response.content and b"create_app" not in response.content
    assert client.get("/").status_code == 200 and b"semdb" in client.get("/").content
    assert client.get("/static/app.js").status_code == 200


def test_foreign_host_headers_are_refused_and_the_api_is_described(served: tuple) -> None:
    client, *_ = served
    rebinding = client.get("/api/stats", headers={"Host": "attacker.example"})
    assert rebinding.status_code == 400
    stats = client.get("/api/stats").json()
    assert stats["images"] == 41 and stats["model"] == "fake-encoder"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/stats", "/api/images/{image_id}/thumbnail", "/api/images/{image_id}/file"} <= set(
        paths
    )
    assert set(paths["/api/search"]) == {"get", "post"}


def test_serve_without_fastapi_says_what_to_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['uvicorn'] = None; from semdb.cli import main; sys.exit(main(['serve', '--db', 'x']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 1 and "pip install 'semdb[server]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_numbers_too_large_for_the_store_and_odd_requests_are_the_users_error(served: tuple) -> None:
    client, _, folder, *_ = served
    huge = str(2**70)
    for url, params in (
        ("/api/search", {"q": f"id:{huge}"}),
        ("/api/search", {"like": huge}),
        ("/api/search", {"q": "red", "min_width": huge}),
        (f"/api/images/{huge}", {}),
        (f"/api/images/{huge}/thumbnail", {}),
        (f"/api/images/{huge}/file", {}),
    ):
        response = client.get(url, params=params)
        assert response.status_code in (400, 404, 422), (url, params, response.text)
    assert "no image with id" in client.get("/api/search", params={"like": huge}).json()["detail"]
    # Either end of the calendar is a bound no file time passes: every image, or none.
    everything = client.get("/api/search", params={"q": "red", "limit": 100, "before": "9999-12-31"}).json()
    assert len(everything["results"]) == 41
    assert client.get("/api/search", params={"q": "red", "before": "0001-01-02"}).json()["results"] == []
    assert client.get("/api/search", params={"q": "red", "after": "9999-12-31"}).json()["results"] == []
    many = client.get("/api/search", params={"q": "red", "under": [f"/tmp/x{i}" for i in range(500)]})
    assert many.status_code == 400 and "at most" in many.json()["detail"]
    form = client.post("/api/search", files={"file": ("a.png", (folder / "b" / "blue_0.png").read_bytes())})
    assert form.status_code == 415 and "not as a form" in form.json()["detail"]
    schema = client.get("/openapi.json").json()
    assert "application/octet-stream" in schema["paths"]["/api/search"]["post"]["requestBody"]["content"]
    # The interactive pages would load their scripts from CDNs, which an offline machine cannot reach.
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_a_thumbnail_cache_deleted_while_serving_costs_only_speed(served: tuple) -> None:
    import shutil

    client, _, _, _, thumbnails = served
    hit = client.get("/api/search", params={"q": "green", "limit": 1}).json()["results"][0]
    shutil.rmtree(thumbnails.folder)
    first = client.get(hit["thumbnail"])
    assert first.status_code == 200 and first.headers["x-thumbnail-cache"] == "miss"
    assert client.get(hit["thumbnail"]).headers["x-thumbnail-cache"] == "hit"  # the folder was made again


def test_serve_names_a_thumbnail_folder_it_cannot_use(served: tuple, tmp_path: Path) -> None:
    from test_cli import assert_one_line_error, run_semdb

    _, db, *_ = served
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    served_db = run_semdb("serve", "--db", db.location, "--thumbnails", str(not_a_folder), "--port", "0")
    assert_one_line_error(served_db, "cannot keep thumbnails in")
