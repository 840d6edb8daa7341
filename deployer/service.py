"""The deployer service: commands in, work done, outcome reports out.

It consumes ``<prefix>.commands`` (group ``<prefix>-deployer``; several deployer processes share
the partitions), carries out one command at a time — every record is keyed by app id, so the
partition gives each app's commands in order — and reports what happened on ``<prefix>.inbound``,
streams' one input log (streams sequences the reports onto the event log):

=============  =====================================================================
command        reports
=============  =====================================================================
build.image    ``build.started``, then ``build.finished`` (succeeded|failed|cancelled)
deploy.release ``deploy.started``, then ``deployed`` or ``deploy.failed {step, reason}``
job.run        ``job.finished {exit_code, log}``
app.retire     ``app.retired {stopped, revision, url}`` (the app's route and instances are gone)
=============  =====================================================================

Each report's id is ``derive_id(command id, report type)``, its correlationid the command's and
its causationid the command's id, so publishing it twice publishes the same event.

**Exactly one effect per command.** The final reports are stored with the command id in the local
store (``completed``) in the same SQLite transaction that ends the rollout, *then* published,
*then* the offset is committed. A command delivered again (crash before the commit, rebalance)
is answered from the store without doing anything. A deploy interrupted by SIGTERM is undone
and left uncommitted, so it simply runs again; one interrupted by a crash is finished or undone
by ``Rollouts.recover`` when a deployer starts (see ``deployer.rollout``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from deployer.build import Builder, BuildLog
from deployer.locks import AppLocks
from deployer.ports import PortAllocator
from deployer.proxy import Proxy
from deployer.rollout import Interrupted, Outcome, Rollouts, Timing
from deployer.store import Store
from deployer.strategies import StartFailed, Strategy, scope_of
from deployer.strategies.docker import DockerStrategy
from deployer.strategies.process import ProcessStrategy
from shipline import codec, kafka
from shipline.config import Settings
from shipline.envelope import Envelope, derive_id, wrap
from shipline.messages import (
    AppRetired,
    BuildFinished,
    BuildImage,
    BuildStarted,
    Deployed,
    DeployFailed,
    DeployRelease,
    DeployStarted,
    JobFinished,
    Message,
    RetireApp,
    RunJob,
)

log = logging.getLogger(__name__)

SOURCE = "shipline/deployer"
CONSUMER = "deployer"


def report(command: Envelope, message: Message) -> Envelope:
    """An outcome of ``command``: deterministic id, same correlation, caused by the command."""
    return wrap(message, source=SOURCE, id=derive_id(command.id, message.TYPE),
                correlationid=command.correlationid, causationid=command.id)


def docker_client_factory(settings: Settings) -> Callable[[], Any]:
    """A lazily created, cached Docker client (the engine is started on first use, with the base image)."""
    cache: dict[str, Any] = {}
    lock = threading.Lock()

    def get() -> Any:
        with lock:
            if "client" not in cache:
                from shipline.infra.docker_engine import ensure_base_image, ensure_engine

                client = ensure_engine(settings.docker_host, client_timeout=900)
                ensure_base_image(client)
                cache["client"] = client
            return cache["client"]

    return get


class Deployer:
    """Carries out commands; knows nothing of Kafka (``DeployerService`` feeds it)."""

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        *,
        publish: Callable[[list[Envelope]], None] | None = None,
        docker_client: Callable[[], Any] | None = None,
        timing: Timing | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.publish_progress = publish or (lambda envs: None)
        data = Path(settings.data_dir)
        self.scope = scope_of(data)
        self.store = Store(data / "deployer" / "state.db")
        self.locks = AppLocks(data)
        self.ports = PortAllocator(data, settings.app_ports)
        self.proxy = Proxy(data, settings.proxy_port)
        self.docker_client = docker_client or docker_client_factory(settings)
        self.builder = Builder(data, self.docker_client, self.store, settings.keep_images, stop)
        self.strategies: dict[str, Strategy] = {
            "docker": DockerStrategy(self.docker_client, self.scope, self.builder.rebuild,
                                     engine_up=lambda: _engine_running(settings.docker_host)),
            "process": ProcessStrategy(data, self.scope, self.builder.rebuild),
        }
        self.timing = timing or Timing(
            health_interval=settings.health_interval,
            health_timeout=settings.health_timeout,
            shift_steps=4,
            # the 4 weight steps span one health interval (each step re-checks the new instances)
            shift_interval=min(0.5, settings.health_interval / 4),
        )
        self.rollouts = Rollouts(
            data_dir=data, scope=self.scope, proxy=self.proxy, store=self.store, ports=self.ports, locks=self.locks,
            strategies=self.strategies, timing=self.timing, stop=stop,
        )
        self.handlers: dict[type[Message], Callable[[Envelope], list[Message]]] = {
            BuildImage: self.on_build,
            DeployRelease: self.on_deploy,
            RunJob: self.on_job,
            RetireApp: self.on_retire,
        }

    # --------------------------------------------------------------------------- commands

    def handles(self, env: Envelope) -> bool:
        return type(env.data) in self.handlers

    def handle(self, env: Envelope) -> list[Envelope]:
        """Carry out one command (once): its final reports, stored before they are returned."""
        done = self.store.completed(env.id)
        if done is not None:
            log.info("command %s (%s) was carried out before: answering from the store", env.id, env.type)
            return [codec.decode(raw) for raw in done]
        handler = self.handlers[type(env.data)]
        with self.locks.hold(env.app_id):
            done = self.store.completed(env.id)  # a sibling deployer may have done it while we waited
            if done is not None:
                return [codec.decode(raw) for raw in done]
            messages = handler(env)  # raises Interrupted when a deploy had to be undone for a stop
            reports = [report(env, m) for m in messages]
            self.store.complete(env.id, env.app_id, env.type, [codec.encode(r) for r in reports],
                                drop_rollout=isinstance(env.data, DeployRelease),
                                forget_app=isinstance(env.data, RetireApp))
        return reports

    def _progress(self, env: Envelope, message: Message) -> None:
        try:
            self.publish_progress([report(env, message)])
        except kafka.NotDurable as exc:  # the final report matters; a lost progress report does not
            log.warning("could not publish %s: %s", message.TYPE, exc)

    def _app(self, env: Envelope, app: dict[str, Any]) -> dict[str, Any]:
        out = dict(app or {})
        out["app_id"] = env.app_id
        return out

    def on_build(self, env: Envelope) -> list[Message]:
        cmd: BuildImage = env.data  # type: ignore[assignment]
        app = self._app(env, cmd.app)
        path = self.builder.build_log_path(cmd.app_id, cmd.build)
        blog = BuildLog(path)
        started = time.monotonic()
        self._progress(env, BuildStarted(app_id=cmd.app_id, build=cmd.build, commit=cmd.commit, log_path=str(path)))
        try:
            outcome = self.builder.build(app, cmd.build, cmd.commit, cmd.repo_url, blog)
        except Exception as exc:  # noqa: BLE001 - a bug or an engine error: a failed build, not a dead consumer
            log.exception("build %s of app %s", cmd.build, cmd.app_id)
            blog(f"internal error: {exc}")
            from deployer.build import BuildOutcome

            outcome = BuildOutcome("failed", 1, "", [], cmd.commit, str(exc))
        finally:
            blog.close()
        return [BuildFinished(
            app_id=cmd.app_id, build=cmd.build, commit=outcome.commit or cmd.commit, status=outcome.status,
            exit_code=outcome.exit_code, image_id=outcome.image_id, tags=list(outcome.tags),
            duration=round(time.monotonic() - started, 3), log=blog.tail(), log_path=str(path),
        )]

    def on_deploy(self, env: Envelope) -> list[Message]:
        cmd: DeployRelease = env.data  # type: ignore[assignment]
        app = self._app(env, cmd.app)
        path = self.rollouts.deploy_log_path(cmd.app_id, cmd.revision)
        dlog = BuildLog(path)
        self._progress(env, DeployStarted(app_id=cmd.app_id, revision=cmd.revision, log_path=str(path)))
        try:
            outcome = self.rollouts.deploy(app, cmd.revision, cmd.image, cmd.commit, cmd.instances, env.id,
                                           env.correlationid, dlog)
        except Interrupted:
            dlog("interrupted: the deployer is stopping; the command will run again")
            raise
        except Exception as exc:  # noqa: BLE001 - report, never crash the consumer
            log.exception("deploy of revision %s of app %s", cmd.revision, cmd.app_id)
            dlog(f"internal error: {exc}")
            outcome = Outcome(False, cmd.revision, step="internal", reason=str(exc))
        finally:
            dlog.close()
        return [outcome_message(cmd.app_id, outcome, cmd.image, cmd.commit)]

    def on_job(self, env: Envelope) -> list[Message]:
        cmd: RunJob = env.data  # type: ignore[assignment]
        app = self._app(env, cmd.app)
        started = time.monotonic()
        log_path = Path(self.settings.data_dir) / "logs" / "jobs" / str(cmd.app_id) / f"{cmd.job}.log"
        name = app.get("strategy") or "docker"
        image = cmd.image
        if not image:
            current = self.store.release(cmd.app_id)
            image = current.image if current else ""
        try:
            strategy = self.strategies.get(name)
            if strategy is None:
                raise StartFailed(f"unknown strategy {name!r}")
            image = strategy.ensure_artifact(app, image, "", lambda line: log.info("job %s: %s", cmd.job, line))
            code, text = strategy.run_job(app, image, cmd.job, dict(cmd.env), log_path, self.stop)
        except Exception as exc:  # noqa: BLE001 - a job that cannot start is a failed job
            log.warning("job %s of app %s could not run: %s", cmd.job, cmd.app_id, exc)
            code, text = -1, f"the job could not run: {exc}"
        return [JobFinished(app_id=cmd.app_id, job=cmd.job, exit_code=code, log=text[-64 * 1024:],
                            duration=round(time.monotonic() - started, 3))]

    def on_retire(self, env: Envelope) -> list[Message]:
        """The app was deleted: route removed, instances stopped, then its images / release folders
        removed (while the store still lists them); the store forgets it on completion. Build logs stay.

        A retire of an app with nothing running (replayed, or never deployed) stops nothing and
        reports so; it never fails.
        """
        cmd: RetireApp = env.data  # type: ignore[assignment]
        retired = self.rollouts.retire(cmd.app_id)
        self.builder.retire(cmd.app_id)
        return [AppRetired(app_id=cmd.app_id, stopped=retired.stopped, revision=retired.revision, url=retired.url)]

    # --------------------------------------------------------------------------- recovery

    def recover(self) -> list[Envelope]:
        """Reconcile after a restart; returns the reports of rollouts this completed (already stored)."""
        out: list[Envelope] = []
        try:
            self.proxy.ensure_running()
        except Exception:  # noqa: BLE001 - the rollouts below restart it when they need it
            log.exception("haproxy could not be started")
        for rollout, outcome in self.rollouts.recover():
            if outcome is None:
                continue
            command = _command_stub(rollout.app_id, rollout.command_id, rollout.correlation_id)
            msg = outcome_message(rollout.app_id, outcome, rollout.image, rollout.commit)
            env = report(command, msg)
            self.store.complete(rollout.command_id, rollout.app_id, DeployRelease.TYPE, [codec.encode(env)],
                                drop_rollout=True)
            out.append(env)
            log.info("recovered the rollout of revision %s of app %s: %s", rollout.revision, rollout.app_id,
                     msg.TYPE)
        self.rollouts.reconcile()
        return out

    def close(self) -> None:
        self.store.close()


def _engine_running(docker_host: str) -> bool:
    from shipline.infra.docker_engine import engine_running

    return engine_running(docker_host)


def outcome_message(app_id: int, o: Outcome, image: str, commit: str) -> Message:
    if o.ok:
        return Deployed(app_id=app_id, revision=o.revision, image=o.image or image, commit=o.commit or commit,
                        instances=[i.address for i in o.instances], duration=round(o.duration, 3), url=o.url)
    return DeployFailed(app_id=app_id, revision=o.revision, step=o.step, reason=o.reason[:4000])


def _command_stub(app_id: int, command_id: str, correlation_id: str) -> Envelope:
    """Just enough of a command envelope to derive its reports' ids (recovery has only the ids)."""
    return Envelope(id=command_id, source=SOURCE, type=DeployRelease.TYPE, time="", subject=str(app_id),
                    data=DeployRelease(app_id=app_id, revision=0, image="", commit="", app={}),
                    correlationid=correlation_id, causationid=command_id)


