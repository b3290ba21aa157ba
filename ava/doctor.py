"""`ava doctor`: an active preflight. Observe every node (network), then judge (pure).

`observe()` gathers, per node and in parallel, the facts `ava nodes` shows plus the preflight's
own (ava/agent/doctor_facts.py) and a clock sample. `verdicts()` turns those observations into
pass / warn / fail checks, per node and across nodes; every warn and fail says what to do.
"""

from __future__ import annotations

import json
import shlex
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ava.config import Node
from ava.errors import AvaError, CommandError, ConnectError
from ava.nodes import facts_command
from ava.transport import connect, run_all, shell_path
from ava.units import format_duration, format_size

if TYPE_CHECKING:
    from ava.bandwidth import BandwidthReport

PROBE_SOURCE = Path(__file__).with_name("agent") / "doctor_facts.py"

PASS, WARN, FAIL = "pass", "warn", "fail"
SKEW_WARN = 1.0  # seconds between node clocks
LOOKUP_SLOW = 0.5  # seconds: each rendezvous pays it again
LOOKUP_TIMEOUT = 2.0
WORKDIR_FAIL, WORKDIR_WARN = 1 << 30, 10 << 30
# Xids that mean the GPU or its links are broken, not that a program faulted (13, 31, 43...).
FATAL_XIDS = frozenset({48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120})
VERSION_KEYS = ("python", "torch", "cuda", "nccl")


@dataclass(frozen=True)
class Check:
    check: str
    node: str | None  # None: a check across nodes
    status: str  # pass | warn | fail
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Observation:
    """What one node showed: an error where it could not be reached or probed."""

    node: Node
    error: AvaError | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    clock_offset: float | None = None  # the node's clock minus this machine's, seconds
    sftp: bool | None = None  # whether the SSH server offers SFTP; None: no SSH (local node)


# -- observing (network) ------------------------------------------------------------------------


def master_endpoint(master: Node) -> tuple[str, int | None]:
    """Where the other nodes reach the master: its address and a port known to listen."""
    if master.transport == "local" or master.host is None:
        return "127.0.0.1", None
    return master.host, master.port


def probe_command(node: Node, master: Node) -> str:
    address, port = master_endpoint(master)
    args = {
        "workdir": node.workdir,
        "cache_dir": node.cache_dir,
        "master": address,
        "master_port": port,
        "interface": node.interface,
        "lookup_timeout": LOOKUP_TIMEOUT,
    }
    source = PROBE_SOURCE.read_text(encoding="utf-8")
    probe = f"{shell_path(node.python)} -c {shlex.quote(source)} {shlex.quote(json.dumps(args))}"
    # One round trip: facts.py's line, then the probe's line.
    return f"{facts_command(node)} && {probe}"


def clock_offset(node: Node, samples: int = 2) -> float:
    """The node's clock minus ours, from the sample with the shortest round trip."""
    transport = connect(node)
    command = f"{shell_path(node.python)} -c 'import time; print(repr(time.time()))'"
    best: tuple[float, float] | None = None
    for _ in range(samples):
        sent = time.time()
        result = transport.run(command, timeout=30).check("clock sample")
        came = time.time()
        offset = float(result.stdout.split()[-1]) - (sent + came) / 2
        if best is None or came - sent < best[0]:
            best = (came - sent, offset)
    assert best is not None
    return best[1]


def observe_one(node: Node, master: Node, *, host_keys: str | None = None) -> Observation:
    result = connect(node, host_keys=host_keys).run(probe_command(node, master), timeout=90)
    if not result.ok:
        raise CommandError(
            f"{node.name}: the preflight probe failed with {node.python} (exit {result.exited})", tail=result.tail()
        )
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    try:
        facts, probe = json.loads(lines[-2]), json.loads(lines[-1])
    except (ValueError, IndexError) as error:
        raise CommandError(f"{node.name}: the preflight probe printed no JSON", tail=result.tail()) from error
    return Observation(
        node, facts=facts, probe=probe, clock_offset=clock_offset(node), sftp=sftp_offered(node, host_keys)
    )


