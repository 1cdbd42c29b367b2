"""AOI exports on the scene's grid, and export jobs on a real Redis with a real rq worker.

Every pixel is checked against numpy slices of the source COGs read with rasterio.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import MS_SIZE, make_settings
from fastapi.testclient import TestClient
from rasterio.transform import rowcol
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds

from tests.helpers import auth_settings, write_auth
from tiler.auth import mint_url_token
from tiler.main import create_app
from tiler.pansharpen import brovey, upsample
from tiler.sample import COLLECTION_ID, MS_RES, PAN_RES
from tiler.settings import AuthSettings, ExportSettings, JobSettings

ROOT = Path(__file__).resolve().parent.parent
SIGNING = "k1:" + "s" * 40
USERS = {
    "ann": ("dtk_ann-export-key-0123456789abcdefghijklmnopq", "team-a"),
    "bob": ("dtk_bob-export-key-0123456789abcdefghijklmnopq", "team-a"),
    "zed": ("dtk_zed-export-key-0123456789abcdefghijklmnopq", "viewers"),
    "root": ("dtk_root-export-key-0123456789abcdefghijklmnop", "ops"),
}
POLICY = f"""
groups:
  team-a:
    - collections: [{COLLECTION_ID}]
  viewers:
    - collections: [{COLLECTION_ID}]
      operations: [tiles, preview, metadata]
  ops:
    - collections: ["*"]
"""
#: a direct export is capped at 300 px a side / 250x250 px: a 1.5 km pan scene (1024 px) is over it
CAP = ExportSettings(max_size=300, max_pixels=250 * 250)
SPOT_WEIGHTS = {"blue": 0.35, "green": 0.30, "red": 0.35, "nir": 0.0}


def key(user: str) -> dict[str, str]:
    return {"X-API-Key": USERS[user][0]}


@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("export-auth")
    write_auth(d, POLICY, [(u, k, g) for u, (k, g) in USERS.items()], SIGNING)
    return d


def auth(d: Path) -> AuthSettings:
    return auth_settings(d, SIGNING)


@pytest.fixture(scope="module")
def client(dsn, cog_server, auth_dir):
    settings = make_settings(dsn, auth=auth(auth_dir))
    settings.export = CAP
    with TestClient(create_app(settings)) as c:
        yield c


def export_url(item_id: str) -> str:
    return f"/collections/{COLLECTION_ID}/items/{item_id}/export.tif"


def source(sample, asset: str, i: int = 0):
    with rasterio.open(sample.path(i, asset)) as src:
        return src.read(), src.transform, src.crs, src.nodata


def open_tif(content: bytes):
    return rasterio.open(io.BytesIO(content))


def utm_box(sample, x_off: float, y_off: float, w: float, h: float, i: int = 0) -> tuple[float, ...]:
    """A box in the source CRS, offsets in metres from the scene's top-left corner."""
    _, t, _, _ = source(sample, "ms", i)
    return (t.c + x_off, t.f - y_off - h, t.c + x_off + w, t.f - y_off)


def expected_window(transform, box) -> tuple[int, int, int, int]:
    """Rows and columns of the source pixels the box touches (numpy slice bounds)."""
    c0 = math.floor((box[0] - transform.c) / transform.a)
    c1 = math.ceil((box[2] - transform.c) / transform.a)
    r0 = math.floor((transform.f - box[3]) / -transform.e)
    r1 = math.ceil((transform.f - box[1]) / -transform.e)
    return r0, r1, c0, c1


# --------------------------------------------------------------------------- native grid


