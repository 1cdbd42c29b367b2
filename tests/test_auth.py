"""Access control end to end: real JWTs, API keys, a real policy file, two collections in pgstac."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import time
import xml.etree.ElementTree as ET

import jwt
import numpy as np
import pytest
import rasterio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.conftest import make_settings
from tests.helpers import lonlat_of_item_centre, mercator_tile, read_png
from tiler.auth import _b64d, _b64e, hash_api_key, mint_url_token
from tiler.ingest import load
from tiler.logs import redact
from tiler.main import create_app
from tiler.sample import write_cog
from tiler.settings import AuthSettings

A, B = "spot67-demo", "restricted-b"
ISS, AUD = "https://idp.dinamis.test/realms/dinamis", "dinamis-tiler"
KEY_OLD = "k1:" + "o" * 40
KEY_NEW = "k2:" + "n" * 40
CAROL_KEY = "dtk_carol-test-key-0123456789abcdefghijklmnop"
POLICY = """
groups:
  team-a:
    - collections: [spot67-demo]
  team-b:
    - collections: [restricted-*]
  admins:
    - collections: ["*"]
  lowres:
    - collections: [spot67-demo]
      max_zoom: 12
  thumbs:
    - collections: [spot67-demo]
      operations: [preview, metadata]
      max_preview_size: 256
