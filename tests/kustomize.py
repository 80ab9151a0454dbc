"""The kustomize bases of k8s/, rendered as the cluster would see them (for the deployment
tests)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT

K8S = ROOT / "k8s"
Obj = dict[str, Any]


def _kubectl() -> str | None:
    return shutil.which("kubectl") or shutil.which("kustomize")


def render(directory: Path) -> list[Obj]:
    """The kustomize output: `kubectl kustomize` when installed, else the listed resources."""
    tool = _kubectl()
    if tool is not None:
        cmd = [tool, "kustomize", str(directory)] if tool.endswith("kubectl") else \
              [tool, "build", str(directory)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return load_resources(directory)


def load_resources(directory: Path) -> list[Obj]:
    """What kustomize does for a base that only lists plain resources."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, \
        "the fallback renderer only handles plain resources"
    docs: list[Obj] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((directory / name).read_text()) if d]
    return docs
