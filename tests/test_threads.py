"""OpenMP waits passively in any process that imports fuselm, unless the user chose otherwise.

libgomp itself reports how long a waiting thread spins (OMP_DISPLAY_ENV=VERBOSE prints GOMP_SPINCOUNT when it
loads: 300000 by default, 0 when passive), so the test reads what the runtime really uses, not what fuselm
meant to set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fuselm.errors import FuselmError
from fuselm.threads import set_threads


def libgomp_spin_count(env_extra: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra, OMP_DISPLAY_ENV="VERBOSE")
    code = "import fuselm, torch; torch.ones(64, 64) @ torch.ones(64, 64)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr + proc.stdout)
    assert found, "libgomp printed no settings: is torch built with GNU OpenMP?"
    return int(found.group(1))


def test_importing_fuselm_makes_openmp_wait_passively():
    assert libgomp_spin_count({}) == 0


def test_the_users_policy_wins():
    assert libgomp_spin_count({"OMP_WAIT_POLICY": "ACTIVE"}) > 300000
    assert libgomp_spin_count({"GOMP_SPINCOUNT": "5000"}) == 5000


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(FuselmError, match="--threads"):
        set_threads(bad)
