"""`ava train --dry-run` on a node ava has never touched: the plan comes out, nothing starts."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REPO, run_ava


def test_dry_run_on_a_fresh_node_prints_the_plan_and_starts_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    inventory = tmp_path / "ava.toml"
    inventory.write_text(f'[nodes.local]\ntransport = "local"\nworkdir = "{work}"\n')
    done = run_ava(
        "train",
        str(REPO / "recipes" / "ddp-minimal"),
        "--dry-run",
        "--json",
        inventory=inventory,
        env={"AVA_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert json.dumps(plan).count('"torch.distributed.run"') >= 1
    # Only ava's agent file was put there (the route probe asks it); no run, no tree, no venv.
    assert sorted(p.name for p in work.iterdir()) == ["agent"]
    assert not (tmp_path / "home" / "runs").exists() or not any((tmp_path / "home" / "runs").iterdir())
