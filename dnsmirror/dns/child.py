"""The DNS server in a process of its own, so no work of the mirror can delay or stop an answer.

``serve`` binds the DNS sockets itself (so a bind error still names ``dns.listen[i]``), then starts
``python -m dnsmirror.dns.child SETTINGS`` with those sockets as descriptors 3, 4, ...; the child
runs the listeners, the capture decision and the forwarder on its own reactor. The two talk over the
child's stdin and stdout, one JSON object per line:

- parent -> child: ``{"healthy": bool, "reason": str, "bypass": {host: seconds left}}``, on every
  change of :class:`~dnsmirror.health.HealthState` or of the TLS bypass, and every
  ``health.interval`` as a heartbeat;
- child -> parent: ``{"stats": {...}, "upstreams_down": n, "capturing": bool, "realtime": bool}`` every
  ``STATS_INTERVAL``: the child's DNS counters since it started, how many upstream resolvers it skips
  now, whether it captures, and whether it runs at real-time priority now;
- either way: ``{"upstream": [index, up, reason]}``, at once, when a child found an upstream resolver
  down or answering again; the parent passes it on to the other DNS processes (``dns.processes``), so
  the first query after an upstream dies pays its timeout in one process, not in each.

The fail-open rule is the parent's :class:`~dnsmirror.health.HealthState`, unchanged: the child
captures only while the last word from the parent said healthy and that word is fresh. When the
parent stops speaking (its reactor is stuck, or it died) the child fails open after ``stale_after``
seconds, and it exits when its stdin closes (it ignores SIGINT and SIGTERM, which may reach the whole
process group before the mirror process has drained). When the child dies, or sends no report for
``SILENT_CHILD_AFTER`` seconds (it is stuck and killed), the parent starts a new one on the same
sockets. A line either side cannot read (not JSON, wrong types, counters going back) is logged and
changes nothing: a garbled word from the parent is no word, so the last one still goes stale.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol, task
from twisted.python.failure import Failure

from dnsmirror import oci
from dnsmirror.dns import priority
from dnsmirror.dns.stats import DnsStats
from dnsmirror.logs import fields as log_fields

if TYPE_CHECKING:
    from twisted.internet import stdio

log = logging.getLogger("dnsmirror.dns")

FIRST_CHILD_FD = 3
STATS_INTERVAL = 0.5
RESTART_DELAY = 1.0
# a child that sends no report for this long is stuck (it reports every STATS_INTERVAL): it is killed
# and replaced, as if it had died
SILENT_CHILD_AFTER = 10.0
_MAX_LINE = 1 << 20
_MAX_REASON = 200
_UPSTREAM_KEY = b'"upstream"'


@dataclass(frozen=True)
class ChildSettings:
    """Everything the child needs, passed on its command line as JSON."""

    listen: list[tuple[str, int]]  # (host, port) of each dns.listen address, UDP fd then TCP fd each
    upstreams: list[tuple[str, int]]
    timeout: float
    allow: list[str]
    ttl: int
    answer_cache_size: int
    address: str | None
    address6: str | None
    capture: list[str]
    skip: list[str]
    log_format: str
    log_level: str
    stale_after: float
    cpu_priority: int = 5  # dns.cpu_priority: nice steps above the mirror process (dnsmirror.dns.priority)
    realtime: bool = True  # dns.realtime: the lowest real-time priority where allowed, within a CPU budget
    processes: int = 1  # DNS processes answering on these sockets together; they share the real-time budget
    core: int | None = None  # the core this one is pinned to (dnsmirror.dns.priority.answering_cores)

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, text: str) -> ChildSettings:
        return cls(**json.loads(text))


# -- parent side


class _Lines:
    """Splits a byte stream into lines; a line longer than ``_MAX_LINE`` is dropped whole, up to its end."""

    def __init__(self, on_line: Callable[[bytes], None]) -> None:
        self.on_line = on_line
        self.buffer = b""
        self.skipping = False  # inside an overlong line: drop bytes until its newline

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if self.skipping:
                self.skipping = False
            else:
                self.on_line(line)
        if len(self.buffer) > _MAX_LINE:
            log.warning("dropping a line of more than %d bytes from the other DNS process", _MAX_LINE)
            self.buffer, self.skipping = b"", True


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, owner: DnsProcess) -> None:
        self.owner = owner
        self.lines = _Lines(owner._report)

    def outReceived(self, data: bytes) -> None:
        self.lines.feed(data)

    def processEnded(self, reason: Failure) -> None:
        self.owner._ended(self, reason)


class Readiness:
    """What ``/readyz`` follows with DNS in a child: captured names resolve to the mirror only once the
    child says it captures (it heard the mirror is healthy), not as soon as the mirror process knows."""

    def __init__(self, health) -> None:
        self.health = health
        self.capturing = False
        self.running = False

    @property
    def healthy(self) -> bool:
        return self.running and self.capturing and self.health.healthy

    @property
    def reason(self) -> str:
        if not self.health.healthy:
            return self.health.reason
        if not self.running:
            return "the DNS process is not running"
        return "the DNS process has not heard yet that the mirror is healthy"


class DnsProcess:
    """The parent's handle on the DNS child: starts it, tells it the health, restarts it when it dies."""

    def __init__(
        self,
        reactor,
        settings: ChildSettings,
        sockets: list[socket.socket],
        stats: DnsStats,
        health,
        bypass,
        heartbeat: float,
        nice: priority.NiceValues | None = None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.sockets = sockets
        self.stats = stats
        self.health = health
        self.bypass = bypass
        self.heartbeat = heartbeat
        self.child: _ChildProtocol | None = None
        self.restarts = 0
        self.upstreams_down = 0  # as the child last reported
        self.realtime = False  # the child runs at real-time priority now, as it last reported
        self.readiness = Readiness(health)
        self._stopping = False
        self._last = {name: 0 for name in _CHILD_COUNTERS}  # the running child's counters as last reported
        self._last_report = self._last_tell = reactor.seconds()
        self.nice = nice or priority.NiceValues()
        self.priority_gap: int | None = None  # nice steps the running child is above this process
        self._priority_settled = False
        self._loop = task.LoopingCall(self.tell)
        self._loop.clock = reactor
        # told when the child found an upstream down or answering again: (this, index, up, reason)
        self.on_upstream: Callable[[DnsProcess, int, bool, str], None] | None = None

    def start(self) -> None:
        """Start the child and the heartbeat; health changes are told at once."""
        self._spawn()
        self.health.subscribe(lambda healthy: self.tell())
        self._loop.start(self.heartbeat, now=False).addErrback(
            lambda f: log.error("DNS heartbeat stopped: %s", f.getTraceback())
        )

    def _spawn(self) -> None:
        fds = {0: "w", 1: "r", 2: 2}
        for offset, sock in enumerate(self.sockets):
            fds[FIRST_CHILD_FD + offset] = sock.fileno()
        self.child = _ChildProtocol(self)
        self.reactor.spawnProcess(
            self.child,
            sys.executable,
            [sys.executable, "-m", "dnsmirror.dns.child", self.settings.to_json()],
            env=dict(os.environ),
            childFDs=fds,
        )
        self._last = {name: 0 for name in _CHILD_COUNTERS}
        self._last_report = self.reactor.seconds()
        self._priority_settled = False
        self.tell()

    @property
    def pid(self) -> int | None:
        """The child's process ID while it runs."""
        transport = self.child.transport if self.child else None
        return getattr(transport, "pid", None)

    def tell(self) -> None:
        """Send the current health and bypass to the child; kill it when it stopped reporting."""
        if self.child is None or self.child.transport is None:
            return
        now = self.reactor.seconds()
        if now - self._last_tell > SILENT_CHILD_AFTER / 2:
            # this process was stuck itself: the child's reports may wait unread in the pipe
            self._last_report = now
        self._last_tell = now
        silent = now - self._last_report
        if silent > SILENT_CHILD_AFTER:
            self._kill_silent(silent)
            return
        message = {
            "healthy": self.health.healthy,
            "reason": self.health.reason,
            "bypass": self.bypass.remaining() if self.bypass is not None else {},
        }
        self._send(json.dumps(message).encode() + b"\n")

    def _send(self, line: bytes) -> None:
        if self.child is None or self.child.transport is None:
            return
        try:
            self.child.transport.write(line)
        except Exception as exc:  # noqa: BLE001 - a dying child is restarted by processEnded
            log.debug("telling the DNS process failed: %s", exc)

    def _kill_silent(self, silent: float) -> None:
        # a stuck child answers no query; its replacement takes over the same sockets
        log.error(
            "the DNS process sent nothing for %.1fs: killing it",
            silent,
            extra=log_fields(event="dns_process_silent", seconds=round(silent, 1)),
        )
        self.readiness.running = self.readiness.capturing = False
        self._last_report = self.reactor.seconds()  # one kill; processEnded replaces the child
        try:
            self.child.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - already gone: processEnded follows
            log.debug("killing the DNS process failed: %s", exc)

    def relay_upstream(self, index: int, up: bool, reason: str) -> None:
        """Tell the child what another DNS process found out about an upstream resolver."""
        self._send(upstream_line(index, up, reason))

    def _report(self, line: bytes) -> None:
        change = parse_upstream(line)
        if change is not None:
            if self.on_upstream is not None:
                self.on_upstream(self, *change)
            return
        report = parse_report(line)
        if report is None:
            log.warning("unreadable report from the DNS process: %r", line[:200])
            return
        counters, upstreams_down, capturing, realtime = report
        if any(counters[name] < self._last[name] for name in _CHILD_COUNTERS):
            log.warning("report from the DNS process with counters going back: %r", line[:200])
            return
        self._last_report = self.reactor.seconds()
        # added, not assigned: counters the parent keeps itself (health_changes) stay its own
        for name in _CHILD_COUNTERS:
            setattr(self.stats, name, getattr(self.stats, name) + counters[name] - self._last[name])
        self._last = counters
        self.upstreams_down = upstreams_down
        self.realtime = realtime
        self.readiness.capturing = capturing
        self.readiness.running = True
        if not self._priority_settled:
            self._settle_priority()

    def _settle_priority(self) -> None:
        """Once a new child reports (its start-up, priority included, is done): make the gap
        ``dns.cpu_priority`` steps, lowering this process's priority where the child could not raise its."""
        self._priority_settled = True
        dns_nice = self.nice.of(self.pid) if self.pid is not None else None
        if dns_nice is None:
            return
        mirror_nice = self.nice.own()
        steps = priority.yield_steps(mirror_nice, dns_nice, self.settings.cpu_priority)
        if steps:
            mirror_nice = self.nice.lower_own(steps)
        self.priority_gap = mirror_nice - dns_nice
        # short of the setting only at the ends of the nice range (the mirror already at 19)
        level = logging.INFO if self.priority_gap >= self.settings.cpu_priority else logging.WARNING
        log.log(
            level,
            "DNS process runs %d nice steps above the mirror's blob work",
            self.priority_gap,
            extra=log_fields(
                event="dns_priority", dns_nice=dns_nice, mirror_nice=mirror_nice, mirror_lowered_by=steps
            ),
        )

    def _ended(self, child: _ChildProtocol, reason) -> None:
        if child is not self.child:
            return
        self.child = None
        self.readiness.running = self.readiness.capturing = False
        self.realtime = False  # no process holds the priority until a new one reports it
        if self._stopping:
            return
        self.restarts += 1
        log.error(
            "the DNS process ended (%s); starting a new one in %gs",
            reason.getErrorMessage(),
            RESTART_DELAY,
            extra=log_fields(event="dns_process_restart", restarts=self.restarts),
        )
        self.reactor.callLater(RESTART_DELAY, self._restart)

    def _restart(self) -> None:
        if not self._stopping and self.child is None:
            self._spawn()

    def stop(self) -> None:
        """Stop the child (its stdin closes and it gets SIGKILL) and close the sockets."""
        self._stopping = True
        if self._loop.running:
            self._loop.stop()
        if self.child is not None and self.child.transport is not None:
            transport = self.child.transport
            transport.closeStdin()
            try:
                # the drain is over (captured names failed open meanwhile): answers in flight may go
                transport.signalProcess("KILL")
            except Exception:  # noqa: BLE001 - already gone
                pass
        for sock in self.sockets:
            sock.close()
        self.sockets = []


class DnsProcesses:
    """The DNS processes that answer on the same sockets (``dns.processes``), each pinned to a core of its
    own, as one: started, told and stopped together, ready while each of them is, their counters added
    into the one :class:`~dnsmirror.dns.stats.DnsStats` they share."""

    def __init__(self, members: list[DnsProcess]) -> None:
        self.members = members
        self.readiness = _AllReady([member.readiness for member in members])
        for member in members:
            member.on_upstream = self._relay

    def _relay(self, source: DnsProcess, index: int, up: bool, reason: str) -> None:
        for member in self.members:
            if member is not source:
                member.relay_upstream(index, up, reason)

    def start(self) -> None:
        for member in self.members:
            member.start()

    def tell(self) -> None:
        """Send the current health and bypass to every DNS process."""
        for member in self.members:
            member.tell()

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    @property
    def running(self) -> int:
        """How many of them run and have reported."""
        return sum(member.readiness.running for member in self.members)

    @property
    def upstreams_down(self) -> int:
        """Upstream resolvers skipped now, by the one that skips the most (each keeps its own table)."""
        return max(member.upstreams_down for member in self.members)

    @property
    def realtime(self) -> bool:
        """Whether every one runs at real-time priority now."""
        return all(member.realtime for member in self.members)

    @property
    def priority_gap(self) -> int | None:
        """The smallest nice gap to the mirror process of those whose gap is settled."""
        gaps = [member.priority_gap for member in self.members if member.priority_gap is not None]
        return min(gaps) if gaps else None


class _AllReady:
    """Ready while every part is: a DNS process being replaced leaves the node's DNS to the others, and
    readiness says so."""

    def __init__(self, parts: list[Readiness]) -> None:
        self.parts = parts

    @property
    def healthy(self) -> bool:
        return all(part.healthy for part in self.parts)

    @property
    def reason(self) -> str:
        return next((part.reason for part in self.parts if not part.healthy), "")


_CHILD_COUNTERS = [f.name for f in fields(DnsStats) if f.name != "health_changes"]


def parse_report(line: bytes) -> tuple[dict[str, int], int, bool, bool] | None:
    """(counters, upstreams down, capturing, real-time) from one report line of the child; ``None`` when
    malformed."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("stats"), dict):
        return None
    values = [message["stats"].get(name, 0) for name in _CHILD_COUNTERS]
    down = message.get("upstreams_down", 0)
    if not all(_is_count(value) for value in [*values, down]):
        return None
    # anything but an explicit true is "not capturing": readiness never claims more than the child does
    return (
        dict(zip(_CHILD_COUNTERS, values, strict=True)),
        down,
        message.get("capturing") is True,
        message.get("realtime") is True,
    )


def parse_health(line: bytes) -> tuple[bool, dict[str, float]] | None:
    """(healthy, bypass: host -> seconds left) from one message of the parent; ``None`` when malformed."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("healthy"), bool):
        return None
    bypass = message.get("bypass") or {}
    if not isinstance(bypass, dict) or not all(
        isinstance(host, str) and isinstance(seconds, int | float) and not isinstance(seconds, bool)
        for host, seconds in bypass.items()
    ):
        return None
    return message["healthy"], {host: float(seconds) for host, seconds in bypass.items()}


def upstream_line(index: int, up: bool, reason: str) -> bytes:
    """The message saying upstream ``index`` went down (with why) or answers again."""
    return json.dumps({"upstream": [index, up, reason]}).encode() + b"\n"


def parse_upstream(line: bytes) -> tuple[int, bool, str] | None:
    """(index, up, reason) of an upstream message; ``None`` when the line is not one, or is malformed."""
    if _UPSTREAM_KEY not in line:
        return None  # a report or a health word: decoded once, by its own parser
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or "upstream" not in message:
        return None
    change = message["upstream"]
    if not isinstance(change, list) or len(change) != 3:
        return None
    index, up, reason = change
    if not _is_count(index) or not isinstance(up, bool) or not isinstance(reason, str):
        return None
    return index, up, reason[:_MAX_REASON]


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- child side


class _Bypass:
    """The parent's TLS bypass as last told: registry host -> when (on the child's clock) it ends."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.until: dict[str, float] = {}

    def update(self, remaining: dict[str, float]) -> bool:
        now = self.clock.seconds()
        before = set(self.until)
        self.until = {host: now + float(seconds) for host, seconds in remaining.items()}
        return bool(set(self.until) - before)

    def bypassed(self, name: str) -> bool:
        if not self.until:
            return False
        until = self.until.get(oci.upstream_host(name))
        return until is not None and until > self.clock.seconds()


class _Realtime:
    """The DNS process's real-time priority, held within :class:`~dnsmirror.dns.priority.RealtimeBudget` while
    the machine is busy (:class:`~dnsmirror.dns.priority.MachineLoad`)."""

    def __init__(self, clock, processes: int = 1, load: priority.MachineLoad | None = None) -> None:
        self.clock = clock
        # the whole DNS's budget, on the cores it may use (read before this process is pinned to one)
        share = priority.realtime_share(len(os.sched_getaffinity(0))) / max(processes, 1)
        self.budget = priority.RealtimeBudget(share)
        self.load = load or priority.MachineLoad()
        self.enabled = False  # running at real-time priority now
        self.possible = False  # allowed here, with the kernel's limit on runs that never wait in place

    def start(self) -> None:
        signal.signal(signal.SIGXCPU, self._overran)
        limited = priority.limit_realtime_runs()
        refused = priority.set_realtime(True) if limited else "no limit on runs that never wait"
        self.possible = self.enabled = refused is None
        if refused is None:
            log.info(
                "DNS process runs at real-time priority %d",
                priority.REALTIME_PRIORITY,
                extra=log_fields(event="dns_realtime", enabled=True),
            )
        else:
            log.info(
                "DNS process runs at its nice value only, not at real-time priority: %s (it needs "
                "CAP_SYS_NICE; a kernel built with CONFIG_RT_GROUP_SCHED allows none in a container's "
                "cgroup)",
                refused,
                extra=log_fields(event="dns_realtime", enabled=False, reason=refused),
            )

    def check(self) -> None:
        """Periodically: real-time priority while the machine is busy and within the CPU budget, the nice
        value alone while cores are idle or over the budget."""
        if not self.possible:
            return
        allowed = self.budget.allowed(self.clock.seconds(), time.process_time())
        busy = self.load.update(priority.machine_ticks())  # procfs: kernel counters, no disk
        wanted = allowed and busy
        if wanted != self.enabled and priority.set_realtime(wanted) is None:
            self.enabled = wanted
            if allowed:
                log.debug("DNS process %s real-time priority: the machine is %s",
                          "takes" if wanted else "leaves", "busy" if busy else "idle",
                          extra=log_fields(event="dns_realtime_load", busy=busy))
            else:
                log.warning(
                    "DNS process took more than %.0f%% of a core: at its nice value for %.0fs",
                    100 * self.budget.share,
                    self.budget.cool_down,
                    extra=log_fields(event="dns_realtime_over_budget"),
                )

    def _overran(self, signum: int, frame: object) -> None:
        # SIGXCPU: a real-time run without a blocking call went past its limit
        self.budget.overran(self.clock.seconds())
        if priority.set_realtime(False) is None:
            self.enabled = False
        log.warning(
            "DNS process ran %.1fs without waiting: at its nice value for %.0fs",
            priority.REALTIME_RUN_LIMIT[0],
            self.budget.cool_down,
            extra=log_fields(event="dns_realtime_overrun"),
        )


class _ParentChannel(protocol.Protocol):
    """The child's stdin/stdout: health from the parent in, counters out."""

    def __init__(self, child: _Child) -> None:
        self.child = child
        self.lines = _Lines(child.heard)

    def dataReceived(self, data: bytes) -> None:
        self.lines.feed(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.child.parent_gone()


class _Child:
    def __init__(self, reactor, settings: ChildSettings) -> None:
        from dnsmirror.config import HostPort
        from dnsmirror.dns.forwarder import Forwarder
        from dnsmirror.dns.packets import Responder
        from dnsmirror.dns.server import DnsController
        from dnsmirror.patterns import HostMatcher

        self.reactor = reactor
        self.settings = settings
        self.stats = DnsStats()
        self.bypass = _Bypass(reactor)
        self.responder = Responder(
            HostMatcher(settings.capture, settings.skip),
            settings.address,
            settings.address6,
            settings.ttl,
            settings.answer_cache_size,
            bypassed=self.bypass.bypassed,
        )
        self.forwarder = Forwarder(reactor, [HostPort(h, p) for h, p in settings.upstreams], settings.timeout)
        self.controller = DnsController(
            self.responder,
            self.forwarder,
            [ipaddress.ip_network(n, strict=False) for n in settings.allow],
            self.stats,
        )
        self.last_heard = reactor.seconds()
        self.channel: stdio.StandardIO | None = None
        self.reported = False
        self.ports: list = []
        self.realtime = _Realtime(reactor, settings.processes)
        self.forwarder.on_health = self._upstream_health

    def run(self) -> None:
        from twisted.internet import stdio

        from dnsmirror.dns.server import DNS_START_OVERHEAD, DatagramListener, DnsStreamFactory, tcp_caps
        from dnsmirror.limits import current_limit, descriptors_in_use

        if self.settings.core is not None:
            self._pin(self.settings.core)
        # this process's own descriptor limit: the forwarder's sockets first, the TCP listeners share the rest
        caps = tcp_caps(current_limit() - descriptors_in_use() - DNS_START_OVERHEAD,
                        len(self.settings.upstreams), len(self.settings.listen))
        for index, (host, _port) in enumerate(self.settings.listen):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            udp_fd, tcp_fd = FIRST_CHILD_FD + 2 * index, FIRST_CHILD_FD + 2 * index + 1
            self.ports.append(DatagramListener(self.reactor, socket.socket(fileno=udp_fd), self.controller))
            factory = DnsStreamFactory(self.controller, self.reactor, caps)
            self.ports.append(self.reactor.adoptStreamPort(tcp_fd, family, factory))
            os.close(tcp_fd)  # the adopted port holds its own duplicate
        self.channel = stdio.StandardIO(_ParentChannel(self), reactor=self.reactor)
        if self.settings.realtime:
            self.realtime.start()
        task.LoopingCall(self.tick).start(STATS_INTERVAL, now=False)
        task.LoopingCall(self.watch).start(min(1.0, self.settings.stale_after / 4), now=False)

    def _pin(self, core: int) -> None:
        refused = priority.pin_to_core(core)
        if refused is None:
            log.info("DNS process answers on core %d", core, extra=log_fields(event="dns_core", core=core))
        else:
            # still answering, on any core: the others may then share one with it
            log.warning("DNS process not pinned to core %d: %s", core, refused,
                        extra=log_fields(event="dns_core", core=core, reason=refused))

    def _upstream_health(self, index: int, up: bool, reason: str) -> None:
        if self.channel is not None:
            self.channel.write(upstream_line(index, up, reason))

    def heard(self, line: bytes) -> None:
        change = parse_upstream(line)
        if change is not None:
            self.forwarder.learned(*change)
            return
        word = parse_health(line)
        if word is None:
            # not a word from the parent: it does not refresh the last one, which goes stale as usual
            log.warning("unreadable message from the mirror process: %r", line[:200])
            return
        healthy, bypass = word
        self.last_heard = self.reactor.seconds()
        if self.bypass.update(bypass):
            self.responder.forget_answers()
        self._capture(healthy)

    def _capture(self, enabled: bool) -> None:
        changed = enabled != self.responder.capture_enabled
        self.responder.capture_enabled = enabled
        if changed or not self.reported:
            self.report()  # at once: the mirror process's readiness follows what this process does

    def watch(self) -> None:
        silent = self.reactor.seconds() - self.last_heard
        if silent > self.settings.stale_after and self.responder.capture_enabled:
            log.warning(
                "no word from the mirror process for %.1fs: failing open",
                silent,
                extra=log_fields(event="dns_parent_silent", seconds=round(silent, 1)),
            )
            self._capture(False)

    def tick(self) -> None:
        """Every ``STATS_INTERVAL``: the real-time budget checked, the counters reported."""
        self.realtime.check()
        self.report()

    def report(self) -> None:
        if self.channel is None:
            return
        self.reported = True
        counters = {name: getattr(self.stats, name) for name in _CHILD_COUNTERS}
        message = {
            "stats": counters,
            "upstreams_down": len(self.forwarder.table.down()),
            "capturing": self.responder.capture_enabled,
            "realtime": self.realtime.enabled,
        }
        self.channel.write(json.dumps(message).encode() + b"\n")

    def parent_gone(self) -> None:
        _stop(self.reactor)


def _stop(reactor) -> None:
    if reactor.running:
        reactor.stop()


def main(argv: list[str]) -> int:
    """Entry point of the DNS child process."""
    from dnsmirror import logs

    settings = ChildSettings.from_json(argv[1])
    logs.setup(settings.log_format, settings.log_level)
    from dnsmirror.dns import loop

    reactor: Any = loop.install()
    # Ctrl-C or a SIGTERM to the whole process group (a service manager) must not end the node's DNS
    # before the mirror process drained: the child ends when its stdin closes, or by SIGKILL
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the node's resolver goes before blob work when the cores are busy
    alone = priority.own_session()
    before = os.getpriority(os.PRIO_PROCESS, 0)
    raised = before - priority.raise_own(settings.cpu_priority)
    if alone:
        priority.raise_own_group(raised)
    child = _Child(reactor, settings)
    failed = []

    def run() -> None:
        try:
            child.run()
        except Exception:
            log.exception("the DNS process could not start")
            failed.append(True)
            reactor.stop()
            return
        # what start-up built lives as long as the process: no collection walks it again (no long pause)
        gc.freeze()

    reactor.callWhenRunning(run)
    reactor.run(installSignalHandlers=False)
    child.forwarder.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
