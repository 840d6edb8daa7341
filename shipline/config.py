"""Settings from the environment.

Every variable Shipline reads is declared once in ``VARIABLES`` (name, default, meaning); the
README's table is checked against it by a test, so the two cannot drift. Services receive a
``Settings`` from ``bootstrap`` and never read ``os.environ`` themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shipline.topics import Topics

# name -> (default, meaning). A default of "" means "unset".
VARIABLES: dict[str, tuple[str, str]] = {
    "SHIPLINE_DATA_DIR": (".shipline", "folder holding every piece of local state (log, tables, builds)"),
    "SHIPLINE_CACHE_DIR": ("", "downloads (Kafka jars) kept between runs (default <SHIPLINE_DATA_DIR>/cache)"),
    "SHIPLINE_HTTP": ("127.0.0.1:8080", "public HTTP address (ingress, read API, console)"),
    "SHIPLINE_PUBLIC_URL": ("", "base URL shown in every URL Shipline prints (default http://<SHIPLINE_HTTP>)"),
    "SHIPLINE_WEB_WORKERS": ("2", "gunicorn workers for the public HTTP port"),
    "SHIPLINE_KAFKA_PORT": ("9092", "port of the local Kafka broker"),
    "SHIPLINE_KAFKA_CONTROLLER_PORT": ("", "KRaft controller port of the local broker (default Kafka port + 1)"),
    "KAFKA_BOOTSTRAP_SERVERS": ("", "external Kafka; when set no local broker is started"),
    "SHIPLINE_PG_PORT": ("5432", "port of the local PostgreSQL server"),
    "DATABASE_URL": ("", "external PostgreSQL; when set no local server is started"),
    "DOCKER_HOST": ("", "external Docker engine; when set no local dockerd is started"),
    "SHIPLINE_TOPIC_PREFIX": ("shipline", "prefix of every topic name"),
    "SHIPLINE_PARTITIONS": ("6", "partitions per topic"),
    "SHIPLINE_DB_SCHEMA": ("shipline", "prefix of the PostgreSQL schemas (one per service: <prefix>_ingress, ...)"),
    "SHIPLINE_ADMIN_TOKEN": ("", "bearer token for the management API and console (generated when unset)"),
    "SHIPLINE_SECRET_KEY": ("", "Fernet key encrypting HMAC secrets at rest (generated into the data dir when unset)"),
    "GITHUB_WEBHOOK_SECRET": ("", "global secret accepted on POST /api/webhook"),
    "SHIPLINE_MAX_BODY": ("26214400", "largest accepted request body in bytes (25 MB)"),
    "SHIPLINE_DEDUPE_DAYS": ("30", "days the ingress remembers accepted delivery ids to answer redeliveries"),
    "SHIPLINE_OUTBOUND_KEEP_DAYS": (
        "30", "days the dispatcher keeps the pushes and builds it joins into build payloads"
    ),
    "SHIPLINE_REBUILD_WORKERS": (
        "", "processes a projections rebuild replays with (default: CPUs, at most the partitions)"
    ),
    "SHIPLINE_OUTBOUND_ALLOW": ("", "CIDRs outbound webhooks may reach although private/loopback"),
    "SHIPLINE_PROXY_PORT": ("8000", "first port of the reverse proxy's per-app frontends"),
    "SHIPLINE_APP_PORTS": ("20000-29999", "range the deployer allocates instance ports from"),
    "SHIPLINE_HEALTH_INTERVAL": ("1", "seconds between health checks of a new instance"),
    "SHIPLINE_HEALTH_TIMEOUT": ("30", "seconds a new instance has to become healthy"),
    "SHIPLINE_KEEP_IMAGES": ("5", "images retained per app for rollback"),
    "SHIPLINE_RETRY_SCHEDULE": ("5,300,1800,7200,18000,36000,36000", "outbound retry delays in seconds"),
    "SHIPLINE_RETRY_SCALE": ("1", "factor applied to the retry schedule (benchmarks shrink it)"),
    "SHIPLINE_OUTBOUND_TIMEOUT": ("10", "outbound request timeout in seconds"),
    "SHIPLINE_SECRET_ROTATION": ("86400", "seconds a rotated outbound secret keeps signing next to the new one"),
    "SHIPLINE_OUTBOUND_DISABLE_AFTER": ("432000", "seconds of unbroken failure after which a subscription is disabled"),
    "SHIPLINE_LOG_LEVEL": ("INFO", "log level of every service"),
}


def _get(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    return value if value != "" else VARIABLES[name][0]


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    cache: str
    http_host: str
    http_port: int
    public_url: str
    web_workers: int
    kafka_port: int
    kafka_controller_port: int
    kafka_bootstrap: str  # "" -> local broker
    pg_port: int
    database_url: str  # "" -> local server
    docker_host: str
    topic_prefix: str
    partitions: int
    rebuild_workers: int  # 0: one per CPU
    outbound_keep_days: float
    db_schema: str
    admin_token: str
    secret_key: str
    github_webhook_secret: str
    max_body: int
    dedupe_days: float
    outbound_allow: tuple[str, ...]
    proxy_port: int
    app_ports: tuple[int, int]
    health_interval: float
    health_timeout: float
    keep_images: int
    retry_schedule: tuple[float, ...]
    retry_scale: float
    outbound_timeout: float
    log_level: str
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def db_url(self) -> str:
        return self.database_url or f"postgresql://shipline@127.0.0.1:{self.pg_port}/shipline"

    def schema(self, service: str) -> str:
        """The PostgreSQL schema a service owns."""
        return f"{self.db_schema}_{service}"

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache).resolve() if self.cache else self.data_dir / "cache"


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``env`` (default: the process environment)."""
    env = dict(os.environ if env is None else env)
    data_dir = Path(_get(env, "SHIPLINE_DATA_DIR")).resolve()
    host, _, port = _get(env, "SHIPLINE_HTTP").rpartition(":")
    ports_lo, _, ports_hi = _get(env, "SHIPLINE_APP_PORTS").partition("-")
    admin_token = _get(env, "SHIPLINE_ADMIN_TOKEN") or _generated(data_dir, "admin-token", _token)
    secret_key = _get(env, "SHIPLINE_SECRET_KEY") or _generated(data_dir, "secret-key", _fernet_key)
    public = _get(env, "SHIPLINE_PUBLIC_URL") or f"http://{host}:{port}"
    return Settings(
        data_dir=data_dir,
        cache=_get(env, "SHIPLINE_CACHE_DIR"),
        http_host=host,
        http_port=int(port),
        public_url=public.rstrip("/"),
        web_workers=int(_get(env, "SHIPLINE_WEB_WORKERS")),
        kafka_port=int(_get(env, "SHIPLINE_KAFKA_PORT")),
        kafka_controller_port=int(
            _get(env, "SHIPLINE_KAFKA_CONTROLLER_PORT") or int(_get(env, "SHIPLINE_KAFKA_PORT")) + 1
        ),
        kafka_bootstrap=_get(env, "KAFKA_BOOTSTRAP_SERVERS"),
        pg_port=int(_get(env, "SHIPLINE_PG_PORT")),
        database_url=_get(env, "DATABASE_URL"),
        docker_host=_get(env, "DOCKER_HOST"),
        topic_prefix=_get(env, "SHIPLINE_TOPIC_PREFIX"),
        partitions=int(_get(env, "SHIPLINE_PARTITIONS")),
        db_schema=_get(env, "SHIPLINE_DB_SCHEMA"),
        admin_token=admin_token,
        secret_key=secret_key,
        github_webhook_secret=_get(env, "GITHUB_WEBHOOK_SECRET"),
        max_body=int(_get(env, "SHIPLINE_MAX_BODY")),
        dedupe_days=float(_get(env, "SHIPLINE_DEDUPE_DAYS")),
        outbound_keep_days=float(_get(env, "SHIPLINE_OUTBOUND_KEEP_DAYS")),
        rebuild_workers=int(_get(env, "SHIPLINE_REBUILD_WORKERS") or "0"),
        outbound_allow=tuple(c.strip() for c in _get(env, "SHIPLINE_OUTBOUND_ALLOW").split(",") if c.strip()),
        proxy_port=int(_get(env, "SHIPLINE_PROXY_PORT")),
        app_ports=(int(ports_lo), int(ports_hi)),
        health_interval=float(_get(env, "SHIPLINE_HEALTH_INTERVAL")),
        health_timeout=float(_get(env, "SHIPLINE_HEALTH_TIMEOUT")),
        keep_images=int(_get(env, "SHIPLINE_KEEP_IMAGES")),
        retry_schedule=tuple(float(x) for x in _get(env, "SHIPLINE_RETRY_SCHEDULE").split(",") if x.strip()),
        retry_scale=float(_get(env, "SHIPLINE_RETRY_SCALE")),
        outbound_timeout=float(_get(env, "SHIPLINE_OUTBOUND_TIMEOUT")),
        log_level=_get(env, "SHIPLINE_LOG_LEVEL"),
        env=env,
    )


def _token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _generated(data_dir: Path, name: str, make) -> str:  # type: ignore[no-untyped-def]
    """A secret generated once into the data dir (mode 0600), so restarts keep it."""
    path = data_dir / "secrets" / name
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    try:
        os.link(tmp, path)  # first writer wins when several processes start at once
    except FileExistsError:
        pass
    tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def markdown_table() -> str:
    """The README's variable table: ``python -m shipline.config``."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, (default, meaning) in VARIABLES.items():
        rows.append(f"| `{name}` | {f'`{default}`' if default else '(unset)'} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
