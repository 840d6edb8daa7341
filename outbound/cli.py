"""``shipline subscriptions|deliveries|replay``: the outbound API from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    subs = subparsers.add_parser("subscriptions", help="outbound webhook subscriptions")
    s = subs.add_subparsers(dest="action", required=True)
    p = s.add_parser("list", help="an app's subscriptions")
    p.add_argument("app", type=int)
    p.set_defaults(func=lambda a: _call("GET", f"/api/v1/apps/{a.app}/subscriptions"))
    p = s.add_parser("show", help="one subscription")
    p.add_argument("id")
    p.set_defaults(func=lambda a: _call("GET", f"/api/v1/subscriptions/{a.id}"))
    p = s.add_parser("create", help="subscribe a URL to an app's events (the secret is printed once)")
    p.add_argument("app", type=int)
    p.add_argument("url")
    p.add_argument("--events", default="*", help="comma-separated event names, or * (default)")
    p.add_argument("--secret", help="use this secret instead of a generated whsec_ one")
    p.add_argument("--description", default="")
    p.set_defaults(func=_create)
    p = s.add_parser("delete", help="delete a subscription")
    p.add_argument("id")
    p.set_defaults(func=lambda a: _call("DELETE", f"/api/v1/subscriptions/{a.id}"))
    p = s.add_parser("rotate", help="new secret; the old one keeps signing for SHIPLINE_SECRET_ROTATION")
    p.add_argument("id")
    p.add_argument("--secret", help="the new secret (default: a generated whsec_ one)")
    p.set_defaults(func=lambda a: _call("PATCH", f"/api/v1/subscriptions/{a.id}",
                                        {"secret": a.secret} if a.secret else {"rotate_secret": True}))
    p = s.add_parser("enable", help="enable a disabled subscription")
    p.add_argument("id")
    p.set_defaults(func=lambda a: _call("PATCH", f"/api/v1/subscriptions/{a.id}", {"enabled": True}))
    p = s.add_parser("recover", help="send again every delivery that failed since a time")
    p.add_argument("id")
    p.add_argument("--since", required=True, help="RFC 3339 time or epoch seconds")
    p.set_defaults(func=lambda a: _call("POST", f"/api/v1/subscriptions/{a.id}/recover", {"since": _num(a.since)}))

    # `shipline deliveries` alone lists inbound deliveries (projections.cli); these are its subcommands
    # for outbound deliveries, so both families share one word as the issues name them.
    dels = subparsers.choices.get("deliveries") or subparsers.add_parser(
        "deliveries", help="inbound deliveries; outbound deliveries and their attempts")
    d = dels.add_subparsers(dest="action", required=False)
    p = d.add_parser("list", help="a subscription's outbound deliveries, newest first")
    p.add_argument("subscription")
    p.add_argument("--status", choices=["pending", "succeeded", "failed"])
    p.set_defaults(func=lambda a: _call("GET", f"/api/v1/subscriptions/{a.subscription}/deliveries",
                                        params={"status": a.status} if a.status else None))
    p = d.add_parser("attempts", help="every attempt of one delivery")
    p.add_argument("id")
    p.set_defaults(func=lambda a: _call("GET", f"/api/v1/outbound/deliveries/{a.id}/attempts"))
    p = d.add_parser("redeliver", help="send one delivery again (same delivery id)")
    p.add_argument("id")
    p.set_defaults(func=lambda a: _call("POST", f"/api/v1/outbound/deliveries/{a.id}/redeliver"))

    rep = subparsers.add_parser("replay", help="replay an app's history to one subscription")
    rep.add_argument("subscription")
    group = rep.add_mutually_exclusive_group(required=True)
    group.add_argument("--since", help="RFC 3339 time or epoch seconds")
    group.add_argument("--since-sequence", type=int, help="per-app event sequence number")
    rep.set_defaults(func=_replay)


def _num(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def _create(a: argparse.Namespace) -> int:
    names = [n.strip() for n in a.events.split(",") if n.strip()]
    body: dict[str, Any] = {"url": a.url, "events": names, "description": a.description}
    if a.secret:
        body["secret"] = a.secret
    return _call("POST", f"/api/v1/apps/{a.app}/subscriptions", body)


def _replay(a: argparse.Namespace) -> int:
    body = {"since_sequence": a.since_sequence} if a.since_sequence is not None else {"since_time": _num(a.since)}
    return _call("POST", f"/api/v1/subscriptions/{a.subscription}/replay", body)


def _call(method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None,
          settings: Any = None) -> int:
    import requests

    from shipline import config

    settings = settings or config.load()
    try:
        resp = requests.request(method, settings.public_url + path, json=body, params=params, timeout=30,
                                headers={"Authorization": f"Bearer {settings.admin_token}"})
    except requests.RequestException as exc:
        print(f"cannot reach {settings.public_url}: {exc}", file=sys.stderr)
        return 2
    try:
        doc = resp.json()
    except ValueError:
        doc = {"status": resp.status_code, "body": resp.text}
    print(json.dumps(doc, indent=2))
    return 0 if resp.ok else 1
