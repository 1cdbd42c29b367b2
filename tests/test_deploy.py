"""Static checks of the deployment files (no Docker engine runs here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kustomize_lite import UnsupportedKustomization, merge, render

from tiler.auth import ApiKeyStore, Policy

ROOT = Path(__file__).resolve().parents[1]


def test_compose_services_and_secrets():
    doc = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = doc["services"]
    assert {"database", "tiler", "stac"} <= set(services)
    for name in ("tiler", "stac"):
        assert services[name]["depends_on"]["database"]["condition"] == "service_healthy"
    assert "healthcheck" in services["database"]
    # every password comes from the environment and is required (no default secret)
    for svc in services.values():
        for key, value in (svc.get("environment") or {}).items():
            if "PASS" in key or key == "TILER_AUTH_SIGNING_KEYS":
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (key, value)
    # the tiler starts with access control: its policy file is mounted and valid
    env = services["tiler"]["environment"]
    assert env.get("TILER_AUTH_ENABLED", "true") != "false"
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["tiler"]["volumes"]}
    policy = (
        ROOT
        / "deploy"
        / mounted[str(Path(env["TILER_AUTH_POLICY_FILE"]).parent)]
        / Path(env["TILER_AUTH_POLICY_FILE"]).name
    )
    Policy.from_mapping(yaml.safe_load(policy.read_text()))
    ApiKeyStore.from_mapping(
        yaml.safe_load((policy.parent / Path(env["TILER_AUTH_API_KEYS_FILE"]).name).read_text())
    )
    # the tiler and the STAC API read the same database
    assert (
        services["tiler"]["environment"]["PGHOST"] == services["stac"]["environment"]["POSTGRES_HOST_READER"]
    )


def test_dockerfile_multistage_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    assert "tiler.main:create_app()" in text
    assert not re.search(r"^ADD https?://", text, re.M)


def test_hadolint_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    res = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- Kubernetes

K8S = ROOT / "deploy" / "kubernetes"
PRODUCTION = K8S / "overlays" / "production"
COMPONENTS = sorted(p for p in (K8S / "components").iterdir() if p.is_dir())
# the oldest Kubernetes minor the manifests must be valid for
K8S_VERSION = "1.29.0"


def by_key(resources: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


def everything(tmp_path: Path) -> Path:
    """A kustomization with the base and every component (what an operator may combine)."""
    k = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "dinamis-test",
        "resources": [os.path.relpath(K8S / "base", tmp_path)],
        "components": [os.path.relpath(c, tmp_path) for c in COMPONENTS],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(k))
    return tmp_path


def container(resources, deployment: str, name: str) -> dict:
    spec = by_key(resources)[("Deployment", deployment)]["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def quantity(q: str) -> float:
    """Kubernetes quantity -> base units (bytes, cores)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if str(q).endswith(suffix):
            return float(str(q)[: -len(suffix)]) * factor
    return float(q)


def test_render_matches_kubectl_kustomize(tmp_path):
    exe = shutil.which("kubectl") or shutil.which("kustomize")
    if exe is None:
        pytest.skip("kubectl/kustomize not installed: the in-test renderer alone is used")
    for directory in (K8S / "base", PRODUCTION, everything(tmp_path)):
        cmd = (
            [exe, "kustomize", str(directory)] if exe.endswith("kubectl") else [exe, "build", str(directory)]
        )
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
        assert by_key(render(directory)) == by_key([d for d in yaml.safe_load_all(out) if d]), directory


