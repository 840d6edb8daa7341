"""The baseline: a bare Flask endpoint served by the same gunicorn configuration."""

from __future__ import annotations

from flask import Flask, jsonify, request


def create() -> Flask:
    app = Flask("bare")

    @app.post("/bare")
    def bare():  # type: ignore[no-untyped-def]
        request.get_data()
        return jsonify({"status": "ok"}), 201

    return app
