"""The torture harness's fixed-seed slice (one schedule, a couple of minutes on a quiet machine):
randomized concurrent steps with kill -9, injected EIO/ENOSPC/short writes and race delays, and a
full tmpfs when the machine allows mounting one; every invariant of tests/torture/harness.py must
hold. ``cover``: the steps draw first what has not run yet, so the slice meets builds, ranks and a
resume with another world size, compact, prune, gc, cleaners, readers, injected faults, a kill -9
and a full disk, in an order and at moments the seed gives (the kill -9 and one fault at points the
fault shim holds or fails, so that a loaded machine meets them as a quiet one does). ``make torture
SEED= MINUTES=`` runs random schedules longer."""

from __future__ import annotations

import pytest

from tests.torture.harness import Torture


@pytest.mark.slow
def test_fixed_seed_slice_keeps_every_invariant(tmp_path):
    torture = Torture(tmp_path, seed=27, log=lambda line: print(line, flush=True), cover=True)
    try:
        report = torture.run(seconds=600, max_schedules=1)  # the time is a guard: one schedule is the slice
    finally:
        torture.close()
    print(report.summary())
    assert torture._covered(), f"{report.summary()}\n  not met: {', '.join(torture._missing())}"
    assert report.faults >= 1 and report.ran["reader"] >= 1, report.summary()
    assert not report.violations, report.summary()