anonymous: [thumbs]
"""
MS_RGB = {"assets": "ms|bidx=3,2,1", "rescale": "200,1800"}


# --------------------------------------------------------------------------- keys and tokens


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "rogue": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture(scope="module")
def auth_files(tmp_path_factory, keys):
    d = tmp_path_factory.mktemp("auth")
    jwks = {
        "keys": [
            {
                **RSAAlgorithm.to_jwk(keys["rsa"].public_key(), as_dict=True),
                "kid": "rsa-1",
                "alg": "RS256",
                "use": "sig",
            },
            {
                **ECAlgorithm.to_jwk(keys["ec"].public_key(), as_dict=True),
                "kid": "ec-1",
                "alg": "ES256",
                "use": "sig",
            },
        ]
    }
    (d / "jwks.json").write_text(json.dumps(jwks))
    (d / "policy.yaml").write_text(POLICY)
    (d / "keys.yaml").write_text(
        f"keys:\n  - id: carol-1\n    sha256: {hash_api_key(CAROL_KEY)}\n    user: carol\n    groups: [team-b]\n"
    )
    return d


def auth_settings(files, signing_keys: str = f"{KEY_NEW},{KEY_OLD}") -> AuthSettings:
    return AuthSettings(
        enabled=True,
        policy_file=str(files / "policy.yaml"),
        api_keys_file=str(files / "keys.yaml"),
        jwks_file=str(files / "jwks.json"),
        issuer=ISS,
        audience=AUD,
        signing_keys=signing_keys,
        reload_interval=0,
    )


def make_jwt(keys, user="alice", groups=("team-a",), key="rsa", kid="rsa-1", exp=600, **over) -> str:
    now = int(time.time())
    claims = {
        "sub": user,
        "groups": list(groups),
        "iss": ISS,
        "aud": AUD,
        "iat": now,
        "exp": now + exp,
        **over,
    }
    alg = "ES256" if key == "ec" else "RS256"
    return jwt.encode(claims, keys[key], algorithm=alg, headers={"kid": kid})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- data: collection B


@pytest.fixture(scope="module")
def b_item(dsn, sample):
    """Collection B: one item over scene 0, newest, with halved pixels (so any leak shows)."""
    src = sample.item(0)
    d = sample.directory / "b"
    d.mkdir(exist_ok=True)
    item = copy.deepcopy(src)
    item["id"] = "B-" + src["id"]
    item["collection"] = B
    item["properties"]["datetime"] = "2030-01-01T00:00:00Z"
    for name in ("ms", "pan"):
        with rasterio.open(sample.path(0, name)) as ds:
            data, transform, desc = ds.read(), ds.transform, ds.descriptions
        out = d / f"B_{name}.tif"
        write_cog(out, (data // 2).astype(data.dtype), transform, [x or "" for x in desc])
        item["assets"][name]["href"] = src["assets"][name]["href"].rsplit("/", 1)[0] + f"/b/B_{name}.tif"
    for link in item.get("links", []):
        if link.get("rel") in ("collection", "parent"):
            link["href"] = link["href"].replace(A, B)
    coll = copy.deepcopy(sample.collection)
    coll["id"] = B
    coll["title"] = "Restricted collection"
    (d / "collection.json").write_text(json.dumps(coll))
    (d / "items.ndjson").write_text(json.dumps(item) + "\n")
    load(dsn, [d / "collection.json", d / "items.ndjson"], progress=False)
    return item


@pytest.fixture(scope="module")
def auth_client(dsn, b_item, auth_files):
    with TestClient(create_app(make_settings(dsn, auth=auth_settings(auth_files)))) as c:
        yield c


def tile_of(sample, i=0, z=15):
    lon, lat = lonlat_of_item_centre(sample.item(i))
    x, y = mercator_tile(lon, lat, z)
    return z, x, y


def item_tile(cid, item_id, z, x, y):
    return f"/collections/{cid}/items/{item_id}/tiles/WebMercatorQuad/{z}/{x}/{y}.png"


# --------------------------------------------------------------------------- credentials


def test_no_credential_gets_401_except_where_policy_opens(auth_client, sample, b_item):
    c = auth_client
    z, x, y = tile_of(sample)
    a_id = sample.item(0)["id"]
    r = c.get(item_tile(A, a_id, z, x, y), params=MS_RGB)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.headers["cache-control"] == "no-store" and r.json()["detail"]
    assert c.get(f"/collections/{B}/items/{b_item['id']}/info?assets=ms").status_code == 401
    assert c.get(f"/collections/{B}/tiles/WebMercatorQuad/{z}/{x}/{y}.png", params=MS_RGB).status_code == 401
    # the policy opens small previews of A to anonymous callers, with a public cache header
    r = c.get(f"/collections/{A}/items/{a_id}/preview.png", params={**MS_RGB, "max_size": 128})
    assert r.status_code == 200 and r.headers["cache-control"].startswith("public")
    assert (
        c.get(f"/collections/{A}/items/{a_id}/preview.png", params={**MS_RGB, "max_size": 1024}).status_code
        == 401
    )
    assert (
        c.get(f"/collections/{A}/items/{a_id}/preview.png", params=MS_RGB).status_code == 401
    )  # default 1024
    # documentation and grids stay public
    for path in ("/", "/api", "/tileMatrixSets", "/healthz", "/conformance"):
        assert c.get(path).status_code == 200, path


@pytest.mark.parametrize("key,kid", [("rsa", "rsa-1"), ("ec", "ec-1")])
def test_jwt_gives_collection_a_not_b(auth_client, sample, b_item, keys, key, kid):
    c = auth_client
    h = bearer(make_jwt(keys, key=key, kid=kid))
    z, x, y = tile_of(sample)
    r = c.get(item_tile(A, sample.item(0)["id"], z, x, y), params=MS_RGB, headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"].startswith("private")
    for path in (
        item_tile(B, b_item["id"], z, x, y),
        f"/collections/{B}/items/{b_item['id']}/preview.png",
        f"/collections/{B}/items/{b_item['id']}/info",
        f"/collections/{B}/tiles/WebMercatorQuad/{z}/{x}/{y}.png",
        f"/collections/{B}/WebMercatorQuad/tilejson.json",
        f"/collections/{B}/WMTSCapabilities.xml",
        f"/collections/{B}/presets",
        f"/collections/{B}/items/{b_item['id']}/presets",
        f"/collections/{B}/tiles/WebMercatorQuad/{z}/{x}/{y}.png?preset=pansharpened",
    ):
        r = c.get(path, params=MS_RGB, headers=h)
        assert r.status_code == 403, path
        assert r.headers["content-type"] == "application/json" and r.headers["cache-control"] == "no-store"
    me = c.get("/auth/whoami", headers=h).json()
    assert me["user"] == "alice" and me["collections"] == [A]


def test_bad_jwts_are_401(auth_client, sample, keys):
    c = auth_client
    path = f"/collections/{A}/items/{sample.item(0)['id']}/info?assets=ms"
    good = make_jwt(keys)
    assert c.get(path, headers=bearer(good)).status_code == 200
    head, payload, sig = good.split(".")
    claims = json.loads(_b64d(payload))
    claims["groups"] = ["admins"]
    tampered = ".".join([head, _b64e(json.dumps(claims).encode()), sig])
    hs = jwt.encode(
        {"sub": "x", "groups": ["admins"], "iss": ISS, "aud": AUD, "iat": 0, "exp": 2**31}, "s" * 32, "HS256"
    )
    unsigned = jwt.encode({"sub": "x", "groups": ["admins"], "iss": ISS, "aud": AUD}, None, "none")
    cases = {
        "expired": make_jwt(keys, exp=-120),
        "rogue key": make_jwt(keys, key="rogue", kid="rsa-1"),
        "unknown kid": make_jwt(keys, key="rogue", kid="nope"),
        "tampered": tampered,
        "wrong issuer": make_jwt(keys, iss="https://evil.test"),
        "wrong audience": make_jwt(keys, aud="other"),
        "HS256": hs,
        "alg none": unsigned,
        "garbage": "a.b.c",
    }
    for name, token in cases.items():
        r = c.get(path, headers=bearer(token))
        assert r.status_code == 401, name
        assert token not in r.text and r.headers["cache-control"] == "no-store"


def test_api_keys(auth_client, sample, b_item):
    c = auth_client
    b_info = f"/collections/{B}/items/{b_item['id']}/info?assets=ms"
    a_info = f"/collections/{A}/items/{sample.item(0)['id']}/info?assets=ms"
    assert c.get(b_info, headers={"X-API-Key": CAROL_KEY}).status_code == 200
    assert c.get(b_info, headers={"Authorization": f"ApiKey {CAROL_KEY}"}).status_code == 200
    # A's metadata is open to anyone (the anonymous `thumbs` grant), its tiles are not
    assert c.get(a_info, headers={"X-API-Key": CAROL_KEY}).status_code == 200
    z, x, y = tile_of(sample)
    a_tile = item_tile(A, sample.item(0)["id"], z, x, y)
    assert c.get(a_tile, params=MS_RGB, headers={"X-API-Key": CAROL_KEY}).status_code == 403
    r = c.get(b_info, headers={"X-API-Key": CAROL_KEY + "x"})
    assert r.status_code == 401 and CAROL_KEY not in r.text


def test_policy_max_zoom(auth_client, sample, keys):
    c = auth_client
    h = bearer(make_jwt(keys, user="lou", groups=["lowres"]))
    a_id = sample.item(0)["id"]
    lon, lat = lonlat_of_item_centre(sample.item(0))
    for z, want in ((11, 200), (12, 200), (13, 403), (16, 403)):
        x, y = mercator_tile(lon, lat, z)
        r = c.get(item_tile(A, a_id, z, x, y), params=MS_RGB, headers=h)
        assert r.status_code in ((want, 404) if want == 200 else (want,)), z
    # the same limit in another grid: WGS1984Quad level 13 is ~17 m/px (finer than WebMercator z12 there)
    r = c.get(f"/collections/{A}/items/{a_id}/tiles/WGS1984Quad/13/8264/2131.png", params=MS_RGB, headers=h)
    assert r.status_code == 403
    r = c.get(f"/collections/{A}/items/{a_id}/tiles/WGS1984Quad/10/1033/266.png", params=MS_RGB, headers=h)
    assert r.status_code in (200, 404)


# --------------------------------------------------------------------------- searches


def _register(c, headers, body):
    r = c.post("/searches/register", json=body, headers=headers)
    return r


def _tile_assets(c, search_id, z, x, y, headers):
    r = c.get(f"/searches/{search_id}/tiles/WebMercatorQuad/{z}/{x}/{y}/assets", headers=headers)
    assert r.status_code == 200, r.text
    return {it["id"] for it in r.json()}


def test_search_cannot_widen_past_policy(auth_client, sample, b_item, keys, db):
    c = auth_client
    alice = bearer(make_jwt(keys))
    carol = {"X-API-Key": CAROL_KEY}
    admin = bearer(make_jwt(keys, user="root", groups=["admins"]))
    widening = {
        "filter-lang": "cql2-json",
        "filter": {
            "op": "or",
            "args": [
                {"op": "=", "args": [{"property": "collection"}, B]},
                {"op": ">=", "args": [{"property": "eo:cloud_cover"}, 0]},
            ],
        },
    }
    r = _register(c, alice, widening)
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    stored = db.execute("SELECT search FROM pgstac.searches WHERE hash = %s", (sid,)).fetchone()[0]
    assert stored["collections"] == [A]
    z, x, y = tile_of(sample)
    got = _tile_assets(c, sid, z, x, y, alice)
    assert got and all(not i.startswith("B-") for i in got)
    # the same filter registered by an admin does reach B: the test above can fail
    r = _register(c, admin, widening)
    admin_sid = r.json()["id"]
    assert b_item["id"] in _tile_assets(c, admin_sid, z, x, y, admin)
    # pixels: alice's search tile equals the collection A mosaic tile; the admin's one shows B's halved pixels
    tile = f"/tiles/WebMercatorQuad/{z}/{x}/{y}.png"
    mine = read_png(c.get(f"/searches/{sid}{tile}", params=MS_RGB, headers=alice).content)
    coll_a = read_png(c.get(f"/collections/{A}{tile}", params=MS_RGB, headers=alice).content)
    theirs = read_png(c.get(f"/searches/{admin_sid}{tile}", params=MS_RGB, headers=admin).content)
    assert mine[..., 3].mean() > 0.5 * 255  # the tile is mostly inside the scenes
    assert np.array_equal(mine, coll_a)
    differ = np.any(mine[..., :3] != theirs[..., :3], axis=-1)
    print(f"pixels differing from the admin search tile: {differ.mean():.0%}")
    assert differ.mean() > 0.3  # B (newest, halved values) shows through the admin's search only
    # nobody can use a search wider than their rights
    assert c.get(f"/searches/{admin_sid}{tile}", params=MS_RGB, headers=alice).status_code == 403
    assert c.get(f"/searches/{sid}{tile}", params=MS_RGB, headers=carol).status_code == 403
    assert c.get(f"/searches/{sid}/info", headers=carol).status_code == 200  # A's metadata is public
    assert c.get(f"/searches/{admin_sid}/info", headers=carol).status_code == 403
    # asking for B explicitly is refused; listing every search is for full-access callers only
    assert _register(c, alice, {"collections": [B]}).status_code == 403
    assert c.get("/searches/", headers=alice).status_code == 403
    assert c.get("/searches/", headers=admin).status_code == 200
    assert c.get(f"/searches/{'0' * 32}/info", headers=alice).status_code == 404


# --------------------------------------------------------------------------- signed URL tokens


def _mint(c, headers, **body):
    r = c.post("/auth/token", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_signed_url_token_works_without_headers(auth_client, sample, b_item, keys):
    c = auth_client
    alice = bearer(make_jwt(keys))
    minted = _mint(c, alice, collections=[A], max_zoom=15, ttl=3600)
    tok = minted["token"]
    assert len(tok) < 400 and minted["url_prefix"].endswith(f"/t/{tok}")
    z, x, y = tile_of(sample)
    path = item_tile(A, sample.item(0)["id"], z, x, y)
    r = c.get(f"/t/{tok}{path}", params=MS_RGB)
    assert r.status_code == 200 and r.headers["cache-control"].startswith("private")
    assert c.get(path, params={**MS_RGB, "token": tok}).status_code == 200
    # scope: max zoom, collection
    z2, x2, y2 = tile_of(sample, z=16)
    assert (
        c.get(f"/t/{tok}{item_tile(A, sample.item(0)['id'], z2, x2, y2)}", params=MS_RGB).status_code == 403
    )
    assert c.get(f"/t/{tok}{item_tile(B, b_item['id'], z, x, y)}", params=MS_RGB).status_code == 403
    # a token cannot mint another one
    assert c.post(f"/t/{tok}/auth/token", json={}).status_code == 403


def test_forged_expired_and_revoked_url_tokens(auth_client, sample, keys, auth_files, dsn):
    c = auth_client
    alice = bearer(make_jwt(keys))
    z, x, y = tile_of(sample)
    path = item_tile(A, sample.item(0)["id"], z, x, y)
    tok = _mint(c, alice, collections=[A])["token"]
    prefix, body, sig = tok.split(".")
    payload = json.loads(_b64d(body))
    wider = dict(payload, c=[A, B], z=22)
    cases = {
        "scope widened": f"{prefix}.{_b64e(json.dumps(wider).encode())}.{sig}",
        "signature altered": f"{prefix}.{body}.{sig[:-2]}AA",
        "unknown key": mint_url_token({"k9": b"x" * 40}, sub="alice", groups=["team-a"], ttl=600)[0],
        "wrong secret, known kid": mint_url_token({"k2": b"y" * 40}, sub="alice", groups=["admins"], ttl=600)[
            0
        ],
        "expired": mint_url_token(
            {"k2": b"n" * 40}, sub="alice", groups=["team-a"], ttl=60, now=time.time() - 3600
        )[0],
        "not a token": "hello",
    }
    for name, bad in cases.items():
        r = c.get(f"/t/{bad}{path}", params=MS_RGB)
        assert r.status_code == 401, name
        assert bad not in r.text
    # revocation: by its owner only, effective at once
    assert c.get(f"/t/{tok}{path}", params=MS_RGB).status_code == 200
    carol = {"X-API-Key": CAROL_KEY}
    assert c.post("/auth/revoke", json={"token": tok}, headers=carol).status_code == 403
    assert c.post("/auth/revoke", json={"token": tok}, headers=alice).status_code == 204
    r = c.get(f"/t/{tok}{path}", params=MS_RGB)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # key rotation: a token signed with the old key works while the key is listed, not after
    old = mint_url_token({"k1": b"o" * 40}, sub="alice", groups=["team-a"], ttl=600)[0]
    assert c.get(f"/t/{old}{path}", params=MS_RGB).status_code == 200
    with TestClient(
        create_app(make_settings(dsn, auth=auth_settings(auth_files, signing_keys=KEY_NEW)))
    ) as c2:
        assert c2.get(f"/t/{old}{path}", params=MS_RGB).status_code == 401
        # revocations are shared through the database: another app instance sees them
        assert c2.get(f"/t/{tok}{path}", params=MS_RGB).status_code == 401


def test_tilejson_and_wmts_carry_the_token(auth_client, sample, keys):
    c = auth_client
    tok = _mint(c, bearer(make_jwt(keys)), collections=[A])["token"]
    for url, params in (
        (f"/t/{tok}/collections/{A}/WMTSCapabilities.xml", MS_RGB),
        (f"/collections/{A}/WMTSCapabilities.xml", {**MS_RGB, "token": tok}),
        (f"/t/{tok}/collections/{A}/items/{sample.item(0)['id']}/WMTSCapabilities.xml", MS_RGB),
    ):
        r = c.get(url, params=params)
        assert r.status_code == 200, r.text
        root = ET.fromstring(r.content)
        templates = [e.get("template") for e in root.iter() if e.tag.endswith("ResourceURL")]
        assert len(templates) >= 2
        assert all(f"/t/{tok}/" in t for t in templates), templates[0]
        # a tile URL from the capabilities works as is, without any header
        lon, lat = lonlat_of_item_centre(sample.item(0))
        x, y = mercator_tile(lon, lat, 14)
        web = [t for t in templates if "WebMercatorQuad" in t][0]
        tile = web.replace("{TileMatrix}", "14").replace("{TileCol}", str(x)).replace("{TileRow}", str(y))
        tile = re.sub(r"^https?://[^/]+", "", tile)
        assert c.get(tile).status_code == 200, tile
    tj = c.get(f"/t/{tok}/collections/{A}/WebMercatorQuad/tilejson.json", params=MS_RGB).json()
    assert f"/t/{tok}/" in tj["tiles"][0] and "token=" not in tj["tiles"][0]
    tj = c.get(f"/collections/{A}/WebMercatorQuad/tilejson.json", params={**MS_RGB, "token": tok}).json()
    assert f"/t/{tok}/" in tj["tiles"][0]


def test_qgis_urls(auth_client, sample, keys):
    c = auth_client
    r = c.get("/auth/qgis", params={"collection": A}, headers=bearer(make_jwt(keys)))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    urls = r.json()
    assert urls["wmts"].endswith("/WMTSCapabilities.xml")
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = mercator_tile(lon, lat, 14)
    xyz = urls["xyz"].format(z=14, x=x, y=y)
    r = c.get(re.sub(r"^https?://[^/]+", "", xyz))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = read_png(r.content)
    assert img[..., 3].mean() > 0.5 * 255 and img[..., :3].std() > 10  # real imagery, not blank
    assert c.get(re.sub(r"^https?://[^/]+", "", urls["wmts"])).status_code == 200
    assert c.get("/auth/qgis", params={"collection": B}, headers=bearer(make_jwt(keys))).status_code == 403
    assert c.get("/auth/qgis", params={"collection": A}).status_code == 401


def test_tokens_are_redacted_from_access_logs():
    tok = "dt1.eyJrIjoiazIifQ.c2lnbmF0dXJl"
    line = f'127.0.0.1:5000 - "GET /t/{tok}/collections/a/tiles/WebMercatorQuad/1/2/3.png?token={tok}&x=1 HTTP/1.1" 200'
    out = redact(line)
    assert tok not in out and "/t/***/collections/a" in out and "token=***" in out


def test_policy_file_is_reloaded(dsn, b_item, auth_files, keys, sample, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    settings = auth_settings(auth_files)
    settings.policy_file = str(policy)
    path = f"/collections/{B}/items/{b_item['id']}/info?assets=ms"
    with TestClient(create_app(make_settings(dsn, auth=settings))) as c:
        h = bearer(make_jwt(keys))
        assert c.get(path, headers=h).status_code == 403
        policy.write_text(
            POLICY.replace("[spot67-demo]\n  team-b", "[spot67-demo, restricted-b]\n  team-b", 1)
        )
        time.sleep(0.05)
        assert c.get(path, headers=h).status_code == 200
        policy.write_text("groups: [this is not a policy")  # a broken edit keeps the last good policy
        assert c.get(path, headers=h).status_code == 200


def test_dates_in_tokens_are_epoch_seconds():
    tok, payload = mint_url_token({"k": b"z" * 40}, sub="u", groups=[], ttl=60)
    assert abs(payload.exp - (dt.datetime.now(dt.UTC).timestamp() + 60)) < 5


@pytest.mark.parametrize(
    "doc,msg",
    [
        ({"groups": {"g": [{"collections": []}]}}, "non-empty"),
        ({"groups": {"g": [{"collections": ["a"], "operations": ["tiles", "write"]}]}}, "unknown operations"),
        (
            {"groups": {"g": [{"collections": ["a"], "max_zoom": 12, "operations": ["data"]}]}},
            "cannot include `data`",
        ),
        ({"groups": {"g": [{"collections": ["a"], "max_zoom": "12"}]}}, "max_zoom"),
        ({"groups": {}, "anonymous": ["nobody"]}, "undefined groups"),
        ({"groups": {"g": [{"collections": ["a"], "colections": ["b"]}]}}, "unknown keys"),
        (["not", "a", "mapping"], "mapping"),
    ],
)
def test_policy_errors_are_clear(doc, msg):
    from tiler.auth import Policy, PolicyError

    with pytest.raises(PolicyError, match=re.escape(msg)):
        Policy.from_mapping(doc)


def test_policy_merges_per_operation():
    from tiler.auth import Policy

    p = Policy.from_mapping(
        {
            "groups": {
                "thumbs": [{"collections": ["a"], "operations": ["preview"], "max_preview_size": 256}],
                "low": [{"collections": ["a*"], "max_zoom": 12}],
            }
        }
    )
    acc = p.access({"thumbs", "low"}, "a")
    # the thumbnail grant does not lift the tile limit of the other group, and vice versa
    assert acc.max_zoom == 12 and acc.max_preview_size == 1024 and not acc.allows("data")
    assert p.access({"thumbs"}, "b") is None and p.access({"low"}, "ab").max_zoom == 12


def test_jwks_from_url(auth_files, keys):
    """The identity provider's keys fetched over HTTP (a loopback server stands in for the IdP)."""
    from tiler.auth import InvalidCredentials, JwtVerifier
    from tiler.rangeserver import RangeHTTPServer

    server = RangeHTTPServer(auth_files)
    server.start_background()
    try:
        v = JwtVerifier(jwks_url=f"{server.url}/jwks.json", issuer=ISS, audience=AUD)
        p = v.verify(make_jwt(keys, key="ec", kid="ec-1", groups=["team-b"]))
        assert p.user == "alice" and p.groups == {"team-b"} and p.method == "jwt"
        with pytest.raises(InvalidCredentials):
            v.verify(make_jwt(keys, key="rogue", kid="rogue-1"))
    finally:
        server.shutdown()


