"""The container image: the Dockerfile passes hadolint, has the expected shape, and its build
context holds what it copies and nothing private."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.timeout(120)


def hadolint(path: Path) -> list[dict[str, Any]]:
    exe = Path(sys.executable).parent / "hadolint"
    cmd = [str(exe if exe.exists() else "hadolint"), "--no-fail", "-f", "json"]
    if (ROOT / ".hadolint.yaml").exists():
        cmd += ["--config", str(ROOT / ".hadolint.yaml")]
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=60,
                         check=True)
    findings: list[dict[str, Any]] = json.loads(out.stdout or "[]")
    return findings


def test_dockerfile_passes_hadolint() -> None:
    assert hadolint(ROOT / "Dockerfile") == []


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nRUN pip install orjson\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3007", "DL3008"} <= codes


def test_dockerfile_shape() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    froms = [i for i, ln in enumerate(instructions) if ln.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage"
    final = instructions[froms[-1]:]
    text = "\n".join(final)
    assert re.search(r"^USER [1-9]\d*(:\d+)?$", text, re.M), "fixed non-root numeric UID"
    assert 'ENTRYPOINT ["outbox"]' in final and 'CMD ["relay"]' in final
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make|cc)\b", text), "compiler in final"
    assert "slim" in (ROOT / "Dockerfile").read_text().split("AS build")[0]


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def included(rel: str) -> bool:
        keep = True
        for pat in patterns:
            negate = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(rel, pat) or pat == "**" or fnmatch.fnmatch(rel, pat + "/*"):
                keep = negate
        return keep

    copied = []
    for ln in (ROOT / "Dockerfile").read_text().splitlines():
        if ln.startswith("COPY ") and "--from" not in ln:
            copied += ln.split()[1:-1]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert included(src), f"{src} is excluded by .dockerignore"
    for private in (".venv", ".git", "tests", "outbox/__pycache__/x.pyc"):
        assert not included(private), f"{private} would be sent to the build"
