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


def area(cls, prefix: str, env: dict):
    """A settings class built from the ``prefix`` variables of ``env`` (defaults for the rest)."""
    return cls(**{k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)})


# the standalone STAC API the tiler's /stac replaced (it served the stored asset hrefs, unauthenticated)
OLD_STAC_API = re.compile(r"stac-fastapi|dinamis-stac|stac-api|POSTGRES_HOST_READER|TITILER_ENDPOINT")


def test_compose_services_and_secrets():
    from tiler.settings import StacSettings

    doc = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = doc["services"]
    # the tiler is the only API: the STAC API is its /stac, no separate service; export jobs
    # (a Redis and a worker) only with `--profile jobs`
    assert set(services) == {"database", "tiler", "redis", "worker"}
    assert services["redis"]["profiles"] == services["worker"]["profiles"] == ["jobs"]
    assert services["worker"]["command"] == "tiler worker"
    assert "ports" not in services["redis"] and "ports" not in services["worker"]
    assert not OLD_STAC_API.search(yaml.safe_dump(doc))
    assert services["tiler"]["depends_on"]["database"]["condition"] == "service_healthy"
    assert "healthcheck" in services["database"]
    # only the tiler listens beyond the host's loopback
    for name, svc in services.items():
        if name != "tiler":
            assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", [])), name
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
    # the STAC API is on, and both pools of every worker fit the database's `-N`
    stac = area(StacSettings, "TILER_STAC_", env)
    assert stac.enabled
    per_worker = int(env["TILER_DB_MAX_CONN"]) + stac.max_conn
    max_connections = int(re.search(r"-N (\d+)", services["database"]["command"])[1])
    assert per_worker * int(env["WEB_CONCURRENCY"]) + 3 <= max_connections


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


def production_with_jobs(tmp_path: Path) -> Path:
    """The production overlay with its commented export-jobs lines uncommented (as docs/exports.md says)."""
    text = (PRODUCTION / "kustomization.yaml").read_text()
    text, n = re.subn(
        r"^(\s*)# (- (?:\.\./\.\./components/export-jobs|path: worker-upstream\.yaml))",
        r"\1\2",
        text,
        flags=re.M,
    )
    assert n == 2, "the overlay no longer has the two commented export-jobs lines"
    doc = yaml.safe_load(text)
    tmp_path.mkdir(parents=True, exist_ok=True)
    for key in ("resources", "components"):
        doc[key] = [os.path.relpath(PRODUCTION / p, tmp_path) for p in doc[key]]
    for patch in doc["patches"]:
        shutil.copy(PRODUCTION / patch["path"], tmp_path / patch["path"])
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(doc))
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
    for directory in (K8S / "base", PRODUCTION, everything(tmp_path), production_with_jobs(tmp_path / "pj")):
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
        "production+jobs": render(production_with_jobs(tmp_path_factory.mktemp("k8s-jobs"))),
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
    # the tiler needs the primary (it writes; see docs/deployment.md, "Kubernetes"): <cluster>-rw
    assert env["PGHOST"] == f"{name}-rw"
    assert env["PGDATABASE"] == cluster["spec"]["bootstrap"]["initdb"]["database"]
    # the tiler (its STAC API included) is the only application client: one managed role,
    # the one whose password Secret it reads; no role is left for a client that is gone
    roles = {r["passwordSecret"]["name"]: r for r in cluster["spec"]["managed"]["roles"]}
    tiler_env = {e["name"]: e for e in container(res, "dinamis-tiler", "tiler")["env"]}
    assert tiler_env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] in roles
    assert tiler_env["PGUSER"]["valueFrom"]["secretKeyRef"]["name"] in roles
    assert set(roles) == {tiler_env["PGUSER"]["valueFrom"]["secretKeyRef"]["name"]}
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


RESERVED_CONNECTIONS = 3 + 10  # superuser_reserved_connections, operator + replication + migration job