@pytest.mark.parametrize("asset", ["ms", "pan"])
def test_native_export_is_the_source_window_exactly(client, sample, asset):
    item = sample.item(0)
    box = utm_box(sample, 512.3, 400.7, 250.2, 190.1)  # not on pixel edges: widened outward
    r = client.get(
        export_url(item["id"]),
        params={"bbox": ",".join(map(str, box)), "bbox-crs": "EPSG:32631", "asset": asset},
        headers=key("ann"),
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("image/tiff")
    assert f"{item['id']}_{asset}.tif" in r.headers["content-disposition"]
    arr, t, crs, nodata = source(sample, asset)
    r0, r1, c0, c1 = expected_window(t, box)
    with open_tif(r.content) as out:
        assert out.crs == crs
        assert out.res == (t.a, -t.e)  # same pixel size
        assert out.transform.c == t.c + c0 * t.a and out.transform.f == t.f + r0 * t.e  # origin on the grid
        assert (out.height, out.width) == (r1 - r0, c1 - c0)
        data = out.read()
        assert data.dtype == np.uint16 and out.nodata == nodata == 0
        np.testing.assert_array_equal(data, arr[:, r0:r1, c0:c1])  # no rescaling, no resampling
        tags = out.tags()
        assert tags["datetime"] == item["properties"]["datetime"]
        assert tags["platform"] == item["properties"]["platform"]
        assert tags["constellation"] == "spot"
        assert tags["stac_item"] == item["id"] and tags["stac_collection"] == COLLECTION_ID
        assert tags["license"] == "proprietary"
        assert tags["TIFFTAG_DATETIME"] == item["properties"]["datetime"][:19].replace("-", ":").replace(
            "T", " "
        )
        assert "no resampling" in tags["dinamis_processing"]
        names = [b["name"] for b in item["assets"][asset]["eo:bands"]]
        assert list(out.descriptions) == names
        assert out.tags(1)["common_name"] == item["assets"][asset]["eo:bands"][0]["common_name"]


def test_bands_by_common_name_and_a_wgs84_box(client, sample):
    item = sample.item(0)
    utm = utm_box(sample, 300, 300, 120, 90)
    box = transform_bounds("EPSG:32631", "EPSG:4326", *utm)
    r = client.get(
        export_url(item["id"]),
        params={"bbox": ",".join(map(str, box)), "asset": "ms", "bands": "nir,red"},
        headers=key("ann"),
    )
    assert r.status_code == 200, r.text
    arr, t, _, _ = source(sample, "ms")
    with open_tif(r.content) as out:
        assert out.descriptions == ("B3", "B2")
        # the box taken back to UTM is covered, on whole source pixels
        col0 = (out.transform.c - t.c) / t.a
        row0 = (t.f - out.transform.f) / -t.e
        assert col0 == int(col0) and row0 == int(row0)
        covered = transform_bounds("EPSG:4326", "EPSG:32631", *box, densify_pts=21)
        assert out.bounds.left <= covered[0] and out.bounds.right >= covered[2]
        assert out.bounds.bottom <= covered[1] and out.bounds.top >= covered[3]
        c0, r0 = int(col0), int(row0)
        np.testing.assert_array_equal(out.read(), arr[[3, 2], r0 : r0 + out.height, c0 : c0 + out.width])


def test_nodata_and_mask_are_kept(client, sample):
    """A corner of the scene: outside the rotated footprint the source is nodata, so is the export."""
    item = sample.item(0)
    box = utm_box(sample, 600, 0, 200, 220)  # the top edge: nodata above the rotated footprint
    r = client.get(
        export_url(item["id"]),
        params={"bbox": ",".join(map(str, box)), "bbox-crs": "EPSG:32631", "asset": "ms"},
        headers=key("ann"),
    )
    assert r.status_code == 200, r.text
    arr, t, _, _ = source(sample, "ms")
    r0, r1, c0, c1 = expected_window(t, box)
    expected = arr[:, r0:r1, c0:c1]
    assert (expected == 0).any() and (expected != 0).any()
    with open_tif(r.content) as out:
        assert out.nodata == 0
        masked = out.read(masked=True)
        np.testing.assert_array_equal(np.ma.getmaskarray(masked), expected == 0)
        np.testing.assert_array_equal(out.dataset_mask() == 0, (expected == 0).all(axis=0))


def test_pansharpened_export_equals_numpy_brovey_at_pan_resolution(client, sample):
    item = sample.item(0)
    box = utm_box(sample, 600.2, 500.9, 180.4, 150.3)
    r = client.get(
        export_url(item["id"]),
        params={"bbox": ",".join(map(str, box)), "bbox-crs": "EPSG:32631", "asset": "pansharpened"},
        headers=key("ann"),
    )
    assert r.status_code == 200, r.text
    ms, ms_t, _, _ = source(sample, "ms")
    pan, pan_t, _, _ = source(sample, "pan")
    r0, r1, c0, c1 = expected_window(pan_t, box)
    # the documented method on the whole arrays: MS upsampled x4 (bilinear), weighted Brovey
    ratio = round(MS_RES / PAN_RES)
    up = upsample(np.ma.masked_equal(ms, 0), ratio, "bilinear")
    # the collection's `pansharpened` render gives this synthetic sensor's weights (it wins over the preset's)
    table = sample.collection["renders"]["pansharpened"]["pansharpen"]["weights"]["*"]
    assert table != SPOT_WEIGHTS
    weights = [table[b["common_name"]] for b in item["assets"]["ms"]["eo:bands"]]
    expected = brovey(
        up[:, r0:r1, c0:c1], np.ma.masked_equal(pan[0, r0:r1, c0:c1], 0), weights, dtype="uint16"
    )
    with open_tif(r.content) as out:
        assert out.res == (PAN_RES, PAN_RES) and out.transform.c == pan_t.c + c0 * PAN_RES
        assert out.transform.f == pan_t.f - r0 * PAN_RES
        assert out.descriptions == ("B0", "B1", "B2", "B3") and out.dtypes[0] == "uint16"
        data = out.read()
        np.testing.assert_array_equal(data, expected.filled(0))
        assert "weighted Brovey" in out.tags()["dinamis_processing"]
    assert data.shape[1:] == (r1 - r0, c1 - c0) and data.any()


@pytest.mark.parametrize(("grid", "step"), [("l93-1.5", 1.5), ("l93-6", 6.0)])
def test_lambert93_grid_is_snapped_to_the_step(client, sample, grid, step):
    item = sample.item(0)
    box = utm_box(sample, 400, 400, 200, 150)
    r = client.get(
        export_url(item["id"]),
        params={"bbox": ",".join(map(str, box)), "bbox-crs": "EPSG:32631", "asset": "pan", "grid": grid},
        headers=key("ann"),
    )
    assert r.status_code == 200, r.text
    pan, pan_t, _, _ = source(sample, "pan")
    with open_tif(r.content) as out:
        t = out.transform
        assert out.crs.to_epsg() == 2154
        assert (t.a, t.e) == (step, -step) and t.b == t.d == 0
        assert (t.c / step).is_integer() and (t.f / step).is_integer()
        assert (
            "EPSG:2154" in out.tags()["dinamis_processing"] and "nearest" in out.tags()["dinamis_processing"]
        )
        data = out.read(1)
        # nearest: each pixel is the source pixel under its centre (GDAL's approximate transformer
        # may pick the neighbour for centres a hair from an edge)
        rows, cols = np.mgrid[0 : out.height, 0 : out.width]
        xs, ys = rasterio.transform.xy(t, rows.ravel(), cols.ravel())
        ux, uy = warp_transform("EPSG:2154", "EPSG:32631", xs, ys)
        sr, sc = rowcol(pan_t, ux, uy)
        sr, sc = np.asarray(sr), np.asarray(sc)
        inside = (sr >= 0) & (sr < pan.shape[1]) & (sc >= 0) & (sc < pan.shape[2])
        expected = np.zeros(data.size, dtype="uint16")
        expected[inside] = pan[0, sr[inside], sc[inside]]
        valid = (expected != 0) & (data.ravel() != 0)
        assert valid.sum() > 0.8 * data.size
        assert (data.ravel()[valid] == expected[valid]).mean() > 0.99


def test_post_feature_masks_outside_it(client, sample):
    item = sample.item(0)
    x0, y0, x1, y1 = utm_box(sample, 500, 500, 150, 150)
    triangle = {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x0, y1], [x0, y0]]]}
    r = client.post(
        export_url(item["id"]),
        params={"bbox-crs": "EPSG:32631", "asset": "ms"},
        json={"type": "Feature", "properties": {}, "geometry": triangle},
        headers=key("ann"),
    )
    assert r.status_code == 200, r.text
    arr, t, _, _ = source(sample, "ms")
    r0, r1, c0, c1 = expected_window(t, (x0, y0, x1, y1))
    with open_tif(r.content) as out:
        data = out.read()
        assert data.shape[1:] == (r1 - r0, c1 - c0)
        src = arr[:, r0:r1, c0:c1]
        assert data[:, 0, 0].tolist() == src[:, 0, 0].tolist()  # top-left corner is inside
        assert (data[:, 0, -1] == 0).all() and (src[:, 0, -1] != 0).all()  # top-right is outside
        kept = data != 0
        np.testing.assert_array_equal(data[kept], src[kept])
        assert out.tags()["dinamis_masked_outside_feature"] == "true"