def test_renderer_merges_like_kustomize_and_refuses_the_unknown(tmp_path):
    base = {
        "spec": {
            "containers": [{"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]}]
        }
    }
    patch = {
        "spec": {
            "containers": [{"name": "a", "env": [{"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}]}]
        }
    }
    env = merge(base, patch)["spec"]["containers"][0]["env"]
    assert env == [{"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}, {"name": "X", "value": "1"}]
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": None}}) == {"a": {"c": 2}}
    (tmp_path / "kustomization.yaml").write_text("kind: Kustomization\nconfigMapGenerator: []\n")
    with pytest.raises(UnsupportedKustomization):
        render(tmp_path)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return {
        "base": render(K8S / "base"),
        "production": render(PRODUCTION),
        "everything": render(everything(tmp_path_factory.mktemp("k8s"))),
    }


def test_manifests_valid_against_kubernetes_schemas(rendered):
    """Every built-in resource against the Kubernetes OpenAPI schemas bundled by kubernetes-validate."""
    import kubernetes_validate

    crds = []
    for name, resources in rendered.items():
        for res in resources:
            try:
                kubernetes_validate.validate(res, K8S_VERSION, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                crds.append(res["kind"])
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {res['kind']}/{res['metadata']['name']}: {e.message} at {list(e.path)}")
    assert set(crds) == {"Cluster"}  # checked below, structurally


def test_validator_catches_a_broken_manifest(rendered):
    import kubernetes_validate

    dep = by_key(rendered["base"])[("Deployment", "dinamis-tiler")]
    bad = merge(
        dep, {"spec": {"template": {"spec": {"containers": [{"name": "tiler", "readinessprobe": {}}]}}}}
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = merge(dep, {"spec": {"replicas": "two"}})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# the subset of CloudNativePG's Cluster v1 schema the manifests use (its CRD is not vendored)
CNPG_CLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "postgresql.cnpg.io/v1"},
        "kind": {"const": "Cluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["instances"],
            "additionalProperties": False,
            "properties": {
                "instances": {"type": "integer", "minimum": 1},
                "imageName": {"type": "string"},
                "enableSuperuserAccess": {"type": "boolean"},
                "postgresql": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "parameters": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "bootstrap": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "initdb": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "database": {"type": "string"},
                                "owner": {"type": "string"},
                                "postInitApplicationSQL": {"type": "array", "items": {"type": "string"}},
                            },
                        }
                    },
                },
                "managed": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "roles": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    "ensure": {"enum": ["present", "absent"]},
                                    "login": {"type": "boolean"},
                                    "connectionLimit": {"type": "integer"},
                                    "inRoles": {"type": "array", "items": {"type": "string"}},
                                    "passwordSecret": {
                                        "type": "object",
                                        "required": ["name"],
                                        "additionalProperties": False,
                                        "properties": {"name": {"type": "string"}},
                                    },
                                },
                            },
                        }
                    },
                },
                "storage": {
                    "type": "object",
                    "required": ["size"],
                    "additionalProperties": False,
                    "properties": {"size": {"type": "string"}, "storageClass": {"type": "string"}},
                },
                "resources": {"type": "object"},
            },
        },
    },
}


def test_cloudnative_pg_cluster_and_how_the_tiler_reaches_it(rendered):
    import jsonschema

    res = rendered["production"]
    cluster = by_key(res)[("Cluster", "pgstac")]
    jsonschema.validate(cluster, CNPG_CLUSTER_SCHEMA)
    name = cluster["metadata"]["name"]
    env = by_key(res)[("ConfigMap", "dinamis-tiler-env")]["data"]
    # the tiler needs the primary (it writes; see README "Kubernetes"): <cluster>-rw
    assert env["PGHOST"] == f"{name}-rw"
    assert env["PGDATABASE"] == cluster["spec"]["bootstrap"]["initdb"]["database"]
    stac = {e["name"]: e for e in container(res, "dinamis-stac", "stac")["env"]}
    assert stac["POSTGRES_HOST_WRITER"]["value"] == f"{name}-rw"
    # each app logs in with the managed role whose password Secret it reads
    roles = {r["passwordSecret"]["name"]: r for r in cluster["spec"]["managed"]["roles"]}
    tiler_env = {e["name"]: e for e in container(res, "dinamis-tiler", "tiler")["env"]}
    assert tiler_env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] in roles
    assert tiler_env["PGUSER"]["valueFrom"]["secretKeyRef"]["name"] in roles
    assert stac["POSTGRES_PASS"]["valueFrom"]["secretKeyRef"]["name"] in roles
    # the egress policy lets the tiler reach exactly this cluster's pods on 5432
    policy = by_key(res)[("NetworkPolicy", "dinamis-tiler-egress")]
    db_rules = [r for r in policy["spec"]["egress"] if any(p["port"] == 5432 for p in r["ports"])]
    assert db_rules and db_rules[0]["to"][0]["podSelector"]["matchLabels"] == {"cnpg.io/cluster": name}
    # the migration job grants the roles the apps log in with
    job = by_key(res)[("Job", "dinamis-migrate")]["spec"]["template"]["spec"]["containers"][0]
    args = job["command"]
    granted = {args[i + 1] for i, a in enumerate(args) if a == "--grant-reader"}
    assert granted == {r["name"] for r in cluster["spec"]["managed"]["roles"]}
    assert job["image"] == container(res, "dinamis-tiler", "tiler")["image"]