def test_catalogue_wmts_lists_only_what_the_caller_may_tile(auth_client, keys):
    c = auth_client

    def layer_collections(headers=None, path="/WMTSCapabilities.xml"):
        r = c.get(path, params={"tilematrixsets": "LAMB93"}, headers=headers or {})
        assert r.status_code == 200, r.text
        ids = re.findall(r"<Layer>\s*<ows:Title>[^<]*</ows:Title>.*?<ows:Identifier>([^<]+)</ows:Identifier>", r.text, re.S)
        return {i.rsplit("_LAMB93_", 1)[0] for i in ids}, r.text

    assert layer_collections(bearer(make_jwt(keys)))[0] == {A}
    assert layer_collections(bearer(make_jwt(keys, user="bob", groups=("team-b",))))[0] == {B}
    # anonymous callers may only preview A here: no tiles, no layers, so sign in
    assert c.get("/WMTSCapabilities.xml").status_code == 401
    # with a URL token (how QGIS connects), every tile URL carries it
    tok = c.post("/auth/token", json={"ttl": 600}, headers=bearer(make_jwt(keys))).json()["token"]
    seen, xml = layer_collections(path=f"/t/{tok}/WMTSCapabilities.xml")
    assert seen == {A}
    templates = re.findall(r'template="([^"]+)"', xml)
    assert templates and all(f"/t/{tok}/collections/" in t for t in templates)