# ------------------------------------------------------------------------------ the consumer


class DeployerService:
    """The Kafka side: consume commands, hand them to the ``Deployer``, publish, commit."""

    def __init__(self, settings: Settings, stop: threading.Event, *, deployer: Deployer | None = None,
                 docker_client: Callable[[], Any] | None = None, timing: Timing | None = None) -> None:
        self.settings = settings
        self.stop = stop
        self.topics = settings.topics
        self.producer = kafka.producer(settings.bootstrap_servers)
        self.deployer = deployer or Deployer(settings, stop, publish=self._publish, docker_client=docker_client,
                                             timing=timing)
        if deployer is not None:
            deployer.publish_progress = self._publish

    def _publish(self, envs: list[Envelope]) -> None:
        if envs:
            kafka.send_many_sync(self.producer, self.topics.inbound, envs)

    def _publish_until_acked(self, envs: list[Envelope]) -> bool:
        """Reports must be durable before the offset is committed: retry until acked (or stopping)."""
        while True:
            try:
                self._publish(envs)
                return True
            except kafka.NotDurable as exc:
                log.warning("reports not acknowledged yet (%s); retrying", exc)
                if self.stop.wait(1.0):
                    return False

    def run(self) -> int:
        with member_slot(Path(self.settings.data_dir)) as member:
            return self._run(member)

    def _run(self, member: str) -> int:
        recovered = self.deployer.recover()
        if recovered and not self._publish_until_acked(recovered):
            return 0
        consumer = self._consumer(member)
        log.info("deployer %s consuming %s (proxy ports from %s)", member, self.topics.commands,
                 self.settings.proxy_port)
        try:
            while not self.stop.is_set():
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().fatal():
                        log.warning("consumer failed (%s): joining again", msg.error())
                        consumer = self._replace(consumer, member)
                    elif msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", msg.error())
                    continue
                if not self._process(msg):
                    break  # stopping mid-command: leave the offset uncommitted
                try:
                    consumer.commit(message=msg, asynchronous=False)
                except KafkaException as exc:
                    # harmless: the command comes again and is answered from the store
                    log.warning("offset commit failed (%s); the command will be answered again", exc)
                    if exc.args and exc.args[0].fatal() or "FENCED" in str(exc):
                        consumer = self._replace(consumer, member)
        finally:
            with contextlib.suppress(KafkaException, RuntimeError):
                consumer.close()
            self.producer.flush(5)
            self.deployer.close()
        return 0

    def _consumer(self, member: str) -> Any:
        return kafka.consumer(
            self.settings.bootstrap_servers, f"{self.settings.topic_prefix}-deployer", [self.topics.commands],
            **{
                "max.poll.interval.ms": 3_600_000,  # a build may take long; one command at a time
                # Static membership: a deployer restarted after a crash rejoins as the same member and
                # gets its partitions back at once, instead of after the dead member's session expires.
                "group.instance.id": member,
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 2_000,
            },
        )

    def _replace(self, consumer: Any, member: str) -> Any:
        """A consumer that hit a fatal error (e.g. fenced after a broker restart) is unusable: a new one."""
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.close()
        self.stop.wait(1.0)
        return self._consumer(member)

    def _process(self, msg: Any) -> bool:
        """True when the record is dealt with (reports acked or dead-lettered) and may be committed."""
        try:
            env = codec.decode(msg.value())
        except codec.InvalidRecord as exc:
            kafka.dead_letter(self.producer, self.topics.deadletter, msg, exc.reason, CONSUMER)
            return True
        if not self.deployer.handles(env):
            kafka.dead_letter(self.producer, self.topics.deadletter, msg,
                              f"{env.type} is not a deployer command", CONSUMER)
            return True
        try:
            reports = self.deployer.handle(env)
        except Interrupted:
            return False
        except Exception as exc:  # noqa: BLE001 - never crash the consumer: dead-letter with the reason
            log.exception("command %s (%s) could not be applied", env.id, env.type)
            kafka.dead_letter(self.producer, self.topics.deadletter, msg, f"{exc.__class__.__name__}: {exc}", CONSUMER)
            return True
        return self._publish_until_acked(reports)


@contextlib.contextmanager
def member_slot(data_dir: Path) -> Iterator[str]:
    """A stable consumer-group member id for this process: ``deployer-<host>-<scope>-<n>``.

    ``n`` is the first of ``<data_dir>/deployer/member-<n>.lock`` this process can lock: a deployer
    restarted after a crash (its lock died with it) gets the same ``n`` back, while deployers
    running side by side on one machine get different ones.
    """
    folder = data_dir / "deployer"
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        fd = os.open(folder / f"member-{n}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            n += 1
            continue
        try:
            yield f"deployer-{socket.gethostname()}-{scope_of(data_dir)}-{n}"
        finally:
            os.close(fd)
        return


def main(settings: Settings, stop: threading.Event) -> int:
    from shipline.topics import ensure_topics

    ensure_topics(settings.bootstrap_servers, settings.topics, settings.partitions)
    return DeployerService(settings, stop).run()