def sftp_offered(node: Node, host_keys: str | None = None) -> bool | None:
    """Whether the node's SSH server offers SFTP; None for the local node (no SSH)."""
    if node.transport == "local":
        return None
    from ava.transport.ssh import SSHTransport

    transport = connect(node, host_keys=host_keys)
    return transport.sftp_offered() if isinstance(transport, SSHTransport) else None


def observe(nodes: list[Node], *, host_keys: str | None = None) -> list[Observation]:
    """An observation for every node; the first node is the master of a run on them all."""
    if not nodes:
        return []
    master = nodes[0]
    outcomes = run_all(nodes, lambda node: observe_one(node, master, host_keys=host_keys))
    return [o if isinstance(o, Observation) else Observation(n, error=o) for n, o in zip(nodes, outcomes.values())]


# -- judging (pure) -----------------------------------------------------------------------------


def verdicts(observations: list[Observation]) -> list[Check]:
    """Every check, per node then across nodes, in a fixed order."""
    checks: list[Check] = []
    up = [o for o in observations if o.error is None]
    master = observations[0].node if observations else None
    for o in observations:
        checks.append(check_ssh(o))
    for o in up:
        if o.sftp is not None:
            checks.append(check_sftp(o))
    for o in up:
        checks.append(check_python(o))
    checks += check_versions_alike(up)
    for o in up:
        checks.append(check_gpus(o))
    checks += check_gpu_models_alike(up)
    for o in up:
        checks.append(check_gpu_health(o))
    for o in up:
        checks += check_disk(o)
    checks += check_clock(up)
    checks += check_ledgers(up)
    for o in up:
        checks.append(check_interface(o, master))
        checks.append(check_master_reach(o, master))
        checks.append(check_lookups(o))
        checks.append(check_isolation(o))
    return checks


def check_ledgers(up: list[Observation]) -> list[Check]:
    """A warning where several workdirs on one node hold leases in ledgers of their own: their
    runs cannot see each other's GPUs. A node-wide `ledger` in ava.toml is what fixes it."""
    by_host: dict[str, list[Observation]] = {}
    for o in up:
        by_host.setdefault(o.node.host or "local", []).append(o)
    checks = []
    for host, group in by_host.items():
        holding = {o.node.workdir: o for o in group if o.facts.get("leases")}
        if len(holding) > 1 and (
            None in {o.node.ledger for o in holding.values()} or len({o.node.ledger for o in holding.values()}) > 1
        ):
            names = ", ".join(
                f"{o.node.name} ({o.node.workdir})" for o in sorted(holding.values(), key=lambda o: o.node.name)
            )
            checks.append(
                Check(
                    "ledger",
                    None,
                    WARN,
                    f"{host}: several workdirs hold GPU leases in separate ledgers: {names}",
                    'set one node-wide ledger = "/var/lib/ava/leases" for '
                    "them in ava.toml (group-writable; see README)",
                )
            )
    return checks


def check_ssh(o: Observation) -> Check:
    node = o.node
    if o.error is None:
        how = "no SSH (local node)" if node.transport == "local" else f"connected, host key verified ({node.host_keys})"
        return Check("ssh", node.name, PASS, how)
    message = o.error.message
    if not isinstance(o.error, ConnectError):
        return Check(
            "ssh",
            node.name,
            FAIL,
            message,
            f"check that python = {node.python!r} runs on the node (set it in the inventory), then rerun `ava doctor`",
        )
    reason = o.error.reason
    if "unknown host key" in reason:
        fix = 'trust the node\'s key once with `ava nodes --accept-new` (or host_keys = "accept-new")'
    elif "host key changed" in reason:
        fix = (
            f"if {node.name} was reinstalled, remove its old key (ssh-keygen -R {node.host} -f {node.known_hosts}) "
            "and accept the new one; otherwise someone may be intercepting the connection"
        )
    elif "authentication" in reason:
        fix = f"check user and identity for {node.name} in the inventory, or load the key into ssh-agent"
    elif "refused" in reason:
        fix = f"start sshd on {node.name} or correct its port ({node.port})"
    elif "resolve" in reason:
        fix = f"correct host for {node.name} in the inventory, or add it to /etc/hosts"
    else:
        fix = f"check that {node.name} is up and reachable from here; raise connect_timeout on a slow network"
    return Check("ssh", node.name, FAIL, message, fix)


