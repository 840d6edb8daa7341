"""The README, docker-compose.yml and settings agree with the code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shipline.config import VARIABLES, load
from shipline.infra.kafka import KAFKA_VERSION

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def test_every_variable_is_in_the_readme_table_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, (default, _) in VARIABLES.items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"{name} missing from the README's variable table"
        if default:
            assert f"`{default}`" in row, f"{name}: README default differs from {default!r}"


def test_compose_uses_the_same_kafka_version_and_is_valid() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"apache/kafka:{KAFKA_VERSION}" in compose
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose (Debian package) is installed by scripts/system-deps"
    env = {**os.environ, "SHIPLINE_ADMIN_TOKEN": "x", "SHIPLINE_SECRET_KEY": "y"}
    result = subprocess.run([tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_settings_defaults_and_overrides(tmp_path: Path) -> None:
    s = load({"SHIPLINE_DATA_DIR": str(tmp_path)})
    assert s.bootstrap_servers == "127.0.0.1:9092" and s.kafka_bootstrap == ""
    assert s.db_url.startswith("postgresql://") and s.http_port == 8080
    assert s.public_url == "http://127.0.0.1:8080"
    # generated secrets persist in the data dir, so a restart keeps them
    assert load({"SHIPLINE_DATA_DIR": str(tmp_path)}).admin_token == s.admin_token
    ext = load({"SHIPLINE_DATA_DIR": str(tmp_path), "KAFKA_BOOTSTRAP_SERVERS": "k:1", "DATABASE_URL": "postgresql://x/y"})
    assert ext.bootstrap_servers == "k:1" and ext.db_url == "postgresql://x/y"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", s.admin_token)
