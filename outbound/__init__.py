"""Outbound webhooks: signed, retried, ordered per (subscription, app), logged and replayable.

``outbound.dispatcher`` consumes the event log into an outbox of deliveries and sends them;
``outbound.api`` is the management and attempt-log API on the public app; ``outbound.cli`` the
``shipline subscriptions|deliveries|replay`` commands.
"""

VERSION = "0.1"