def test_connection_budget(rendered):
    """TILER_DB_MAX_CONN x WEB_CONCURRENCY x HPA maxReplicas fits the role's and the server's limits."""
    res = by_key(rendered["production"])
    env = res[("ConfigMap", "dinamis-tiler-env")]["data"]
    hpa = res[("HorizontalPodAutoscaler", "dinamis-tiler")]["spec"]
    cluster = res[("Cluster", "pgstac")]["spec"]
    tiler = int(env["TILER_DB_MAX_CONN"]) * int(env["WEB_CONCURRENCY"]) * hpa["maxReplicas"]
    limits = {r["name"]: r.get("connectionLimit", 10**6) for r in cluster["managed"]["roles"]}
    assert tiler <= limits["tiler"]
    stac_env = {
        e["name"]: e.get("value") for e in container(rendered["production"], "dinamis-stac", "stac")["env"]
    }
    # stac-fastapi-pgstac opens a reader and a writer pool per replica
    stac = 2 * int(stac_env["DB_MAX_CONN_SIZE"]) * res[("Deployment", "dinamis-stac")]["spec"]["replicas"]
    assert stac <= limits["stac"]
    reserved = 3 + 10  # superuser_reserved_connections, operator + replication + migration job
    assert tiler + stac + reserved <= int(cluster["postgresql"]["parameters"]["max_connections"])


