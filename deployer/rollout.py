"""Rolling updates, the same for both strategies, and recovery of a rollout a crash interrupted.

A rollout of revision N over revision M (SkyPort's rolling update):

1. ``image``    — the release's image (or folder) exists, or is rebuilt from its commit;
2. ``proxy``    — the app's frontend and backend exist (first deploy: one seamless reload);
3. ``start``    — new instances beside the old ones, each on a port from the allocator;
                  recorded *before* they start (phase ``starting``), so a crash never leaks them;
4. ``health``   — each new instance answers its health path (interval / deadline from settings);
5. ``shift``    — phase ``shifting``: the new instances join the backend with weight 0, then the
                  weights move in ``shift_steps`` steps (new 25/50/75/100, old 75/50/25/0),
                  checking the new instances stay healthy at every step;
6. ``switch``   — the new release becomes the current one in the store (phase ``draining``):
                  from here on the rollout can only go forward;
7. ``drain``    — old servers are set to ``drain``, and once they hold no session they go to
                  maintenance and their instances are stopped.

Any failure before the switch undoes the new instances and leaves the old ones serving with
their full weight, and is reported as ``deploy.failed {step, reason}``.

Recovery (``recover``), run when a deployer starts, for each rollout whose app lock is free (its
deployer died): ``starting`` -> the new instances are removed and the command will simply run
again when Kafka redelivers it; ``shifting`` -> if the new instances are healthy the rollout is
completed, otherwise undone (``deploy.failed`` step ``recovery``); ``draining`` -> the old
instances are drained and stopped. Then every current release is checked against what actually
runs (dead instances replaced, the proxy corrected, strays of this scope removed), so exactly
one revision serves each deployed app.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.build import BuildFailed, BuildLog
from deployer.health import probe, wait_healthy
from deployer.locks import AppLocks
from deployer.ports import NoFreePort, PortAllocator
from deployer.proxy import Proxy, ProxyError
from deployer.store import Instance, Release, Rollout, Store
from deployer.strategies import StartFailed, Strategy

log = logging.getLogger(__name__)

FULL = 100  # weight of a serving instance


class Interrupted(RuntimeError):
    """The deployer is stopping: the rollout was undone and the command must run again later."""


@dataclass
class Outcome:
    ok: bool
    revision: int
    image: str = ""
    commit: str = ""
    instances: list[Instance] = field(default_factory=list)
    step: str = ""
    reason: str = ""
    duration: float = 0.0
    url: str = ""


@dataclass
class Retired:
    stopped: list[str]
    revision: int | None
    url: str


class StepFailed(RuntimeError):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass
class Timing:
    health_interval: float = 1.0
    health_timeout: float = 30.0
    shift_steps: int = 4
    shift_interval: float = 0.25  # seconds between two weight steps
    drain_timeout: float = 30.0


class Rollouts:
    def __init__(
        self,
        *,
        data_dir: Path,
        scope: str,
        proxy: Proxy,
        store: Store,
        ports: PortAllocator,
        locks: AppLocks,
        strategies: dict[str, Strategy],
        timing: Timing,
        stop: threading.Event,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.scope = scope
        self.proxy = proxy
        self.store = store
        self.ports = ports
        self.locks = locks
        self.strategies = strategies
        self.timing = timing
        self.stop = stop

    def strategy(self, app: dict[str, Any]) -> Strategy:
        name = app.get("strategy") or "docker"
        if name not in self.strategies:
            raise StepFailed("validate", f"unknown strategy {name!r} (known: {', '.join(sorted(self.strategies))})")
        return self.strategies[name]

    def deploy_log_path(self, app_id: int, revision: int) -> Path:
        return self.data_dir / "logs" / "deploys" / str(app_id) / f"{revision}.log"

    # ------------------------------------------------------------------------ the rollout

    def deploy(self, app: dict[str, Any], revision: int, image: str, commit: str, instances: int,
               command_id: str, correlation_id: str, dlog: BuildLog) -> Outcome:
        """Roll ``revision`` out (the caller holds the app lock). Raises ``Interrupted`` on stop."""
        started = time.monotonic()
        app_id = int(app["app_id"])
        try:
            strategy = self.strategy(app)
            current = self.store.release(app_id)
            if current is not None and current.revision == revision and self._all_alive(strategy, current.instances):
                dlog(f"revision {revision} is already serving: nothing to do")
                return self._ok(current, started)
            dlog(f"deploying revision {revision} of app {app_id}: image {image}, commit {commit or '-'}")
            try:
                image = strategy.ensure_artifact(app, image, commit, dlog)
            except (StartFailed, BuildFailed) as exc:
                raise StepFailed("image", str(exc)) from exc
            count = max(1, int(instances))
            try:
                self.proxy.ensure_app(app_id, min_slots=2 * max(count, len(current.instances) if current else 0))
            except ProxyError as exc:
                raise StepFailed("proxy", str(exc)) from exc
            old = list(current.instances) if current else []
            rollout = Rollout(app_id, command_id, correlation_id, revision, image, commit, strategy.kind, "starting",
                              [], old, app, time.time())
            try:
                self._start_new(rollout, strategy, count, dlog)
                self._check_health(rollout, strategy, dlog)
                self._shift(rollout, strategy, dlog)
            except (StepFailed, Interrupted):
                self._undo(rollout, strategy, dlog)
                raise
            self._switch_and_drain(rollout, strategy, dlog)
            release = self.store.release(app_id)
            assert release is not None
            return self._ok(release, started)
        except StepFailed as exc:
            dlog(f"deploy failed at step {exc.step}: {exc.reason}")
            return Outcome(False, revision, image, commit, step=exc.step, reason=exc.reason,
                           duration=time.monotonic() - started)

    def _ok(self, release: Release, started: float) -> Outcome:
        return Outcome(True, release.revision, release.image, release.commit, list(release.instances),
                       duration=time.monotonic() - started, url=self.proxy.url(release.app_id))

    def _all_alive(self, strategy: Strategy, instances: list[Instance]) -> bool:
        return bool(instances) and all(strategy.alive(i)[0] for i in instances)

    def _start_new(self, r: Rollout, strategy: Strategy, count: int, dlog: BuildLog) -> None:
        token = secrets.token_hex(2)
        for n in range(count):
            iid = f"sl-{self.scope}-a{r.app_id}-r{r.revision}-{n + 1}-{token}"
            try:
                port = self.ports.allocate(iid)
            except NoFreePort as exc:
                raise StepFailed("start", str(exc)) from exc
            r.new.append(Instance(id=iid, kind=strategy.kind, port=port, revision=r.revision, image=r.image))
        self.store.save_rollout(r)  # recorded before anything starts: a crash cannot leak them
        for i, placeholder in enumerate(list(r.new)):
            if self.stop.is_set():
                raise Interrupted("stopping")
            try:
                r.new[i] = strategy.start(r.app, r.image, r.revision, placeholder.id, placeholder.port, {}, dlog)
            except StartFailed as exc:
                raise StepFailed("start", str(exc)) from exc
            self.store.save_rollout(r)

    def _check_health(self, r: Rollout, strategy: Strategy, dlog: BuildLog) -> None:
        path = r.app.get("health_path") or "/"
        for inst in r.new:
            dlog(f"health check of {inst.id}: GET http://{inst.address}{path}")
            ok, why = wait_healthy(inst.port, path, interval=self.timing.health_interval,
                                   timeout=self.timing.health_timeout, alive=_alive(strategy, inst),
                                   stop=self.stop)
            if self.stop.is_set():
                raise Interrupted("stopping")
            if not ok:
                raise StepFailed("health", f"{inst.id}: {why}")
            dlog(f"{inst.id} is healthy")

    def _shift(self, r: Rollout, strategy: Strategy, dlog: BuildLog) -> None:
        r.phase = "shifting"
        self.store.save_rollout(r)
        first_deploy = not [o for o in r.old if o.slot]
        try:
            for inst in r.new:
                inst.slot = self.proxy.add_server(r.app_id, inst.id, inst.port, weight=FULL if first_deploy else 0)
                self.store.save_rollout(r)
            if first_deploy:
                dlog(f"first release of the app: all traffic to revision {r.revision}")
                return
            steps = max(1, self.timing.shift_steps)
            for k in range(1, steps + 1):
                new_w = round(FULL * k / steps)
                weights = {i.slot: new_w for i in r.new}
                weights.update({o.slot: FULL - new_w for o in r.old if o.slot})
                self.proxy.set_weights(r.app_id, weights)
                dlog(f"traffic shift {k}/{steps}: new weight {new_w}, old weight {FULL - new_w}")
                if k < steps:
                    self.stop.wait(self.timing.shift_interval)
                if self.stop.is_set():
                    raise Interrupted("stopping")
                self._verify_new(r, strategy)
        except ProxyError as exc:
            raise StepFailed("shift", str(exc)) from exc

    def _verify_new(self, r: Rollout, strategy: Strategy) -> None:
        path = r.app.get("health_path") or "/"
        for inst in r.new:
            ok, why = strategy.alive(inst)
            if ok:
                ok, why = probe(inst.port, path)
            if not ok:
                raise StepFailed("shift", f"{inst.id} stopped being healthy during the traffic shift: {why}")

    def _switch_and_drain(self, r: Rollout, strategy: Strategy, dlog: BuildLog) -> None:
        if r.phase != "draining":
            release = Release(r.app_id, r.revision, r.image, r.commit, r.strategy, list(r.new), r.app)
            self.store.switch_release(r, release)
            dlog(f"revision {r.revision} is now the current release")
        for o in r.old:
            if o.slot:
                try:
                    self.proxy.drain(r.app_id, o.slot)
                except ProxyError as exc:
                    log.warning("drain %s: %s", o.id, exc)
        for o in r.old:
            if o.slot:
                timeout = 2.0 if self.stop.is_set() else self.timing.drain_timeout
                try:
                    if not self.proxy.wait_idle(r.app_id, o.slot, timeout=timeout):
                        dlog(f"{o.id} still had sessions after {timeout:g}s of draining")
                except ProxyError as exc:  # past the switch: the rollout goes forward whatever happens
                    dlog(f"could not watch {o.id} drain: {exc}")
                self._release_slot(r.app_id, o)
            self._stop_instance(o, dlog)
        if r.old:
            dlog(f"old instances stopped: {', '.join(o.id for o in r.old)}")

    def _release_slot(self, app_id: int, inst: Instance) -> None:
        for slot in self.proxy.slots_of(app_id):
            if slot.instance == inst.id:
                try:
                    self.proxy.release(app_id, slot.name)
                except ProxyError as exc:
                    log.warning("release slot %s of %s: %s", slot.name, inst.id, exc)

    def _stop_instance(self, inst: Instance, dlog: Callable[[str], None] | None = None) -> None:
        strategy = self.strategies.get(inst.kind)
        if strategy is not None:
            try:
                strategy.stop(inst, timeout=3 if self.stop.is_set() else 10)  # SIGTERM: done within 10 s
            except Exception as exc:  # noqa: BLE001 - keep going: stopping the rest matters more
                log.warning("stop %s: %s", inst.id, exc)
        self.ports.release_owner(inst.id)
        if dlog is not None:
            dlog(f"stopped {inst.id}")

    def _undo(self, r: Rollout, strategy: Strategy, dlog: BuildLog) -> None:
        """Back to the old release at full weight; the new instances are removed."""
        restore = {o.slot: FULL for o in r.old if o.slot}
        if restore:
            try:
                self.proxy.set_weights(r.app_id, restore)
            except ProxyError as exc:
                log.warning("restore old weights: %s", exc)
        for inst in r.new:
            self._release_slot(r.app_id, inst)
            self._stop_instance(inst)
        self.store.drop_rollout(r.app_id)
        if r.new:
            dlog(f"rolled back: removed {', '.join(i.id for i in r.new)}; the previous release keeps serving")

    # ---------------------------------------------------------------------------- retire

    def retire(self, app_id: int) -> Retired:
        """Take an app down (the caller holds the app lock): its frontend leaves the proxy first, so
        no request reaches an instance that is stopping, then every instance of the app this scope
        runs is stopped — the current release's, an abandoned rollout's, and any stray found on the
        machine under the app's instance prefix, whatever the strategy. Idempotent: with nothing
        left it stops nothing. The caller forgets the app in the store when it records the command.
        """
        release = self.store.release(app_id)
        rollout = self.store.rollout(app_id)
        instances: dict[str, Instance] = {}
        for inst in (release.instances if release else []) + (rollout.new + rollout.old if rollout else []):
            instances.setdefault(inst.id, inst)
        prefix = f"sl-{self.scope}-a{int(app_id)}-"
        for iid, found in self._running().items():
            if iid.startswith(prefix):
                instances.setdefault(iid, found)
        routed = app_id in self.proxy.state().apps
        url = self.proxy.url(app_id) if routed or release is not None else ""
        if routed:
            try:
                self.proxy.remove_app(app_id)
            except ProxyError as exc:
                # the frontend stays for now, but with no server in it nothing reaches the app
                log.warning("retire app %s: could not remove its frontend (%s); disabling its servers", app_id, exc)
                for slot in self.proxy.slots_of(app_id):
                    if not slot.free:
                        try:
                            self.proxy.release(app_id, slot.name)
                        except ProxyError as err:
                            log.warning("retire app %s: release slot %s: %s", app_id, slot.name, err)
        stopped = []
        for inst in instances.values():
            if self._is_running(inst):
                stopped.append(inst.id)
            self._stop_instance(inst)
        log.info("retired app %s: route %s, stopped %s", app_id, "removed" if routed else "absent",
                 ", ".join(stopped) or "nothing")
        return Retired(stopped=stopped, revision=release.revision if release else None, url=url)

    def _running(self) -> dict[str, Instance]:
        """Every instance of this scope found on the machine, whatever the strategy (id -> instance)."""
        found: dict[str, Instance] = {}
        for kind, strategy in self.strategies.items():
            available = getattr(strategy, "available", None)
            if available is not None and not available():
                continue  # e.g. no Docker engine runs: then no container of ours runs either
            try:
                running = strategy.running_ids()
            except Exception as exc:  # noqa: BLE001 - e.g. no Docker engine on this machine
                log.info("cannot list %s instances: %s", kind, exc)
                continue
            found.update((iid, inst) for iid, inst in running.items() if inst is not None)
        return found

    def _is_running(self, inst: Instance) -> bool:
        strategy = self.strategies.get(inst.kind)
        if strategy is None:
            return False
        try:
            return strategy.alive(inst)[0]
        except Exception:  # noqa: BLE001 - e.g. no engine: it cannot be running there
            return False

    # -------------------------------------------------------------------------- recovery

    def recover(self) -> list[tuple[Rollout, Outcome | None]]:
        """Finish or undo abandoned rollouts; an Outcome means the command is now complete."""
        results: list[tuple[Rollout, Outcome | None]] = []
        for r in self.store.rollouts():
            with self.locks.hold(r.app_id, blocking=False) as mine:
                if not mine:
                    continue  # a live deployer is working on it
                results.append((r, self._recover_one(r)))
        return results

    def _recover_one(self, r: Rollout) -> Outcome | None:
        dlog = BuildLog(self.deploy_log_path(r.app_id, r.revision))
        started = time.monotonic()
        try:
            dlog(f"recovering the rollout of revision {r.revision} interrupted in phase {r.phase}")
            strategy = self.strategies.get(r.strategy)
            if strategy is None:
                self.store.drop_rollout(r.app_id)
                return None
            if r.phase == "starting":
                self._undo(r, strategy, dlog)
                dlog("the deploy command will run again when it is redelivered")
                return None
            if r.phase == "shifting":
                why = ""
                for inst in r.new:
                    ok, why = wait_healthy(inst.port, r.app.get("health_path") or "/",
                                           interval=self.timing.health_interval,
                                           timeout=min(self.timing.health_timeout, 10),
                                           alive=_alive(strategy, inst), stop=self.stop)
                    if not ok and self.stop.is_set():
                        return None  # stopping again: the next start recovers it
                    if not ok:
                        self._undo(r, strategy, dlog)
                        return Outcome(False, r.revision, r.image, r.commit, step="recovery",
                                       reason=f"deployer restarted mid-rollout and {inst.id} is not healthy: {why}",
                                       duration=time.monotonic() - started)
                    # add_server is idempotent per instance: a crash inside the shift's first step is fine
                    inst.slot = self.proxy.add_server(r.app_id, inst.id, inst.port, weight=0)
                self.store.save_rollout(r)
                weights = {i.slot: FULL for i in r.new}
                weights.update({o.slot: 0 for o in r.old if o.slot})
                self.proxy.set_weights(r.app_id, weights)
                dlog("new instances healthy: completing the traffic shift")
            self._switch_and_drain(r, strategy, dlog)
            release = self.store.release(r.app_id)
            assert release is not None
            return self._ok(release, started)
        finally:
            dlog.close()

    def reconcile(self) -> None:
        """Make what runs match the current releases (the lock of each app is taken in turn)."""
        known: set[str] = set()
        for rel in self.store.releases():
            known.update(i.id for i in rel.instances)
        for r in self.store.rollouts():
            known.update(i.id for i in r.new + r.old)
        for rel in self.store.releases():
            with self.locks.hold(rel.app_id, blocking=False) as mine:
                if mine:
                    try:
                        self._repair(rel)
                    except Exception:  # noqa: BLE001 - one app must not stop the others
                        log.exception("could not repair app %s", rel.app_id)
        for iid, inst in self._running().items():
            app_id = None if iid in known else _app_of(iid)
            if app_id is None:
                continue
            with self.locks.hold(app_id, blocking=False) as mine:
                if mine and self.store.rollout(app_id) is None:
                    log.warning("removing stray %s instance %s", inst.kind, iid)
                    self._release_slot(app_id, inst)
                    self._stop_instance(inst)

    def _repair(self, rel: Release) -> None:
        strategy = self.strategies.get(rel.strategy)
        if strategy is None:
            return
        self.proxy.ensure_app(rel.app_id, min_slots=2 * len(rel.instances))
        dlog = BuildLog(self.deploy_log_path(rel.app_id, rel.revision))
        try:
            changed = False
            instances = []
            for inst in rel.instances:
                ok, why = strategy.alive(inst)
                if ok:
                    instances.append(inst)
                    continue
                dlog(f"reconcile: {inst.id} of the current revision is not running ({why}): replacing it")
                replacement = self._replace(rel, strategy, inst, dlog)
                instances.append(replacement or inst)
                changed = changed or replacement is not None
            rel.instances = instances
            # the proxy must send the current release's instances all the traffic, and nothing else
            slots = {s.instance: s for s in self.proxy.slots_of(rel.app_id) if not s.free}
            ids = {i.id for i in instances}
            for inst in instances:
                s = slots.get(inst.id)
                if s is None or s.state != "ready" or s.weight != FULL or s.port != inst.port:
                    inst.slot = self.proxy.add_server(rel.app_id, inst.id, inst.port, weight=FULL)
                    changed = True
            for holder, s in slots.items():
                if holder not in ids:
                    dlog(f"reconcile: slot {s.name} held by {holder}, which is not part of revision {rel.revision}")
                    self.proxy.release(rel.app_id, s.name)
            if changed:
                self.store.set_release(rel)
        finally:
            dlog.close()

    def _replace(self, rel: Release, strategy: Strategy, dead: Instance, dlog: BuildLog) -> Instance | None:
        iid = f"sl-{self.scope}-a{rel.app_id}-r{rel.revision}-x-{secrets.token_hex(2)}"
        try:
            image = strategy.ensure_artifact(rel.app, rel.image, rel.commit, dlog)
            port = self.ports.allocate(iid)
            inst = strategy.start(rel.app, image, rel.revision, iid, port, {}, dlog)
            ok, why = wait_healthy(port, rel.app.get("health_path") or "/", interval=self.timing.health_interval,
                                   timeout=self.timing.health_timeout, alive=lambda: strategy.alive(inst),
                                   stop=self.stop)
            if not ok:
                dlog(f"reconcile: replacement {iid} is not healthy: {why}")
                self._stop_instance(inst)
                return None
        except (StartFailed, BuildFailed, NoFreePort) as exc:
            dlog(f"reconcile: cannot replace {dead.id}: {exc}")
            return None
        inst.slot = self.proxy.add_server(rel.app_id, iid, inst.port, weight=FULL)
        self._release_slot(rel.app_id, dead)
        self._stop_instance(dead)
        return inst


def _alive(strategy: Strategy, inst: Instance) -> Callable[[], tuple[bool, str]]:
    return lambda: strategy.alive(inst)


def _app_of(instance_id: str) -> int | None:
    """``sl-<scope>-a<app>-r<rev>-...`` -> app id.

    Read from the third part only: the scope is 8 hex digits and may itself look like ``a1234567``.
    """
    parts = instance_id.split("-")
    if len(parts) < 3 or parts[0] != "sl":
        return None
    part = parts[2]
    return int(part[1:]) if part.startswith("a") and part[1:].isdigit() else None
