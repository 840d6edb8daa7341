"""Shape checks of management and token-hook request bodies: every failure names its field.

These are checks of form, not business rules: what a request means is decided downstream.
"""

from __future__ import annotations

import re
from typing import Any

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NO_SPACE = re.compile(r"^\S+$")
IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
MAX_TEXT = 2048
KINDS = ("service", "job")
STRATEGIES = ("docker", "process")
BUILD_KEYS = ("dockerfile", "context", "test_command")


def storable(text: str) -> bool:
    """Text PostgreSQL and UTF-8 can hold: no NUL, no lone surrogate (JSON allows both)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Invalid(ValueError):
    """A request body field is missing or malformed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _text(doc: dict[str, Any], field: str, *, pattern: re.Pattern[str] | None = NO_SPACE, limit: int = MAX_TEXT) -> str:
    value = doc[field]
    if not isinstance(value, str) or not value:
        raise Invalid(field, f"field '{field}' must be a non-empty string")
    if len(value) > limit or not storable(value):
        raise Invalid(field, f"field '{field}' is longer than {limit} characters or not valid text")
    if pattern is not None and not pattern.match(value):
        raise Invalid(field, f"field '{field}' is malformed: {value[:80]!r}")
    return value


def _optional_text(doc: dict[str, Any], field: str, **kw: Any) -> str | None:
    return None if doc[field] is None else _text(doc, field, **kw)


def _choice(doc: dict[str, Any], field: str, choices: tuple[str, ...]) -> str:
    value = doc[field]
    if value not in choices:
        raise Invalid(field, f"field '{field}' must be one of {', '.join(choices)}")
    return str(value)


def _branch(doc: dict[str, Any], field: str) -> str:
    value = _text(doc, field, limit=255)
    return value.removeprefix("refs/heads/") or value


def _port(doc: dict[str, Any], field: str) -> int | None:
    value = doc[field]
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= 65535:
        raise Invalid(field, f"field '{field}' must be an integer port between 1 and 65535")
    return value


def _health_path(doc: dict[str, Any], field: str) -> str:
    value = _text(doc, field, limit=1024)
    if not value.startswith("/"):
        raise Invalid(field, f"field '{field}' must start with '/'")
    return value


def _build(doc: dict[str, Any], field: str) -> dict[str, Any] | None:
    value = doc[field]
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Invalid(field, f"field '{field}' must be an object with {', '.join(BUILD_KEYS)}")
    unknown = sorted(set(value) - set(BUILD_KEYS))
    if unknown:
        raise Invalid(f"{field}.{unknown[0]}", f"unknown field '{field}.{unknown[0]}'")
    out: dict[str, Any] = {}
    for key in BUILD_KEYS:
        if key in value:
            out[key] = None if value[key] is None else _text(value, key, pattern=None, limit=4096)
    return out


def _bool(doc: dict[str, Any], field: str) -> bool:
    value = doc[field]
    if type(value) is not bool:
        raise Invalid(field, f"field '{field}' must be true or false")
    return value


APP_FIELDS = {
    "name": lambda d, f: _text(d, f, pattern=NAME),
    "namespace": lambda d, f: _text(d, f, pattern=NAME),
    "repo_url": lambda d, f: _optional_text(d, f),
    "branch": _branch,
    "image": lambda d, f: _optional_text(d, f, limit=512),
    "kind": lambda d, f: _choice(d, f, KINDS),
    "strategy": lambda d, f: _choice(d, f, STRATEGIES),
    "command": lambda d, f: _optional_text(d, f, pattern=None, limit=4096),
    "port": _port,
    "health_path": _health_path,
    "build": _build,
    "allow_unsigned": _bool,
}
REQUIRED_APP_FIELDS = ("name", "namespace")


def app_fields(doc: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """The checked fields of ``POST /api/v1/apps`` (``partial=False``) or a ``PATCH`` (``True``)."""
    unknown = sorted(set(doc) - set(APP_FIELDS))
    if unknown:
        raise Invalid(unknown[0], f"unknown field '{unknown[0]}'")
    if not partial:
        for field in REQUIRED_APP_FIELDS:
            if field not in doc:
                raise Invalid(field, f"missing required field '{field}'")
    elif not doc:
        raise Invalid("(body)", "nothing to change: give at least one field")
    return {field: APP_FIELDS[field](doc, field) for field in APP_FIELDS if field in doc}


def hook_name(doc: dict[str, Any]) -> str:
    if "name" not in doc:
        raise Invalid("name", "missing required field 'name'")
    return _text(doc, "name", pattern=None, limit=200)


def image_deploy(doc: dict[str, Any]) -> tuple[str, str | None]:
    """Skipper's ``{image (required, full reference), commit?}``."""
    if "image" not in doc:
        raise Invalid("image", "missing required field 'image' (the full image reference to deploy)")
    image = _text(doc, "image", limit=512)
    commit = _optional_text(doc, "commit", limit=200) if "commit" in doc else None
    return image, commit


def image_tag(doc: dict[str, Any]) -> str:
    """Shipmight's ``{"imageTag": "..."}`` for a service app."""
    if "imageTag" not in doc:
        raise Invalid("imageTag", "missing required field 'imageTag'")
    return _text(doc, "imageTag", pattern=IMAGE_TAG, limit=128)


def job_environment(doc: dict[str, Any]) -> dict[str, str]:
    """Shipmight's ``{"instanceEnvironmentVariables": [{"name", "value"}]}`` for a job app."""
    field = "instanceEnvironmentVariables"
    value = doc.get(field, [])
    if not isinstance(value, list):
        raise Invalid(field, f"field '{field}' must be a list of {{name, value}} objects")
    env: dict[str, str] = {}
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "value"}:
            raise Invalid(where, f"'{where}' must be an object with only 'name' and 'value'")
        name, val = item.get("name"), item.get("value")
        if not isinstance(name, str) or not ENV_NAME.match(name):
            raise Invalid(f"{where}.name", f"'{where}.name' must be an environment variable name")
        if not isinstance(val, str) or not storable(val):
            raise Invalid(f"{where}.value", f"'{where}.value' must be a string")
        env[name] = val
    return env


def deploy_request(doc: dict[str, Any]) -> tuple[str | None, str | None]:
    """``POST /api/v1/apps/{id}/deploy {image | commit}``."""
    unknown = sorted(set(doc) - {"image", "commit"})
    if unknown:
        raise Invalid(unknown[0], f"unknown field '{unknown[0]}'")
    image = _optional_text(doc, "image", limit=512) if "image" in doc else None
    commit = _optional_text(doc, "commit", limit=200) if "commit" in doc else None
    if image is None and commit is None:
        raise Invalid("image", "give 'image' (an image reference) or 'commit' (a commit to build)")
    return image, commit


def rollback_request(doc: dict[str, Any]) -> int | None:
    """``POST /api/v1/apps/{id}/rollback {revision?}`` (previous revision when omitted)."""
    unknown = sorted(set(doc) - {"revision"})
    if unknown:
        raise Invalid(unknown[0], f"unknown field '{unknown[0]}'")
    revision = doc.get("revision")
    if revision is None:
        return None
    if type(revision) is not int or not 1 <= revision < 2**63:
        raise Invalid("revision", "field 'revision' must be a positive integer")
    return revision
