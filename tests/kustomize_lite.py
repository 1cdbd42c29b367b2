"""A small kustomize for the tests: renders deploy/kubernetes without kubectl or a cluster.

It implements only what our kustomizations use and refuses anything else, so a new
kustomize feature in the manifests fails loudly here instead of rendering wrong:
``resources`` (files and directories), ``components``, ``patches`` (strategic-merge files
matched by kind and name), ``images`` and ``namespace``. When kubectl is installed the
tests compare this output with ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KINDS = {"Kustomization", "Component"}
KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}

# strategic-merge keys of the lists we patch (from the Kubernetes API's patchMergeKey)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class UnsupportedKustomization(ValueError):
    """The kustomization uses a feature this renderer does not implement."""


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(directory: Path) -> dict:
    doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if doc.get("kind") not in KINDS:
        raise UnsupportedKustomization(f"{directory}: kind {doc.get('kind')!r}")
    unknown = set(doc) - KEYS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: unsupported keys {sorted(unknown)}")
    return doc


def _key(res: dict) -> tuple[str, str]:
    return res["kind"], res["metadata"]["name"]


def merge(target: Any, patch: Any, field: str | None = None) -> Any:
    """Strategic merge of ``patch`` into ``target`` (a copy is returned)."""
    if isinstance(target, dict) and isinstance(patch, dict):
        out = copy.deepcopy(target)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(target, list) and isinstance(patch, list) and field in MERGE_KEYS:
        # as kustomize does: the patch's items first (merged into their originals), then the rest
        key = MERGE_KEYS[field]
        by_key = {item.get(key): item for item in target}
        patched = [
            merge(by_key[i[key]], i, field) if i.get(key) in by_key else copy.deepcopy(i) for i in patch
        ]
        done = {i.get(key) for i in patch}
        return patched + [copy.deepcopy(i) for i in target if i.get(key) not in done]
    return copy.deepcopy(patch)  # scalars and other lists are replaced


def _pod_specs(res: dict) -> list[dict]:
    spec = res.get("spec", {})
    if res["kind"] == "Pod":
        return [spec]
    if res["kind"] == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if "template" in spec and "spec" in spec["template"]:
        return [spec["template"]["spec"]]
    return []


def _set_image(res: dict, images: list[dict]) -> None:
    for pod in _pod_specs(res):
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            name = (
                c["image"].split("@")[0].rsplit(":", 1)[0] if ":" in c["image"].split("/")[-1] else c["image"]
            )
            for img in images:
                if img["name"] == name:
                    unknown = set(img) - {"name", "newName", "newTag"}
                    if unknown:
                        raise UnsupportedKustomization(f"images: {sorted(unknown)}")
                    c["image"] = (
                        f"{img.get('newName', name)}:{img['newTag']}"
                        if "newTag" in img
                        else img.get("newName", name)
                    )


def _apply(directory: Path, doc: dict, resources: list[dict]) -> list[dict]:
    for entry in doc.get("patches", []):
        unknown = set(entry) - {"path"}
        if unknown:
            raise UnsupportedKustomization(f"{directory}: patch keys {sorted(unknown)}")
        for patch in _load_docs(directory / entry["path"]):
            matches = [i for i, r in enumerate(resources) if _key(r) == _key(patch)]
            if len(matches) != 1:
                raise UnsupportedKustomization(
                    f"{directory}: patch {_key(patch)} matches {len(matches)} resources"
                )
            resources[matches[0]] = merge(resources[matches[0]], patch)
    if doc.get("images"):
        for res in resources:
            _set_image(res, doc["images"])
    if doc.get("namespace"):
        for res in resources:
            if res["kind"] not in CLUSTER_SCOPED:
                res["metadata"]["namespace"] = doc["namespace"]
    return resources


def render(directory: str | Path, extra_components: list[str | Path] = ()) -> list[dict]:
    """The resources of the kustomization in ``directory`` (plus ``extra_components``)."""
    directory = Path(directory).resolve()
    doc = _kustomization(directory)
    if doc["kind"] != "Kustomization":
        raise UnsupportedKustomization(f"{directory} is a {doc['kind']}, render a Kustomization")
    resources: list[dict] = []
    for entry in doc.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else _load_docs(path)
    components = [directory / c for c in doc.get("components", [])] + [
        Path(c).resolve() for c in extra_components
    ]
    for comp_dir in components:
        comp = _kustomization(comp_dir)
        if comp["kind"] != "Component" or set(comp) & {"namespace", "components"}:
            raise UnsupportedKustomization(f"{comp_dir}: only resources/patches/images in components")
        for entry in comp.get("resources", []):
            resources += _load_docs(comp_dir / entry)
        resources = _apply(comp_dir, comp, resources)
    keys = [_key(r) for r in resources]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise UnsupportedKustomization(f"{directory}: duplicate resources {sorted(dupes)}")
    return _apply(directory, {k: v for k, v in doc.items() if k != "components"}, resources)
