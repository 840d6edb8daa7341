"""Mount the ingress on the public Flask app: migrations, dependencies, blueprints."""

from __future__ import annotations

from flask import Flask

from ingress import admin, github, openapi, token_hooks
from ingress.context import Ingress
from ingress.crypto import SecretBox
from ingress.publisher import Publisher
from ingress.retention import Pruner
from ingress.store import Store


def mount(app: Flask) -> None:
    from shipline.web import current

    with app.app_context():
        ctx = current()
    settings = ctx.settings
    store = Store(ctx.pool, settings.schema("ingress"))
    store.migrate()
    ctx.extras["ingress"] = Ingress(settings=settings, producer=ctx.producer, store=store,
                                    box=SecretBox(settings.secret_key), publisher=Publisher(ctx.producer),
                                    pruner=Pruner(store, settings.dedupe_days))
    for bp in (github.bp, token_hooks.bp, admin.bp, openapi.bp):
        app.register_blueprint(bp)
