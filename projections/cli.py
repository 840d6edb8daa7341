"""``shipline app …``, ``shipline deliveries``, ``shipline audit``, ``shipline projections rebuild``.

Every command but the rebuild talks to the running stack's HTTP API at ``SHIPLINE_PUBLIC_URL``
with the admin token, prints a table in the manner of Skipper's ``kip app history`` (or the raw
JSON with ``--json``) and exits 1 with the API's error message when something is refused. APP is
an app id or name (``namespace/name`` when a name is not unique). ``projections rebuild`` runs the
rebuild in this process, with its progress bar on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

import requests

from shipline import config

TIMEOUT = 30.0


class CliError(Exception):
    pass


# ------------------------------------------------------------------------------ client


class Api:
    def __init__(self, settings: config.Settings) -> None:
        self.base = settings.public_url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {settings.admin_token}"

    def call(self, method: str, path: str, *, params: dict[str, Any] | None = None,
             body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> requests.Response:
        url = self.base + path
        try:
            resp = self.session.request(method, url, params=params, json=body, headers=headers, timeout=TIMEOUT)
        except requests.RequestException as exc:
            raise CliError(f"cannot reach Shipline at {self.base}: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text.strip() or resp.reason
            raise CliError(f"{method} {path}: {resp.status_code} {message}")
        return resp

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.call(method, path, **kwargs)
        return resp.json() if resp.content else None

    def resolve(self, app: str) -> dict[str, Any]:
        """An app by id, ``name`` or ``namespace/name``."""
        if app.isdigit():
            return self.json("GET", f"/api/v1/apps/{app}")  # type: ignore[no-any-return]
        apps = self.json("GET", "/api/v1/apps")
        namespace, _, name = app.rpartition("/")
        found = [a for a in apps if a["name"] == name and (not namespace or a["namespace"] == namespace)]
        if not found:
            raise CliError(f"no app named {app!r}")
        if len(found) > 1:
            choices = ", ".join(f"{a['namespace']}/{a['name']} (id {a['id']})" for a in found)
            raise CliError(f"{app!r} is ambiguous: {choices}")
        return found[0]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- output


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[("" if c is None else str(c)) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def ago(when: str | None, now: datetime | None = None) -> str:
    if not when:
        return "-"
    then = datetime.fromisoformat(when)
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    if seconds < 60:
        return "just now" if seconds < 5 else f"{seconds} s ago"
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "min")):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 and unit != 'min' else ''} ago"
    return "-"


def short(commit: str | None) -> str:
    return (commit or "-")[:7]


def _emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


# --------------------------------------------------------------------------- commands


def cmd_app_list(args: argparse.Namespace, api: Api) -> int:
    apps = api.json("GET", "/api/v1/apps", params={"include_deleted": "1"} if args.all else None)
    rows = [
        [a["id"], a["name"], a["namespace"], a["current_revision"] or "-", a["url"] or "-",
         "deleted" if a["deleted"] else ""]
        for a in apps
    ]
    _emit(args, apps, table(rows, ["ID", "NAME", "NAMESPACE", "REVISION", "URL", ""]) if apps else "No apps.")
    return 0


def _history_rows(items: list[dict[str, Any]]) -> str:
    rows = []
    for r in items:
        when = ago(r["created_at"]) + (" (current)" if r["current"] else "")
        rows.append([r["revision"], r["image"] or "-", short(r["commit"]), r["trigger"] or "-", r["status"], when])
    return table(rows, ["#", "IMAGE", "COMMIT", "TRIGGER", "STATUS", "WHEN"])


def cmd_app_history(args: argparse.Namespace, api: Api) -> int:
    app = api.resolve(args.app)
    path = f"/api/v1/apps/{app['id']}/history"
    if args.at:
        doc = api.json("GET", path, params={"at": args.at})
        release, cause = doc["release"], doc["caused_by"]
        if release is None:
            text = f"Nothing of {app['name']} was live at {doc['at']}."
        else:
            text = (
                f"At {doc['at']} {app['name']} ran revision #{release['revision']} ({release['image']},"
                f" commit {short(release['commit'])}), live since {release['live_from']}.\n"
                f"Trigger: {cause['trigger']}" + (f", by {cause['person']}" if cause["person"] else "")
            )
            if cause["delivery"]:
                d = cause["delivery"]
                text += f"\nDelivery: {d['delivery_id']} ({d['source']} {d['event']}, received {d['received_at']})"
            elif cause["request_id"]:
                text += f"\nRequest: {cause['request_id']}"
            if cause["build"]:
                b = cause["build"]
                text += f"\nBuild: #{b['number']} {short(b['commit']['sha'])} {b['commit']['message'] or ''}".rstrip()
        _emit(args, doc, text)
        return 0
    items = api.json("GET", path, params={"limit": args.limit})
    _emit(args, items, _history_rows(items) if items else f"No releases of {app['name']} yet.")
    return 0


def _settled(api: Api, app: dict[str, Any], written: dict[str, Any], wait: bool) -> dict[str, Any] | None:
    """The release this write caused, once its request id is folded (read your writes), or None."""
    request_id = written.get("request_id")
    if not wait or not request_id:
        return None
    resp = api.call(
        "GET", f"/api/v1/apps/{app['id']}/history", params={"limit": 20},
        headers={"X-Shipline-After": request_id},
    )
    release = next((r for r in resp.json() if r["correlation_id"] == request_id), None)
    if release is None and resp.headers.get("X-Shipline-Stale") != "true":
        chain = api.json("GET", "/api/v1/audit", params={"correlation_id": request_id})
        for event in chain["events"]:
            if event["type"] == "request.rejected":
                raise CliError(f"refused: {event['data'].get('reason')} (request {request_id})")
    return release


def cmd_app_rollback(args: argparse.Namespace, api: Api) -> int:
    app = api.resolve(args.app)
    body = {} if args.revision is None else {"revision": args.revision}
    written = api.json("POST", f"/api/v1/apps/{app['id']}/rollback", body=body)
    release = _settled(api, app, written, not args.no_wait)
    if release is not None:
        text = f"✔ Rolled back {app['name']} to revision #{release['revision']} ({release['image']})"
    else:
        target = f"revision #{args.revision}" if args.revision else "the previous revision"
        text = f"✔ Rollback of {app['name']} to {target} requested (request {written.get('request_id')})"
    _emit(args, {"request": written, "release": release}, text)
    return 0


def cmd_app_deploy(args: argparse.Namespace, api: Api) -> int:
    app = api.resolve(args.app)
    body = {"image": args.image} if args.image else {"commit": args.commit}
    written = api.json("POST", f"/api/v1/apps/{app['id']}/deploy", body=body)
    release = _settled(api, app, written, not args.no_wait)
    if release is not None:
        text = f"✔ Deploying {app['name']} revision #{release['revision']} ({release['image'] or release['commit']})"
    else:
        text = f"✔ Deploy of {app['name']} requested (request {written.get('request_id')})"
    _emit(args, {"request": written, "release": release}, text)
    return 0


def cmd_app_webhook(args: argparse.Namespace, api: Api) -> int:
    app = api.resolve(args.app)
    path = f"/api/v1/apps/{app['id']}/webhook"
    if args.action == "enable":
        doc = api.json("POST", path)
        text = f"✔ Webhook enabled for {app['name']}\nWebhook URL: {doc['url']}\nSecret token: {doc['token']}"
    elif args.action == "disable":
        doc = api.json("DELETE", path)
        text = f"✔ Webhook disabled for {app['name']}"
    else:
        doc = api.json("GET", path)
        if doc.get("enabled"):
            text = (
                f"Webhook for {app['name']}: enabled\nWebhook URL: {doc.get('url')}\n"
                f"Token: {doc.get('token_prefix')}…\nCreated: {ago(doc.get('created_at'))}\n"
                f"Last used: {ago(doc.get('last_used_at')) if doc.get('last_used_at') else 'never'}"
            )
        else:
            text = f"Webhook for {app['name']}: disabled"
    _emit(args, doc, text)
    return 0


def _caused(d: dict[str, Any]) -> str:
    caused = d.get("caused") or {}
    parts = [f"build #{n}" for n in caused.get("builds", [])]
    parts += [f"release #{n}" for n in caused.get("releases", [])]
    parts += [f"job #{n}" for n in caused.get("jobs", [])]
    return ", ".join(parts) or "-"


def cmd_deliveries(args: argparse.Namespace, api: Api) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.app:
        params["app_id"] = api.resolve(args.app)["id"]
    if args.outcome:
        params["outcome"] = args.outcome
    items = api.json("GET", "/api/v1/deliveries", params=params)
    rows = [
        [ago(d["received_at"]), d["source"], d["delivery_id"], d["app_id"], d["event"], d["verification"],
         d["outcome"] + (f" (+{d['duplicates']} dup)" if d["duplicates"] else ""), _caused(d)]
        for d in items
    ]
    headers = ["WHEN", "SOURCE", "DELIVERY", "APP", "EVENT", "VERIFIED", "OUTCOME", "CAUSED"]
    _emit(args, items, table(rows, headers) if items else "No deliveries.")
    return 0


def cmd_audit(args: argparse.Namespace, api: Api) -> int:
    doc = api.json("GET", "/api/v1/audit", params={"correlation_id": args.delivery_id})
    lines = [f"Correlation {doc['correlation_id']}"]
    for d in doc["deliveries"]:
        lines.append(
            f"Delivery {d['delivery_id']} for app {d['app_id']}: {d['source']} {d['event']}, {d['verification']},"
            f" received {d['received_at']}, {d['outcome']}" + (f" ({d['reason']})" if d["reason"] else "")
        )
    rows = [
        [e["time"], e["type"], e["app_id"], e["sequence"] if e["sequence"] is not None else "-", e["id"][:8],
         e["causation_id"][:8] if e["causation_id"] != e["id"] else "-", _summary(e)]
        for e in doc["events"]
    ]
    lines.append(table(rows, ["TIME", "TYPE", "APP", "SEQ", "EVENT", "CAUSED BY", "WHAT"]) if rows else "No events.")
    if doc["outbound"]:
        lines.append(f"Outbound deliveries: {len(doc['outbound'])}")
        for o in doc["outbound"]:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in o.items() if k in _OUTBOUND_SHOWN))
    _emit(args, doc, "\n".join(lines))
    return 0


_OUTBOUND_SHOWN = {"id", "subscription_id", "event_type", "url", "status", "last_status", "attempts", "delivered_at"}


def _summary(event: dict[str, Any]) -> str:
    d = event["data"]
    kind = event["type"]
    if kind.startswith("build."):
        return f"build #{d.get('build')} {short(d.get('commit'))} {d.get('status', '')}".rstrip()
    if kind.startswith("deploy") and "revision" in d:
        return f"revision #{d['revision']} {d.get('image', '') or ''}".rstrip()
    if kind.startswith("delivery."):
        return f"{d.get('delivery_id')} {d.get('outcome', '')}".rstrip()
    if kind.startswith("job."):
        return f"job #{d.get('job')}"
    return ""


def cmd_rebuild(args: argparse.Namespace) -> int:
    from projections.rebuild import RebuildError, rebuild

    settings = getattr(args, "settings", None) or config.load()
    try:
        result = rebuild(settings, swap=not args.no_swap, keep_old=args.keep_old, progress=sys.stderr)
    except RebuildError as exc:
        print(f"rebuild failed: {exc}", file=sys.stderr)
        return 1
    doc = {
        "events": result.events, "applied": result.applied, "duplicates": result.duplicates,
        "rejected": result.rejected, "seconds": round(result.seconds, 3), "rate": round(result.rate, 1),
        "checksum": result.checksum["*"], "swapped": result.swapped, "schema": result.schema,
    }
    text = (
        f"Rebuilt {result.events:,} events ({result.applied:,} applied, {result.duplicates:,} duplicates,"
        f" {result.rejected:,} rejected) in {result.seconds:.1f}s ({result.rate:,.0f}/s) into {result.schema}"
        f"{' (swapped in)' if result.swapped else ''}; checksum {result.checksum['*'][:16]}"
    )
    _emit(args, doc, text)
    return 0


# ---------------------------------------------------------------------------- parsers


def _http(fn: Any) -> Any:
    """Run an HTTP command with a client for the configured stack; errors print and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args, Api(getattr(args, "settings", None) or config.load())))
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def register(sub: Any) -> None:
    """Add this package's commands to the ``shipline`` CLI's subparsers."""
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print the API's JSON")

    app = sub.add_parser("app", help="apps: list, history, rollback, deploy, webhook")
    app_sub = app.add_subparsers(dest="app_command", required=True)
    p = app_sub.add_parser("list", parents=[json_flag], help="every app with its current revision and URL")
    p.add_argument("--all", action="store_true", help="include deleted apps")
    p.set_defaults(func=_http(cmd_app_list))
    p = app_sub.add_parser("history", parents=[json_flag], help="an app's releases, newest first")
    p.add_argument("app", metavar="APP")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--at", metavar="TIME", help="what was live at this RFC 3339 time, and what caused it")
    p.set_defaults(func=_http(cmd_app_history))
    p = app_sub.add_parser("rollback", parents=[json_flag], help="roll back to the previous or a given revision")
    p.add_argument("app", metavar="APP")
    p.add_argument("--revision", type=int)
    p.add_argument("--no-wait", action="store_true", help="do not wait (about 5 s at most) for the new release")
    p.set_defaults(func=_http(cmd_app_rollback))
    p = app_sub.add_parser("deploy", parents=[json_flag], help="deploy an image (or build a commit)")
    p.add_argument("app", metavar="APP")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image")
    what.add_argument("--commit")
    p.add_argument("--no-wait", action="store_true", help="do not wait (about 5 s at most) for the new release")
    p.set_defaults(func=_http(cmd_app_deploy))
    p = app_sub.add_parser("webhook", parents=[json_flag], help="the per-app token webhook")
    p.add_argument("action", choices=["enable", "status", "disable"])
    p.add_argument("app", metavar="APP")
    p.set_defaults(func=_http(cmd_app_webhook))

    p = sub.add_parser("deliveries", parents=[json_flag], help="inbound webhook deliveries and their outcomes")
    p.add_argument("--app", metavar="APP")
    p.add_argument("--outcome")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=_http(cmd_deliveries))
    p = sub.add_parser("audit", parents=[json_flag], help="the causal chain of one delivery (or request id)")
    p.add_argument("delivery_id", metavar="DELIVERY_ID")
    p.set_defaults(func=_http(cmd_audit))

    proj = sub.add_parser("projections", help="the history tables")
    proj_sub = proj.add_subparsers(dest="projections_command", required=True)
    p = proj_sub.add_parser("rebuild", parents=[json_flag], help="replay the log into fresh tables and swap them in")
    p.add_argument("--no-swap", action="store_true", help="build beside the live tables and leave them there")
    p.add_argument("--keep-old", action="store_true", help="keep the replaced tables as <schema>_old")
    p.set_defaults(func=cmd_rebuild)


COMMANDS = register


def main(argv: list[str] | None = None, settings: config.Settings | None = None) -> int:
    """Run one of these commands alone (tests pass ``settings``; the ``shipline`` CLI is the usual way)."""
    parser = argparse.ArgumentParser(prog="shipline")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.settings = settings
    return int(args.func(args))
