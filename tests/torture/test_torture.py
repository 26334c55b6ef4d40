"""The torture harness's fixed-seed slice (a couple of minutes): randomized concurrent schedules with
kill -9, injected EIO/ENOSPC/short writes and race delays, and a full tmpfs when the machine allows
mounting one; every invariant of tests/torture/harness.py must hold. `make torture SEED= MINUTES=`
runs it longer."""

from __future__ import annotations

import pytest

from tests.torture.harness import Torture


@pytest.mark.slow
def test_fixed_seed_slice_keeps_every_invariant(tmp_path):
    torture = Torture(tmp_path, seed=27, log=lambda line: print(line, flush=True))
    try:
        report = torture.run(seconds=150, max_schedules=3)
    finally:
        torture.close()
    print(report.summary())
    assert report.steps >= 2 and report.processes >= 5, report.summary()
    assert not report.violations, report.summary()