def test_thumbnails_follow_the_preview_grant(auth_client, sample, b_item):
    c = auth_client
    base = f"/collections/{A}/items/{sample.item(0)['id']}/thumbnail.png"
    r = c.get(base)  # anonymous: the `thumbs` grant allows previews up to 256 px
    assert r.status_code == 200 and r.headers["cache-control"].startswith("public") and "etag" in r.headers
    assert c.get(base, params={"size": 256}).status_code == 200
    assert c.get(base, params={"size": 512}).status_code == 401  # larger needs a sign-in
    assert c.get(f"/collections/{B}/items/{b_item['id']}/thumbnail.png").status_code == 401
    assert c.get(f"/collections/{A}/thumbnail.png").status_code == 200


def test_collections_and_items_listings_follow_the_policy(auth_client, sample, keys):
    c = auth_client
    h = bearer(make_jwt(keys))
    assert [x["id"] for x in c.get("/collections", headers=h).json()["collections"]] == [A]
    items = c.get(f"/collections/{A}/items", headers=h).json()["items"]
    assert [it["id"] for it in items] == [it["id"] for it in sorted(sample.items, key=lambda i: i["properties"]["datetime"], reverse=True)]
    assert c.get(f"/collections/{B}/items", headers=h).status_code == 403
    assert c.get(f"/collections/{A}/items", params={"limit": 100000}, headers=h).status_code == 422
    assert c.get(f"/collections/{A}/items", params={"bbox": "1,2"}, headers=h).status_code == 400