def check_sftp(o: Observation) -> Check:
    if o.sftp:
        return Check("sftp", o.node.name, PASS, "the SSH server offers SFTP")
    return Check(
        "sftp",
        o.node.name,
        WARN,
        "no SFTP subsystem: files stream over the exec channel",
        "the SSH server offers no SFTP subsystem; ava streams files over the exec channel "
        "(add `Subsystem sftp internal-sftp` to the node's sshd_config to use SFTP)",
    )


def _versions(o: Observation) -> dict[str, str | None]:
    return dict(o.probe.get("versions") or {})


def check_python(o: Observation) -> Check:
    v = _versions(o)
    if not v.get("torch"):
        return Check(
            "torch",
            o.node.name,
            FAIL,
            f"torch is not installed for {o.facts.get('python_path') or o.node.python}",
            "install torch into that interpreter, or point python in the inventory at one that has it",
        )
    built = f"CUDA {v['cuda']}" if v.get("cuda") else "CPU build"
    nccl = f", NCCL {v['nccl']}" if v.get("nccl") else ""
    return Check("torch", o.node.name, PASS, f"Python {v.get('python')}, torch {v['torch']} ({built}{nccl})")


def _groups(values: dict[str, Any]) -> str:
    """ "2.3.0 on n1, n3; 2.4.1 on n2" from {node: value}."""
    by_value: dict[str, list[str]] = defaultdict(list)
    for name, value in values.items():
        by_value[str(value) if value is not None else "none"].append(name)
    return "; ".join(f"{value} on {', '.join(names)}" for value, names in by_value.items())


def check_versions_alike(up: list[Observation]) -> list[Check]:
    if len(up) < 2:
        return []
    checks = []
    for key in VERSION_KEYS:
        values = {o.node.name: _versions(o).get(key) for o in up}
        if len(set(values.values())) > 1:
            majority = statistics.mode(values.values())
            checks.append(
                Check(
                    f"{key} alike",
                    None,
                    FAIL,
                    f"{key} differs: {_groups(values)}",
                    f"install the same {key} on every node of a run"
                    + (f" ({key} {majority} on the others)" if majority else ""),
                )
            )
        else:
            only = next(iter(values.values()))
            checks.append(Check(f"{key} alike", None, PASS, f"{key} {only or 'absent'} on all {len(up)} nodes"))
    return checks


def _gpus(o: Observation) -> list[dict[str, Any]]:
    return list(o.facts.get("gpus") or [])


def check_gpus(o: Observation) -> Check:
    found = _gpus(o)
    indices = {g.get("index") for g in found}
    models = sorted({str(g.get("name")) for g in found})
    shown = f"{len(found)} × {', '.join(models)}" if found else "no GPUs"
    wanted = o.node.gpus
    missing = [i for i in wanted if i not in indices]
    if missing:
        why = (
            ""
            if found
            else f" ({'nvidia-smi not found' if o.probe.get('gpu_health', {}).get('nvidia_smi') == 'missing' else 'nvidia-smi lists none'})"
        )
        return Check(
            "gpus",
            o.node.name,
            FAIL,
            f"the inventory names GPUs {list(wanted)} but the node shows {shown}{why}",
            f"correct gpus for {o.node.name} in the inventory, or install the NVIDIA driver and check the GPUs",
        )
    if len(models) > 1:
        return Check(
            "gpus",
            o.node.name,
            WARN,
            f"mixed models on one node: {shown}",
            "list only alike GPUs for this node (gpus = [indices]) so ranks run at one speed",
        )
    return Check("gpus", o.node.name, PASS, shown + (f" (inventory: {len(wanted)})" if wanted else ""))