def tiler_pools(resources: list[dict]) -> tuple[int, int, int, int]:
    """TILER_DB_MAX_CONN, the STAC API's pool (0 when off), workers per pod, pods at most.

    Every worker process has two pools: psycopg (tiles, TILER_DB_MAX_CONN) and the STAC
    API's asyncpg pool (TILER_STAC_MAX_CONN, when TILER_STAC_ENABLED). Pods: the HPA's
    maxReplicas plus the pods a rolling update adds on top (maxSurge).
    """
    from tiler.settings import DatabaseSettings, StacSettings

    res = by_key(resources)
    env = res[("ConfigMap", "dinamis-tiler-env")]["data"]
    db = DatabaseSettings(**{k: v for k, v in env.items() if k.startswith("TILER_DB_")})
    stac = area(StacSettings, "TILER_STAC_", env)
    max_replicas = res[("HorizontalPodAutoscaler", "dinamis-tiler")]["spec"]["maxReplicas"]
    strategy = res[("Deployment", "dinamis-tiler")]["spec"].get("strategy", {})
    surge = strategy.get("rollingUpdate", {}).get("maxSurge", "25%")
    if isinstance(surge, str):  # a percentage, rounded up as the Deployment controller does
        surge = -(-int(surge.rstrip("%")) * max_replicas // 100)
    stac_conn = stac.max_conn if stac.enabled else 0
    return db.max_conn, stac_conn, int(env["WEB_CONCURRENCY"]), max_replicas + surge


def tiler_connections(resources: list[dict]) -> int:
    """The tiler's worst case: (TILER_DB_MAX_CONN + TILER_STAC_MAX_CONN) x workers x pods."""
    db_conn, stac_conn, workers, pods = tiler_pools(resources)
    return (db_conn + stac_conn) * workers * pods


def worker_connections(resources: list[dict]) -> int:
    """Export workers: 1 connection per running job (tiler.jobs.run_export), 1 job per pod, + surge."""
    dep = by_key(resources).get(("Deployment", "dinamis-tiler-worker"))
    if dep is None:
        return 0
    surge = dep["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", 0)
    assert isinstance(surge, int)
    return dep["spec"]["replicas"] + surge


def budget_problems(resources: list[dict]) -> list[str]:
    """What does not fit: the tiler's role limit (its pods and the export workers), then max_connections."""
    res = by_key(resources)
    cluster = res[("Cluster", "pgstac")]["spec"]
    secret = next(
        e
        for e in res[("Deployment", "dinamis-tiler")]["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "PGUSER"
    )["valueFrom"]["secretKeyRef"]["name"]
    roles = cluster["managed"]["roles"]
    tiler_role = next(r for r in roles if r["passwordSecret"]["name"] == secret)
    tiler = tiler_connections(resources) + worker_connections(resources)  # the workers use the tiler's role
    # any other login role may use its whole connectionLimit
    others = sum(r.get("connectionLimit", 10**6) for r in roles if r is not tiler_role and r.get("login"))
    max_connections = int(cluster["postgresql"]["parameters"]["max_connections"])
    problems = []
    if tiler > tiler_role.get("connectionLimit", 10**6):
        problems.append(f"tiler {tiler} > role {tiler_role['name']} connectionLimit")
    if tiler + others + RESERVED_CONNECTIONS > max_connections:
        problems.append(f"tiler {tiler} + others {others} + reserved > max_connections {max_connections}")
    return problems


def test_connection_budget(rendered):
    """Both pools of every tiler worker, at maxReplicas + surge, fit the role's and the server's limits."""
    for name in ("production", "everything", "production+jobs"):
        assert budget_problems(rendered[name]) == [], name
    # production: (8 + 4) x 2 workers x (10 + 1 surge) pods
    assert tiler_connections(rendered["production"]) == (8 + 4) * 2 * 11


def test_connection_budget_counts_the_stac_pool(rendered):
    """The arithmetic fails on a real mistake: a larger STAC pool, a larger HPA, a STAC API back as a role."""
    from tiler.settings import StacSettings

    prod = rendered["production"]

    def patched(kind: str, name: str, patch: dict) -> list[dict]:
        return [merge(r, patch) if (r["kind"], r["metadata"]["name"]) == (kind, name) else r for r in prod]

    # the STAC pool counts (and TILER_STAC_MAX_CONN's default when the ConfigMap leaves it out)
    assert budget_problems(patched("ConfigMap", "dinamis-tiler-env", {"data": {"TILER_STAC_MAX_CONN": "8"}}))
    without = patched("ConfigMap", "dinamis-tiler-env", {"data": {"TILER_STAC_MAX_CONN": None}})
    assert tiler_connections(without) == (8 + StacSettings.model_fields["max_conn"].default) * 2 * 11
    # switched off, the STAC pool does not count
    off = patched("ConfigMap", "dinamis-tiler-env", {"data": {"TILER_STAC_ENABLED": "false"}})
    assert tiler_connections(off) == 8 * 2 * 11
    assert budget_problems(patched("HorizontalPodAutoscaler", "dinamis-tiler", {"spec": {"maxReplicas": 12}}))
    cluster = by_key(prod)[("Cluster", "pgstac")]
    extra = {"name": "stac", "login": True, "connectionLimit": 60, "passwordSecret": {"name": "x"}}
    roles = [*cluster["spec"]["managed"]["roles"], extra]
    assert budget_problems(patched("Cluster", "pgstac", {"spec": {"managed": {"roles": roles}}}))


def test_the_tiler_is_the_only_http_api(rendered):
    """No standalone STAC API (unauthenticated, it served the stored asset hrefs): the tiler's /stac."""
    from tiler.settings import StacSettings

    for name, resources in rendered.items():
        res = by_key(resources)
        assert not OLD_STAC_API.search(yaml.safe_dump(resources)), name
        workloads = {k: r for k, r in res.items() if k[0] in ("Deployment", "StatefulSet", "DaemonSet")}
        assert ("Deployment", "dinamis-tiler") in workloads
        assert set(workloads) <= {
            ("Deployment", "dinamis-tiler"),
            ("Deployment", "dinamis-redis"),
            ("Deployment", "dinamis-tiler-worker"),
            ("Deployment", "dinamis-jobs-redis"),
        }, name
        pods = [r["spec"]["template"]["metadata"]["labels"] for r in workloads.values()]
        pods += [r["spec"]["template"]["metadata"]["labels"] for k, r in res.items() if k[0] == "Job"]

        def selects_some_pod(selector: dict, pods: list[dict] = pods) -> bool:
            return any(all(p.get(k) == v for k, v in selector.items()) for p in pods)

        for key, r in res.items():
            # every Service and NetworkPolicy is about pods that exist (nothing left of a removed app)
            if key[0] == "Service":
                assert selects_some_pod(r["spec"]["selector"]), (name, key)
                if any(p["name"].startswith("http") for p in r["spec"]["ports"]):
                    assert key == ("Service", "dinamis-tiler"), (name, key)
            if key[0] == "NetworkPolicy":
                assert selects_some_pod(r["spec"]["podSelector"]["matchLabels"]), (name, key)
                for rule in r["spec"].get("egress", []) + r["spec"].get("ingress", []):
                    for peer in rule.get("to", []) + rule.get("from", []):
                        labels = peer.get("podSelector", {}).get("matchLabels", {})
                        if labels and "namespaceSelector" not in peer and "cnpg.io/cluster" not in labels:
                            assert selects_some_pod(labels), (name, key, labels)
            # no route to anything but the tiler
            if key[0] in ("Ingress", "HTTPRoute"):
                assert "dinamis-tiler" in yaml.safe_dump(r["spec"]), (name, key)
        # the tiler serves the STAC API (in-process) with an explicit read-only pool
        env = res[("ConfigMap", "dinamis-tiler-env")]["data"]
        stac = area(StacSettings, "TILER_STAC_", env)
        assert stac.enabled and "TILER_STAC_MAX_CONN" in env, name


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
    from tiler.settings import GdalSettings, ReaderSettings, StreamSettings, TileCacheSettings

    res = rendered["production"]
    env = by_key(res)[("ConfigMap", "dinamis-tiler-env")]["data"]
    gdal, reader, cache, stream = (
        area(GdalSettings, "TILER_GDAL_", env),
        area(ReaderSettings, "TILER_READER_", env),
        area(TileCacheSettings, "TILER_CACHE_", env),
        area(StreamSettings, "TILER_STREAM_", env),
    )
    mb = 2**20
    in_renders, python_mb, master_mb = 32, 160 + 320, 60
    per_worker = (
        gdal.gdal_cachemax * mb
        + int(gdal.cpl_vsil_curl_cache_size)
        + int(gdal.vsi_cache_size) * (in_renders + reader.pool_size)
        + cache.max_mb * mb
        + stream.max_total * stream.chunk_bytes * 2  # raw streams: one chunk read, one being sent
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
        "TILER_STAC_MAX_CONN",
        "TILER_STREAM_MAX_TOTAL",
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
        pods = [("dinamis-tiler", "tiler"), ("dinamis-tiler-worker", "worker")]
        for deployment, ctr in pods:
            if ("Deployment", deployment) not in res:
                continue
            c = container(resources, deployment, ctr)
            names = {e["name"] for e in c.get("env", [])}
            for src in c["envFrom"]:
                names |= set(res[("ConfigMap", src["configMapRef"]["name"])]["data"])
            unknown = names - known
            assert not unknown, f"{name} {deployment}: variables no setting reads: {sorted(unknown)}"
    services = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    for name in ("tiler", "worker"):
        unknown = set(services[name]["environment"]) - known
        assert not unknown, f"compose {name}: variables no setting reads: {sorted(unknown)}"


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
        # the STAC API under /stac, on the same role (pgstac_read): collections, search, item;
        # the stored hrefs appear nowhere, the assets are links to the tiler's /stream
        collection = item["collection"]
        assert c.get("/stac/collections").status_code == 200
        assert c.get(f"/stac/collections/{collection}").status_code == 200
        r = c.get("/stac/search", params={"collections": collection, "limit": 2})
        assert r.status_code == 200, r.text
        assert r.json()["features"]
        r = c.post("/stac/search", json={"collections": [collection], "ids": [item["id"]]})
        assert r.status_code == 200, r.text
        (found,) = r.json()["features"]
        for asset_name, asset in item["assets"].items():
            assert asset["href"] not in r.text
            assert found["assets"][asset_name]["href"].startswith("http://testserver/stream/collections/")

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


EXPORT_JOBS = K8S / "components" / "export-jobs"


def test_export_jobs_component_files():
    """Every file the component names exists and parses; it only adds, patches what base has."""
    doc = yaml.safe_load((EXPORT_JOBS / "kustomization.yaml").read_text())
    assert doc["kind"] == "Component"
    named = [*doc["resources"], *(p["path"] for p in doc["patches"])]
    assert sorted(named) == sorted(
        p.name for p in EXPORT_JOBS.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    base = {(r["kind"], r["metadata"]["name"]) for r in render(K8S / "base")}
    for patch in doc["patches"]:
        for d in yaml.safe_load_all((EXPORT_JOBS / patch["path"]).read_text()):
            assert (d["kind"], d["metadata"]["name"]) in base, (patch, d["metadata"]["name"])


def test_export_jobs_component_wiring(rendered):
    """Workers run `tiler worker` on the tiler's image and config; queue, results volume and env agree."""
    from urllib.parse import urlsplit

    from tiler.settings import JobSettings

    assert "TILER_JOBS_REDIS_URL" not in by_key(rendered["base"])[("ConfigMap", "dinamis-tiler-env")]["data"]
    assert ("Deployment", "dinamis-tiler-worker") not in by_key(rendered["production"])
    for name in ("everything", "production+jobs"):
        resources = rendered[name]
        res = by_key(resources)
        env = res[("ConfigMap", "dinamis-tiler-env")]["data"]
        jobs = area(JobSettings, "TILER_JOBS_", env)
        assert jobs.enabled and jobs.results_dir is not None
        tiler, worker = (
            container(resources, "dinamis-tiler", "tiler"),
            container(resources, "dinamis-tiler-worker", "worker"),
        )
        assert worker["image"] == tiler["image"]
        assert worker["command"] == ["tiler", "worker"]
        assert "ports" not in worker and "args" not in worker
        assert worker["envFrom"] == tiler["envFrom"]
        tiler_env = {e["name"]: e for e in tiler["env"]}
        for e in worker["env"]:  # the database role of the tiler, nothing the worker does not use
            assert e["name"] in {"PGUSER", "PGPASSWORD"} and e == tiler_env[e["name"]], e["name"]
        # the results directory: the same RWX claim, at TILER_JOBS_RESULTS_DIR, writable, in both pods
        pvc = res[("PersistentVolumeClaim", "dinamis-tiler-exports")]
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        for deployment, c in (("dinamis-tiler", tiler), ("dinamis-tiler-worker", worker)):
            pod = res[("Deployment", deployment)]["spec"]["template"]["spec"]
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(jobs.results_dir))
            assert not mount.get("readOnly")
            vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], deployment
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
            # every file the settings name is mounted (policy; upstream credentials in production)
            mounted = {m["mountPath"] for m in c["volumeMounts"]}
            for var in ("TILER_AUTH_POLICY_FILE", "TILER_UPSTREAM_CREDENTIALS_FILE"):
                if var in env:
                    assert str(Path(env[var]).parent) in mounted, (name, deployment, var)
        # a stopped worker finishes its job (rq's warm shutdown on SIGTERM) before kubelet kills it
        pod = res[("Deployment", "dinamis-tiler-worker")]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= jobs.job_timeout + 30
        # the queue: its own Redis, which never evicts (rq keeps jobs and their records in it)
        parts = urlsplit(jobs.redis_url.get_secret_value())
        service = res[("Service", parts.hostname)]
        assert parts.port in {p["port"] for p in service["spec"]["ports"]}
        redis_labels = res[("Deployment", parts.hostname)]["spec"]["template"]["metadata"]["labels"]
        args = container(resources, parts.hostname, "redis")["args"]
        assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
        # network: the tiler and the workers reach the queue, DNS, the database and the storage
        for labels in (
            res[("Deployment", d)]["spec"]["template"]["metadata"]["labels"]
            for d in ("dinamis-tiler", "dinamis-tiler-worker")
        ):
            allowed = set()
            for r in resources:
                sel = (
                    r["spec"].get("podSelector", {}).get("matchLabels", {})
                    if r["kind"] == "NetworkPolicy"
                    else None
                )
                if sel is not None and all(labels.get(k) == v for k, v in sel.items()):
                    for rule in r["spec"].get("egress", []):
                        allowed |= {p["port"] for p in rule["ports"]}
            assert {53, 5432, 443, parts.port} <= allowed, (name, labels)
            ingress = res[("NetworkPolicy", "dinamis-jobs-redis-ingress")]["spec"]
            assert all(redis_labels.get(k) == v for k, v in ingress["podSelector"]["matchLabels"].items())
            peers = [p["podSelector"]["matchLabels"] for rule in ingress["ingress"] for p in rule["from"]]
            assert any(all(labels.get(k) == v for k, v in peer.items()) for peer in peers), labels
        # the workers are not behind the tiler's Service, PDB or HPA
        worker_labels = res[("Deployment", "dinamis-tiler-worker")]["spec"]["template"]["metadata"]["labels"]
        for key in (("Service", "dinamis-tiler"), ("PodDisruptionBudget", "dinamis-tiler")):
            sel = res[key]["spec"]["selector"]
            sel = sel.get("matchLabels", sel)
            assert not all(worker_labels.get(k) == v for k, v in sel.items()), key


def test_export_worker_memory(rendered):
    """The arithmetic in worker-deployment.yaml, from the ConfigMap and tiler.export's strip size."""
    from tiler.export import BLOCK, STRIP_PIXELS
    from tiler.settings import GdalSettings, JobSettings

    res = rendered["production+jobs"]
    env = by_key(res)[("ConfigMap", "dinamis-tiler-env")]["data"]
    gdal, jobs = area(GdalSettings, "TILER_GDAL_", env), area(JobSettings, "TILER_JOBS_", env)
    mb = 2**20
    per_pixel = 160  # bytes per output pixel of a pansharpened strip (float64 working arrays), measured
    fixed = (
        gdal.gdal_cachemax * mb + int(gdal.cpl_vsil_curl_cache_size) + int(gdal.vsi_cache_size) * 4 + 210 * mb
    )
    typical = fixed + STRIP_PIXELS * per_pixel
    widest = fixed + max(STRIP_PIXELS, BLOCK * jobs.max_size) * per_pixel
    r = container(res, "dinamis-tiler-worker", "worker")["resources"]
    assert typical <= quantity(r["requests"]["memory"]) <= 1.5 * typical
    assert quantity(r["limits"]["memory"]) >= 1.2 * widest