# --------------------------------------------------------------------------- refusals


def test_over_the_cap_is_a_400_that_states_it(client, sample):
    item = sample.item(0)
    r = client.get(
        export_url(item["id"]), params={"bbox": "-180,-90,180,90", "asset": "pan"}, headers=key("ann")
    )
    assert r.status_code == 400
    detail = r.json()["detail"]
    size = MS_SIZE * round(MS_RES / PAN_RES)
    assert f"{size} x {size} px" in detail
    assert "300 px a side" in detail and f"{250 * 250:,} px" in detail
    assert "never downsampled" in detail
    assert f"/stream/collections/{COLLECTION_ID}/items/{item['id']}/assets/pan/" in detail


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"bands": "swir"}, "no band 'swir'"),
        ({"bbox-crs": "+proj=longlat"}, "bbox-crs"),
        ({"asset": "nope"}, "no asset 'nope'"),
        ({"asset": "overview", "bbox-crs": "EPSG:999999"}, "not a known CRS"),
        ({"bbox": "1,2,3"}, "bbox"),
        ({"bbox": "0,0,1,1"}, "does not overlap"),
    ],
)
def test_bad_parameters_are_clear_400s(client, sample, params, message):
    box = ",".join(map(str, utm_box(sample, 100, 100, 50, 50)))
    query = {"bbox": box, "bbox-crs": "EPSG:32631", "asset": "ms", **params}
    r = client.get(export_url(sample.item(0)["id"]), params=query, headers=key("ann"))
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"]