def check_gpu_models_alike(up: list[Observation]) -> list[Check]:
    models = {o.node.name: ",".join(sorted({str(g.get("name")) for g in _gpus(o)})) for o in up if _gpus(o)}
    if len(set(models.values())) > 1:
        return [
            Check(
                "gpu models alike",
                None,
                WARN,
                f"GPU models differ: {_groups(models)}",
                "a run goes at the pace of its slowest GPU; use labels to keep runs on alike nodes",
            )
        ]
    return []


def check_gpu_health(o: Observation) -> Check:
    health = o.probe.get("gpu_health") or {}
    if health.get("nvidia_smi") == "missing":
        return Check("gpu health", o.node.name, PASS, "no nvidia-smi (CPU node)")
    if health.get("nvidia_smi") != "ok":
        return Check(
            "gpu health",
            o.node.name,
            FAIL,
            f"nvidia-smi failed: {health.get('nvidia_smi')}",
            "run nvidia-smi on the node; reload the driver or reboot the node",
        )
    problems, warnings = [], []
    for gpu in health.get("gpus") or []:
        label = f"GPU {gpu.get('index')}"
        ecc = _number(gpu.get("ecc.errors.uncorrected.volatile.total"))
        if ecc:
            problems.append(f"{label}: {ecc} uncorrected ECC errors")
        if _yes(gpu.get("remapped_rows.failure")):
            problems.append(f"{label}: row remapping failed")
        if _yes(gpu.get("retired_pages.pending")) or _yes(gpu.get("remapped_rows.pending")):
            warnings.append(f"{label}: memory pages wait for retirement")
    xid = o.probe.get("xid") or {}
    events = xid.get("events") or []
    fatal = sorted({e["xid"] for e in events if e.get("xid") in FATAL_XIDS})
    other = sorted({e["xid"] for e in events if e.get("xid") not in FATAL_XIDS})
    if fatal:
        problems.append(f"Xid {', '.join(map(str, fatal))} in the kernel log")
    if other:
        warnings.append(f"Xid {', '.join(map(str, other))} in the kernel log (often a program's fault)")
    log = "" if xid.get("readable") else "; kernel log not readable, Xid errors unchecked"
    count = len(health.get("gpus") or [])
    if problems:
        return Check(
            "gpu health",
            o.node.name,
            FAIL,
            "; ".join(problems + warnings) + log,
            f"drain {o.node.name}: reset the GPU (nvidia-smi -r) or reboot, and replace it if errors return",
        )
    if warnings:
        return Check(
            "gpu health",
            o.node.name,
            WARN,
            "; ".join(warnings) + log,
            f"reboot {o.node.name} when idle to retire pages; watch the kernel log for more Xids",
        )
    return Check("gpu health", o.node.name, PASS, f"{count} GPUs: no ECC errors, no pending retirement{log}")