def test_asset_statistics_need_the_data_right(auth_client, sample, keys):
    """Per-asset statistics read pixels: the anonymous metadata+preview grant does not give them."""
    base = f"/collections/{A}/items/{sample.item(0)['id']}"
    assert auth_client.get(base + "/info", params={"assets": "ms"}).status_code == 200
    r = auth_client.get(base + "/asset_statistics", params={"assets": "ms"})
    assert r.status_code == 401, r.text
    assert "ms" not in r.json()
    r = auth_client.get(base + "/asset_statistics", params={"assets": "ms"}, headers=bearer(make_jwt(keys)))
    assert r.status_code == 200 and "ms" in r.json()


def test_cog_wmts_needs_the_cog_grant(dsn, cog_server, sample, auth_files, keys):
    """``/cog/WMTSCapabilities.xml`` is a /cog route: a user without the policy's `cog` grant gets 403."""
    settings = make_settings(
        dsn, auth=auth_settings(auth_files), enabled=True, allowed_prefixes=[cog_server.url + "/"]
    )
    url = f"{cog_server.url}/{sample.path(0, 'ms').name}"
    with TestClient(create_app(settings)) as c:
        headers = bearer(make_jwt(keys))
        assert c.get("/cog/info", params={"url": url}, headers=headers).status_code == 403
        r = c.get("/cog/WMTSCapabilities.xml", params={"url": url}, headers=headers)
        assert r.status_code == 403, r.text
        assert "TileMatrix" not in r.text