def test_tiler_pod_wiring(rendered):
    """Selectors, ports, probes, image user and volumes agree with each other and the Dockerfile."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    for resources in rendered.values():
        res = by_key(resources)
        dep = res[("Deployment", "dinamis-tiler")]
        labels = dep["spec"]["template"]["metadata"]["labels"]

        def selects(selector: dict, labels: dict = labels) -> bool:
            return all(labels.get(k) == v for k, v in selector.items())

        assert selects(dep["spec"]["selector"]["matchLabels"])
        assert selects(res[("Service", "dinamis-tiler")]["spec"]["selector"])
        assert selects(res[("PodDisruptionBudget", "dinamis-tiler")]["spec"]["selector"]["matchLabels"])
        for key, r in res.items():
            if (
                key[0] == "NetworkPolicy"
                and r["metadata"]["labels"]["app.kubernetes.io/name"] == "dinamis-tiler"
            ):
                assert selects(r["spec"]["podSelector"]["matchLabels"]), key
        for c in dep["spec"]["template"]["spec"]["topologySpreadConstraints"]:
            assert selects(c["labelSelector"]["matchLabels"])
        target = res[("HorizontalPodAutoscaler", "dinamis-tiler")]["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"], target["name"]) == (
            "apps/v1",
            "Deployment",
            "dinamis-tiler",
        )
        pdb = res[("PodDisruptionBudget", "dinamis-tiler")]["spec"]
        assert (
            pdb["maxUnavailable"] < res[("HorizontalPodAutoscaler", "dinamis-tiler")]["spec"]["minReplicas"]
        )

        c = container(resources, "dinamis-tiler", "tiler")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert ports["http"] == int(env["PORT"]) == int(re.search(r"^EXPOSE (\d+)", dockerfile, re.M)[1])
        assert res[("Service", "dinamis-tiler")]["spec"]["ports"][0]["targetPort"] in ports
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["port"] in ports
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
        # /readyz answers within the probe's timeout: 1 s DB ping + the storage probe timeout
        assert c["readinessProbe"]["timeoutSeconds"] >= 1 + 2

        pod = dep["spec"]["template"]["spec"]
        uid = re.search(r"^USER (\d+)", dockerfile, re.M)[1]
        assert pod["securityContext"]["runAsNonRoot"] and str(pod["securityContext"]["runAsUser"]) == uid
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "emptyDir" in vols[mounts["/tmp"]]
        assert set(mounts.values()) <= set(vols)
        for res_ in resources:
            for spec in [r["spec"]["template"]["spec"] for r in [res_] if r["kind"] in ("Deployment", "Job")]:
                for ctr in spec["containers"]:
                    assert {"cpu", "memory"} <= set(ctr["resources"]["requests"]), ctr["name"]
                    assert "memory" in ctr["resources"]["limits"], ctr["name"]


def test_probe_paths_answer_in_the_app(rendered, dsn):
    from starlette.testclient import TestClient

    from tests.conftest import make_settings
    from tiler.main import create_app

    c = container(rendered["production"], "dinamis-tiler", "tiler")
    with TestClient(create_app(make_settings(dsn))) as client:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            r = client.get(c[probe]["httpGet"]["path"])
            assert r.status_code == 200, (probe, r.status_code)


def test_memory_request_covers_the_gdal_caches(rendered):
    """The arithmetic in tiler-deployment.yaml, recomputed from the ConfigMap the pod reads."""
    from tiler.settings import GdalSettings, ReaderSettings, TileCacheSettings

    res = rendered["production"]
    env = by_key(res)[("ConfigMap", "dinamis-tiler-env")]["data"]

    def area(cls, prefix):
        return cls(**{k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)})

    gdal, reader, cache = (
        area(GdalSettings, "TILER_GDAL_"),
        area(ReaderSettings, "TILER_READER_"),
        area(TileCacheSettings, "TILER_CACHE_"),
    )
    mb = 2**20
    in_renders, python_mb, master_mb = 32, 160 + 320, 60
    per_worker = (
        gdal.gdal_cachemax * mb
        + int(gdal.cpl_vsil_curl_cache_size)
        + int(gdal.vsi_cache_size) * (in_renders + reader.pool_size)
        + cache.max_mb * mb
        + python_mb * mb
    )
    need = per_worker * int(env["WEB_CONCURRENCY"]) + master_mb * mb
    r = container(res, "dinamis-tiler", "tiler")["resources"]
    assert quantity(r["requests"]["memory"]) >= need
    assert quantity(r["limits"]["memory"]) >= 1.2 * need
    assert quantity(r["requests"]["memory"]) <= 1.5 * need  # not wildly oversized either


def settings_env_names() -> set[str]:
    """Every environment variable the settings classes read (what pydantic-settings looks up)."""
    from pydantic_settings import BaseSettings

    import tiler.settings as s

    names = set()
    for cls in vars(s).values():
        if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls is not BaseSettings:
            prefix = cls.model_config.get("env_prefix", "")
            for field_name, field in cls.model_fields.items():
                if isinstance(field.default_factory, type) and issubclass(
                    field.default_factory, BaseSettings
                ):
                    continue  # a nested settings class, read through its own prefix
                alias = field.validation_alias
                names.add((alias if isinstance(alias, str) else prefix + field_name).upper())
    return names


def test_every_env_var_is_read_by_the_settings(rendered):
    """Catches typos: a misspelt TILER_* variable would be silently ignored by the app."""
    from titiler.pgstac.settings import CacheSettings, PgstacSettings

    known = settings_env_names()
    assert {
        "TILER_DB_MAX_CONN",
        "PGHOST",
        "TILER_API_READINESS_PROBE_URLS",
        "TILER_GDAL_GDAL_CACHEMAX",
    } <= known
    # titiler-pgstac's own variables, and the two the image's CMD reads
    for cls in (CacheSettings, PgstacSettings):
        prefix = cls.model_config.get("env_prefix", "")
        known |= {(prefix + f).upper() for f in cls.model_fields}
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_vars = {v for v in ("WEB_CONCURRENCY", "PORT") if "${" + v + "}" in dockerfile}
    assert image_vars == {"WEB_CONCURRENCY", "PORT"}
    known |= image_vars
    for name, resources in rendered.items():
        res = by_key(resources)
        c = container(resources, "dinamis-tiler", "tiler")
        names = {e["name"] for e in c["env"]}
        for src in c["envFrom"]:
            names |= set(res[("ConfigMap", src["configMapRef"]["name"])]["data"])
        unknown = names - known
        assert not unknown, f"{name}: variables no setting reads: {sorted(unknown)}"
        # the STAC API gets the variables compose gives it (plus its pool sizes)
        compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["stac"]
        stac = {e["name"] for e in container(resources, "dinamis-stac", "stac")["env"]}
        assert stac - {"DB_MIN_CONN_SIZE", "DB_MAX_CONN_SIZE"} == set(compose["environment"])


def test_tiler_config_files_and_secrets(rendered):
    res = by_key(rendered["production"])
    env = res[("ConfigMap", "dinamis-tiler-env")]["data"]
    dep = res[("Deployment", "dinamis-tiler")]["spec"]["template"]["spec"]
    c = dep["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in dep["volumes"]}
    policy_dir = str(Path(env["TILER_AUTH_POLICY_FILE"]).parent)
    cm = res[("ConfigMap", vols[mounts[policy_dir]]["configMap"]["name"])]
    assert "subPath" not in str(c["volumeMounts"])  # kubelet must be able to update the files
    Policy.from_mapping(yaml.safe_load(cm["data"][Path(env["TILER_AUTH_POLICY_FILE"]).name]))
    for var in ("TILER_AUTH_API_KEYS_FILE", "TILER_UPSTREAM_CREDENTIALS_FILE"):
        assert "secret" in vols[mounts[str(Path(env[var]).parent)]], var
    # secrets come from Secrets, and no Secret (nor a secret-looking value) is in the manifests
    secret_env = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"PGPASSWORD", "TILER_AUTH_SIGNING_KEYS"} <= secret_env
    for kind, _ in res:
        assert kind != "Secret"
    for key in env:
        assert not re.search(r"PASS|SECRET|SIGNING_KEYS|DATABASE_URL", key), key
    # readiness probe URLs in the overlay are valid for the settings
    from tiler.settings import ApiSettings

    assert ApiSettings(readiness_probe_urls=env["TILER_API_READINESS_PROBE_URLS"]).readiness_probe_urls


def test_compose_file_valid_against_compose_spec():
    """check-jsonschema's vendored Compose Specification schema (offline)."""
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    cmd = [exe, "--builtin-schema", "vendor.compose-spec"]
    res = subprocess.run(
        [*cmd, str(ROOT / "deploy" / "compose.yaml")], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_validator_catches_a_broken_file(tmp_path):
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    doc = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    doc["services"]["tiler"]["depends_on"]["database"]["condition"] = "service_started_maybe"
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(doc))
    res = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0


