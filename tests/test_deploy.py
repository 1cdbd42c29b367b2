"""Static checks of the deployment files (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

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
    import shutil
    import subprocess
    import sys

    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    res = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