def test_rights_data_is_required(client, sample):
    item = sample.item(0)
    params = {"bbox": ",".join(map(str, utm_box(sample, 100, 100, 50, 50))), "bbox-crs": "EPSG:32631"}
    assert client.get(export_url(item["id"]), params=params).status_code == 401
    r = client.get(export_url(item["id"]), params=params, headers=key("zed"))
    assert r.status_code == 403 and "data" in r.json()["detail"]
    # a URL token limited by max_zoom never carries `data`, even for a user who has it
    keys = auth(Path(client.app.state.auth.settings.policy_file).parent).keys()
    token, _ = mint_url_token(keys, sub="ann", groups=["team-a"], ttl=600, max_zoom=14)
    r = client.get(f"/t/{token}" + export_url(item["id"]), params=params)
    assert r.status_code == 403, r.text
    full, _ = mint_url_token(keys, sub="ann", groups=["team-a"], ttl=600)
    r = client.get(f"/t/{full}" + export_url(item["id"]), params=params)
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- jobs

redis = pytest.importorskip("redis")
needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


@pytest.fixture()
def redis_server(tmp_path):
    from test_rediscache import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def jobs_app(dsn, auth_dir, redis_server, results: Path, **jobs):
    settings = make_settings(dsn, auth=auth(auth_dir))
    settings.export = CAP
    settings.jobs = JobSettings(
        redis_url=redis_server.url, results_dir=results, queue="test-exports", admin_groups=["ops"], **jobs
    )
    return create_app(settings)


def run_worker(dsn, auth_dir, redis_server, results: Path, **env) -> subprocess.CompletedProcess:
    """A real `tiler worker --burst` in its own process: takes every queued job, then exits."""
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": dsn,
        "TILER_AUTH_ENABLED": "true",
        "TILER_AUTH_POLICY_FILE": str(auth_dir / "policy.yaml"),
        "TILER_JOBS_REDIS_URL": redis_server.url,
        "TILER_JOBS_RESULTS_DIR": str(results),
        "TILER_JOBS_QUEUE": "test-exports",
        "TILER_LOG_FORMAT": "text",
        **env,
    }
    cmd = [sys.executable, "-c", "from tiler.cli import cli; cli()", "worker", "--burst"]
    done = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert redis_server.password not in done.stdout + done.stderr  # the Redis URL's secret is never logged
    return done


def submit(c, item_id, user="ann", **params):
    return c.post(
        f"/collections/{COLLECTION_ID}/items/{item_id}/export-jobs", params=params, headers=key(user)
    )