def _number(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _yes(value: Any) -> bool:
    return str(value).strip().lower() in ("yes", "1", "true")


def check_disk(o: Observation) -> list[Check]:
    disk = o.probe.get("disk") or {}
    work = disk.get("workdir") or {}
    cache = disk.get("cache_dir") or {}
    name = o.node.name
    checks = []
    free = work.get("free")
    where = f"{format_size(free, unknown='?')} free for the workdir ({work.get('path')})"
    if free is None:
        checks.append(
            Check(
                "disk",
                name,
                FAIL,
                f"cannot read free space at {o.node.workdir}: {work.get('error')}",
                "create the workdir or point workdir at a writable disk",
            )
        )
    elif free < WORKDIR_FAIL:
        checks.append(Check("disk", name, FAIL, where, "free space on that disk or point workdir at a larger one"))
    elif free < WORKDIR_WARN:
        checks.append(Check("disk", name, WARN, where, "logs and code of every run land there; free some space"))
    else:
        checks.append(Check("disk", name, PASS, where))
    cache_free = cache.get("free")
    room = (cache_free or 0) + (cache.get("used") or 0)
    detail = f"{format_size(cache_free, unknown='?')} free for the cache ({cache.get('path')}), cache_size {format_size(o.node.cache_size)}"
    if cache_free is None:
        checks.append(
            Check(
                "cache disk",
                name,
                FAIL,
                f"cannot read free space at {o.node.cache_dir}",
                "create cache_dir or point it at a writable local disk",
            )
        )
    elif cache_free < WORKDIR_FAIL:
        checks.append(
            Check("cache disk", name, FAIL, detail, "free space there or point cache_dir at a larger local disk")
        )
    elif room < o.node.cache_size:
        checks.append(
            Check(
                "cache disk",
                name,
                WARN,
                detail,
                f"lower cache_size to at most {format_size(room * 0.9)} or free space: a full disk fails runs",
            )
        )
    else:
        checks.append(Check("cache disk", name, PASS, detail))
    return checks


def check_clock(up: list[Observation]) -> list[Check]:
    offsets = {o.node.name: o.clock_offset for o in up if o.clock_offset is not None}
    if len(offsets) < 2:
        return []
    middle = statistics.median(offsets.values())
    checks = []
    for name, offset in offsets.items():
        off = offset - middle
        if abs(off) > SKEW_WARN:
            checks.append(
                Check(
                    "clock",
                    name,
                    WARN,
                    f"{abs(off):.1f} s {'ahead of' if off > 0 else 'behind'} the other nodes",
                    f"run an NTP client (chrony, systemd-timesyncd) on {name}: logs and timeouts compare clocks",
                )
            )
    skew = max(offsets.values()) - min(offsets.values())
    status = WARN if skew > SKEW_WARN else PASS
    checks.append(
        Check(
            "clock skew",
            None,
            status,
            f"{skew:.3f} s between the nodes' clocks",
            "synchronise every node's clock with NTP" if status == WARN else "",
        )
    )
    return checks


def check_interface(o: Observation, master: Node | None) -> Check:
    iface = o.probe.get("interface") or {}
    if iface.get("error") or not iface.get("name"):
        fix = (
            f"set interface for {o.node.name} in the inventory to the NIC that reaches {master.name if master else 'the master'}"
            if o.node.interface == "auto"
            else f"correct interface = {o.node.interface!r} (see `ip addr` on the node)"
        )
        return Check("interface", o.node.name, FAIL, str(iface.get("error") or "no interface found"), fix)
    chosen = "named in the inventory" if o.node.interface != "auto" else "routes to the master"
    detail = f"{iface['name']} ({iface.get('address')}), {chosen}"
    if iface["name"] == "lo" and master is not None and master.transport != "local":
        return Check(
            "interface",
            o.node.name,
            WARN,
            detail + ": loopback",
            "the master's address is this node's loopback; use an address other nodes can reach as its host",
        )
    return Check("interface", o.node.name, PASS, detail)


def check_master_reach(o: Observation, master: Node | None) -> Check:
    reach = o.probe.get("master_reach") or {}
    if reach.get("ok") is None or master is None:
        return Check("reaches master", o.node.name, PASS, "all nodes are this computer")
    address, port = master_endpoint(master)
    if reach["ok"]:
        return Check(
            "reaches master",
            o.node.name,
            PASS,
            f"{address}:{port} answers in {format_duration(reach.get('seconds', 0))}",
        )
    return Check(
        "reaches master",
        o.node.name,
        FAIL,
        f"cannot reach the master {master.name} at {address}:{port}: {reach.get('error')}",
        f"check routes and firewalls between {o.node.name} and {master.name}: the rendezvous and "
        "NCCL/Gloo traffic go there",
    )


def check_lookups(o: Observation) -> Check:
    lookups = o.probe.get("lookups") or []
    stalled = [l for l in lookups if l.get("stalled")]
    slow = [l for l in lookups if not l.get("stalled") and (l.get("seconds") or 0) > LOOKUP_SLOW]
    failed = [l for l in lookups if not l.get("stalled") and l.get("error") and l.get("kind") in ("forward", "master")]
    fix = (
        "add the node's names to /etc/hosts on every node, or fix the resolvers in /etc/resolv.conf "
        "(a nameserver that does not answer stalls every rendezvous)"
    )
    if stalled:
        names = ", ".join(f"{l['kind']} {l['name']}" for l in stalled)
        return Check("name lookups", o.node.name, FAIL, f"stalled over {format_duration(LOOKUP_TIMEOUT)}: {names}", fix)
    if slow or failed:
        parts = [f"{l['kind']} {l['name']} took {format_duration(l['seconds'])}" for l in slow]
        parts += [f"{l['kind']} {l['name']} failed ({l['error']})" for l in failed]
        return Check("name lookups", o.node.name, WARN, "; ".join(parts), fix)
    longest = max((l.get("seconds") or 0 for l in lookups), default=0)
    return Check("name lookups", o.node.name, PASS, f"{len(lookups)} lookups, slowest {format_duration(longest)}")


def check_isolation(o: Observation) -> Check:
    backend = o.facts.get("isolation") or "none"
    if backend == "none":
        return Check(
            "isolation",
            o.node.name,
            WARN,
            "no cgroups: runs are tracked by process group only, memory and CPU limits not enforced",
            "mount cgroups on the node (cgroup v2 with systemd is best) so that runs are fenced",
        )
    if backend == "v1" and o.probe.get("euid") != 0:
        return Check(
            "isolation",
            o.node.name,
            WARN,
            "cgroup v1 needs root, and ava does not run as root here",
            "run as root on this node, or move it to cgroup v2 with systemd",
        )
    return Check("isolation", o.node.name, PASS, f"{backend} (cgroup {o.facts.get('cgroup')})")


def measure_bandwidth(up: list[Observation]) -> tuple[BandwidthReport | None, list[Check]]:
    """The all-reduce benchmark across the reachable nodes (network), and what it shows: on
    GPUs where every node has them and CUDA, over the interfaces the probe found."""
    from ava.bandwidth import measure

    if len(up) < 2:
        return None, [
            Check("bandwidth", None, FAIL, "needs at least two reachable nodes", "fix the failures above first")
        ]
    gpu = all(o.facts.get("gpus") and (o.probe.get("versions") or {}).get("cuda") for o in up)
    interfaces = {o.node.name: (o.probe.get("interface") or {}).get("name") for o in up}
    try:
        measured = measure([o.node for o in up], gpu=gpu, interfaces=interfaces)
    except AvaError as failure:
        fix = "fix the failures above; then check that the nodes reach each other on any port"
        return None, [Check("bandwidth", None, FAIL, failure.message, fix)]
    return measured, check_bandwidth(measured)


def check_bandwidth(measured: BandwidthReport) -> list[Check]:
    """A warning for each node whose link to the master is slow (bandwidth.slow_links)."""
    return [
        Check(
            "bandwidth",
            link.node,
            WARN,
            f"link to {measured.nodes[0]} at {link.bandwidth / 1e9:.2f} GB/s, under half of the other nodes'",
            f"check {link.node}'s NIC, cable and interface setting",
        )
        for link in measured.links
        if link.slow
    ]


def worst(checks: list[Check]) -> str:
    statuses = {c.status for c in checks}
    return FAIL if FAIL in statuses else WARN if WARN in statuses else PASS
