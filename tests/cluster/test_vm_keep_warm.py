"""A node's spare between runs (`keep_warm`, ava/agent/warm.py) on the systemd + cgroup v2 guest
(tests/support/vm.py), under the back-end the agent picks there: systemd transient scopes. A
spare is already running, so systemd-run cannot start it in a scope: the agent asks systemd
for the scope around it (StartTransientUnit with its pid, the job's limits). The second run
starts from the spare the first left, fenced in its own scope with its memory limit."""

from __future__ import annotations

from pathlib import Path

from tests.cluster.test_vm_isolation import SLOW, assert_nothing_left
from tests.conftest import run_ava
from tests.support.vm import VM
from tests.support.vm_fixtures import VM_ENV, look

# Prints the cgroup the rank runs in and that cgroup's memory limit.
PROBE = """
import os
group = open("/proc/self/cgroup").read().strip().split("::", 1)[1]
print("CGROUP", group, open("/sys/fs/cgroup" + group + "/memory.max").read().strip(), flush=True)
"""


def test_the_second_run_starts_from_the_spare_in_a_scope_of_its_own(vm: VM, tmp_path: Path) -> None:
    recipe = tmp_path / "probe"
    recipe.mkdir()
    (recipe / "probe.py").write_text(PROBE)
    (recipe / "recipe.toml").write_text('name = "probe"\n[run]\nscript = "probe.py"\n[failover]\nmax_restarts = 0\n')
    inventory = vm.inventory(tmp_path / "ava.toml", keep_warm="10m")
    home = {"AVA_HOME": str(tmp_path / "home"), **VM_ENV}
    ran: list[str] = []
    try:
        for _ in range(2):
            done = run_ava(
                "train", str(recipe), "--set", "resources.memory=1GiB", inventory=inventory, env=home, timeout=SLOW
            )
            assert done.returncode == 0, done.stdout + done.stderr
            ran.append(next(ln.split()[2] for ln in done.stderr.splitlines() if ln.startswith("ava: run ")))
        first, second = (look(vm, run) for run in ran)
        assert first.status["cgroup"]["backend"] == "systemd", first.status["cgroup"]
        assert not first.status.get("from_node_spare"), first.status
        assert second.status.get("from_node_spare"), second.status
        unit = second.status["cgroup"]["unit"]
        line = next(ln for ln in second.output.splitlines() if "CGROUP " in ln)
        group, limit = line.split("CGROUP ", 1)[1].split()
        assert group.startswith("/ava.slice/") and group.endswith("/" + unit), line
        assert limit == str(1 << 30), line
        for run in ran:
            assert_nothing_left(vm, run, inventory)
    finally:
        vm.ssh("pkill -KILL -f 'avaagent[.]warm' || true", check=False)
    assert vm.ssh("pgrep -f 'avaagent[.]warm' || true").stdout.strip() == ""