@needs_redis
def test_job_lifecycle_with_a_real_worker(dsn, sample, auth_dir, redis_server, tmp_path):
    """Over the direct cap: submit -> queued -> (worker) -> done -> download, pixels exact; owner only."""
    item = sample.item(1)
    results = tmp_path / "results"
    with TestClient(jobs_app(dsn, auth_dir, redis_server, results)) as c:
        whole = {"bbox": "-180,-90,180,90", "asset": "pan"}
        direct = c.get(export_url(item["id"]), params=whole, headers=key("ann"))
        assert direct.status_code == 400 and "export-jobs" in direct.json()["detail"]
        r = submit(c, item["id"], **whole)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and r.headers["location"] == f"/jobs/{job['id']}"
        assert job["size"] == {"width": 1024, "height": 1024}
        assert c.get(f"/jobs/{job['id']}/result", headers=key("ann")).status_code == 409
        # another user sees nothing of it; an admin group does
        assert c.get(f"/jobs/{job['id']}", headers=key("bob")).status_code == 404
        assert c.get(f"/jobs/{job['id']}/result", headers=key("bob")).status_code == 404
        assert c.get("/jobs", headers=key("bob")).json() == {"jobs": []}
        assert c.get(f"/jobs/{job['id']}", headers=key("root")).json()["owner"] == "ann"
        assert c.get(f"/jobs/{job['id']}").status_code == 401

        run_worker(dsn, auth_dir, redis_server, results)
        status = c.get(f"/jobs/{job['id']}", headers=key("ann")).json()
        assert status["status"] == "done", status
        assert status["links"]["result"] == f"/jobs/{job['id']}/result" and status["expires"]
        assert [j["id"] for j in c.get("/jobs", headers=key("ann")).json()["jobs"]] == [job["id"]]
        got = c.get(status["links"]["result"], headers=key("ann"))
        assert got.status_code == 200 and got.headers["content-type"].startswith("image/tiff")
        assert c.get(status["links"]["result"], headers=key("bob")).status_code == 404
    pan, t, crs, _ = source(sample, "pan", 1)
    with open_tif(got.content) as out:
        assert out.crs == crs and out.transform == t
        np.testing.assert_array_equal(out.read(), pan)
        assert out.tags()["stac_item"] == item["id"]


@needs_redis
def test_jobs_per_user_bound_is_a_429(dsn, sample, auth_dir, redis_server, tmp_path):
    box = {"bbox": ",".join(map(str, utm_box(sample, 100, 100, 60, 60))), "bbox-crs": "EPSG:32631"}
    with TestClient(jobs_app(dsn, auth_dir, redis_server, tmp_path / "r", max_per_user=1)) as c:
        first = submit(c, sample.item(0)["id"], **box)
        assert first.status_code == 202
        again = submit(c, sample.item(0)["id"], **box)
        assert again.status_code == 429 and "(1)" in again.json()["detail"]
        assert submit(c, sample.item(0)["id"], user="bob", **box).status_code == 202  # per user
        # cancelling frees the slot
        assert c.delete(f"/jobs/{first.json()['id']}", headers=key("ann")).status_code == 204
        assert submit(c, sample.item(0)["id"], **box).status_code == 202
        # over the job cap too: a 400 that says so
        small = tmp_path / "small"
        with TestClient(jobs_app(dsn, auth_dir, redis_server, small, max_pixels=100)) as c2:
            r = submit(c2, sample.item(0)["id"], user="bob", **box)
            assert r.status_code == 400 and "an export job" in r.json()["detail"]
        # no `data` right: no job
        assert submit(c, sample.item(0)["id"], user="zed", **box).status_code == 403


@needs_redis
def test_rights_are_checked_again_when_the_job_runs(dsn, sample, auth_dir, redis_server, tmp_path):
    d = tmp_path / "auth"
    shutil.copytree(auth_dir, d)
    box = {"bbox": ",".join(map(str, utm_box(sample, 100, 100, 60, 60))), "bbox-crs": "EPSG:32631"}
    with TestClient(jobs_app(dsn, d, redis_server, tmp_path / "r")) as c:
        job = submit(c, sample.item(0)["id"], **box).json()
        (d / "policy.yaml").write_text(
            POLICY.replace(
                "team-a:\n    - collections", "team-a:\n    - operations: [tiles]\n      collections"
            )
        )
        run_worker(dsn, d, redis_server, tmp_path / "r")
        status = c.get(f"/jobs/{job['id']}", headers=key("ann")).json()
        assert status["status"] == "failed"
        assert "Not allowed: data" in status["error"] and "when the job ran" in status["error"]
        assert not list((tmp_path / "r").glob("*.tif"))


