"""A short run of the stress harness (benchmarks/stress.py): kills, concurrency and bad-input fuzz.

The harness exits 1 when any check fails; this test fails with its report then. The concurrency
checks fail until concurrent writers share one codec and tolerate each other's contents.
About 25 s on 2 cores, so not marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HARNESS = REPO / "benchmarks" / "stress.py"


def test_stress_harness_short_run_passes_every_check() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable,
        str(HARNESS),
        "--kills",
        "5",
        "--rounds",
        "1",
        "--fuzz",
        "40",
        "--cache-trials",
        "5",
        "--seconds",
        "60",
    ]
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert result.stdout.strip(), result.stderr
    report = json.loads(result.stdout)
    failures = {kind: check["first"] for kind, check in report["checks"].items() if check["failures"]}
    assert result.returncode == 0 and report["ok"], f"failed checks: {json.dumps(failures, indent=1)}"
    # Every kind of check actually ran.
    assert {part.split("/")[0] for part in report["checks"]} == {"kill", "concurrent", "same-folder", "fuzz", "cache"}
    idle = [kind for kind, check in report["checks"].items() if check["trials"] == 0]
    assert not idle, f"checks that never ran: {idle}"
    assert set(report["parts"]) == {"kill", "concurrent", "fuzz", "cache"}