def test_database_roles_the_manifests_set_up(rendered, dsn, sample):
    """Roles as CloudNativePG creates them + the migration job's grants: the tiler works on the primary.

    On a read-only session (what a `-ro` hot-standby service gives) mosaics do not work:
    titiler-pgstac registers a search per collection mosaic and pgstac's mosaic query
    writes a temporary table. That is why the tiler points at `<cluster>-rw`.
    """
    import secrets
    import time as _time

    import psycopg
    from psycopg import sql
    from starlette.testclient import TestClient

    from tests.conftest import make_settings
    from tests.helpers import lonlat_of_item_centre, mercator_tile
    from tiler.cli import cli
    from tiler.main import create_app

    res = by_key(rendered["production"])
    cluster = res[("Cluster", "pgstac")]["spec"]
    roles = [r["name"] for r in cluster["managed"]["roles"]]
    tiler_role = res[("Deployment", "dinamis-tiler")]  # the role whose Secret the tiler reads
    secret = next(
        e for e in tiler_role["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "PGUSER"
    )
    tiler_role = next(
        r["name"]
        for r in cluster["managed"]["roles"]
        if r["passwordSecret"]["name"] == secret["valueFrom"]["secretKeyRef"]["name"]
    )
    standby = tiler_role + "_standby_emulation"
    password = secrets.token_urlsafe(18)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for role in [*roles, standby]:
            conn.execute(
                sql.SQL(
                    "DO $$ BEGIN CREATE ROLE {}; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
                ).format(sql.Identifier(role))
            )
            # what CloudNativePG's managed roles do: LOGIN with the Secret's password, nothing else
            conn.execute(
                sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
            )
        conn.execute(
            sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(sql.Identifier(standby))
        )

    command = res[("Job", "dinamis-migrate")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "tiler"
    args = [*command[1:], "--grant-reader", standby, "--grant-revocations", standby, "--dsn", dsn]
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    item = sample.item(0)
    x, y = mercator_tile(*lonlat_of_item_centre(item), 15)
    item_tile = f"/collections/{item['collection']}/items/{item['id']}/tiles/WebMercatorQuad/15/{x}/{y}.tif"
    mosaic_tile = f"/collections/{item['collection']}/tiles/WebMercatorQuad/15/{x}/{y}.tif"
    host = dsn.split("@", 1)[1]

    def role_dsn(role: str) -> str:
        return f"postgresql://{role}:{password}@{host}"

    with TestClient(create_app(make_settings(role_dsn(tiler_role)))) as c:
        assert c.get("/readyz").status_code == 200
        assert c.get(item_tile, params={"assets": "ms"}).status_code == 200
        assert c.get(mosaic_tile, params={"assets": "ms"}).status_code == 200
        r = c.post("/searches/register", json={"collections": [item["collection"]], "limit": 7})
        assert r.status_code == 200, r.text
        search_id = r.json()["id"]
        r = c.get(f"/searches/{search_id}/tiles/WebMercatorQuad/15/{x}/{y}.tif", params={"assets": "ms"})
        assert r.status_code == 200
        # token revocations: written and read back by the tiler's role
        from tiler.access import RevocationList

        revoked = RevocationList(lambda: c.app.state.dbpool, interval=0)
        jti = secrets.token_hex(8)
        revoked.revoke(jti, "someone", int(_time.time()) + 3600)
        assert RevocationList(lambda: c.app.state.dbpool, interval=0)(jti)

    with TestClient(create_app(make_settings(role_dsn(standby))), raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200  # it connects and reads...
        assert c.get("/collections").status_code == 200
        # ...but cannot serve mosaics on a read-only session (a query no cache has seen yet)
        r = c.get(mosaic_tile, params={"assets": "ms", "datetime": "1990-01-01T00:00:00Z/.."})
        assert r.status_code != 200
        assert password not in r.text
        r = c.get(
            f"/searches/{search_id}/tiles/WebMercatorQuad/14/{x // 2}/{y // 2}.tif", params={"assets": "ms"}
        )
        assert r.status_code != 200
        assert password not in r.text


def test_redis_component_points_the_tile_cache_at_it(rendered):
    """With components/redis the tiler's second cache tier is that Redis; without it there is none."""
    from urllib.parse import urlsplit

    from tiler.settings import TileCacheSettings

    assert "TILER_CACHE_REDIS_URL" not in by_key(rendered["base"])[("ConfigMap", "dinamis-tiler-env")]["data"]
    res = by_key(rendered["everything"])
    url = res[("ConfigMap", "dinamis-tiler-env")]["data"]["TILER_CACHE_REDIS_URL"]
    parts = urlsplit(TileCacheSettings(redis_url=url).redis_url.get_secret_value())
    service = res[("Service", "dinamis-redis")]
    assert parts.hostname == service["metadata"]["name"]
    assert parts.port in {p["port"] for p in service["spec"]["ports"]}
    egress = res[("NetworkPolicy", "dinamis-tiler-egress-redis")]["spec"]["egress"]
    assert parts.port in {p["port"] for rule in egress for p in rule["ports"]}
    args = container(rendered["everything"], "dinamis-redis", "redis")["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