TTL = 10


@needs_redis
def test_results_expire(dsn, sample, auth_dir, redis_server, tmp_path):
    results = tmp_path / "r"
    box = {"bbox": ",".join(map(str, utm_box(sample, 100, 100, 60, 60))), "bbox-crs": "EPSG:32631"}
    with TestClient(jobs_app(dsn, auth_dir, redis_server, results, result_ttl=TTL)) as c:
        job = submit(c, sample.item(0)["id"], **box).json()
        run_worker(dsn, auth_dir, redis_server, results, TILER_JOBS_RESULT_TTL=str(TTL))
        status = c.get(f"/jobs/{job['id']}", headers=key("ann")).json()
        assert status["status"] == "done", status
        assert (results / f"{job['id']}.tif").exists()
        expires = dt.datetime.fromisoformat(status["expires"].replace("Z", "+00:00"))
        time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 1.5)
        assert c.get(f"/jobs/{job['id']}", headers=key("ann")).status_code == 404
        assert c.get(f"/jobs/{job['id']}/result", headers=key("ann")).status_code == 404
        assert not (results / f"{job['id']}.tif").exists()  # the file is deleted, not just hidden
        assert json.loads(c.get("/jobs", headers=key("ann")).text) == {"jobs": []}


@pytest.mark.parametrize(
    ("method", "params", "body"),
    [
        ("GET", {"bbox": "-1e9,-1e9,1e9,1e9"}, None),
        ("GET", {"bbox": "170,80,179,89.9"}, None),
        ("GET", {"bbox": "nan,0,1,1"}, None),
        ("GET", {"bbox": "3,43,4,44", "bands": ",,,"}, None),
        ("GET", {"bbox": "3,43,4,44", "bbox-crs": "EPSG:3857"}, None),
        ("GET", {"bbox": "3,43,4,44", "grid": "l93-2"}, None),
        ("GET", {"bbox": "3,43,4,44", "asset": "pansharpened", "bands": "pan"}, None),
        ("GET", {}, None),
        ("POST", {}, None),
        ("POST", {}, {"type": "Point", "coordinates": [3.8, 43.6]}),
        ("POST", {}, {"type": "Polygon", "coordinates": [[["a", 1], [2, 3]]]}),
        ("POST", {}, {"type": "Polygon", "coordinates": []}),
        ("POST", {}, {"type": "Feature", "geometry": None}),
        ("POST", {}, {"type": "Polygon", "coordinates": [[[3, 43], [3.1, 43], [3, 43.1], [3, 43]]]}),
    ],
)
def test_odd_inputs_are_4xx_never_5xx(client, sample, method, params, body):
    r = client.request(method, export_url(sample.item(0)["id"]), params=params, json=body, headers=key("ann"))
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert "detail" in r.json()


@pytest.mark.parametrize("resampling", ["nearest", "bilinear"])
def test_pansharpened_on_a_lambert93_grid(client, sample, resampling):
    """The pansharpened product is computed on the pan grid, then resampled onto the snapped grid."""
    box = utm_box(sample, 500, 500, 150, 120)
    params = {"bbox": ",".join(map(str, box)), "bbox-crs": "EPSG:32631", "asset": "pansharpened"}
    native = client.get(export_url(sample.item(0)["id"]), params=params, headers=key("ann"))
    r = client.get(
        export_url(sample.item(0)["id"]),
        params={**params, "grid": "l93-1.5", "resampling": resampling},
        headers=key("ann"),
    )
    assert r.status_code == 200 and native.status_code == 200, r.text
    with open_tif(r.content) as out, open_tif(native.content) as ref:
        assert out.crs.to_epsg() == 2154 and out.res == (1.5, 1.5) and out.count == 4
        assert (out.transform.c / 1.5).is_integer() and (out.transform.f / 1.5).is_integer()
        data, ref_data = out.read(), ref.read()
        assert (data != 0).mean() > 0.8
        # same radiometry: a resampling moves pixels, not values
        for b in range(4):
            assert abs(np.median(data[b][data[b] != 0]) - np.median(ref_data[b])) < 0.05 * np.median(
                ref_data[b]
            )
        assert resampling in out.tags()["dinamis_processing"]
