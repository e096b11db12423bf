"""bench/memory_replay.py --reserve: the reserve per profile from measured phases, taking the
slack from the profile's own workloads when any measured phase ran at them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_replay  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


def _phase(workload: dict, allocated: int, slack: int, outside: int) -> dict:
    reserved = allocated + slack
    return {
        "workload": workload,
        "measured": {
            "peak_allocated": allocated,
            "peak_reserved": reserved,
            "process_peak": reserved + outside,
        },
    }


def _payload(*phases: dict) -> dict:
    return {"fresh_process_per_phase": True, "results": {"x": [{"phases": list(phases)}]}}


def test_reserve_takes_the_slack_of_the_profiles_own_workloads():
    big_step = {"micro_batch": 2, "seq_len": 1024, "gradient_checkpointing": True}  # the 4090's
    small_step = {"micro_batch": 1, "seq_len": 512, "gradient_checkpointing": True}  # the 4070's
    payload = _payload(
        _phase(big_step, 8 * GIB, 2000 * MIB, 700 * MIB),
        _phase(small_step, 6 * GIB, 300 * MIB, 772 * MIB),
    )
    got = memory_replay.reserves([payload])
    # Outside the allocator: the most any phase held (772 MiB), for every profile.
    assert {r["outside_mib"] for r in got.values()} == {772}
    # rtx-4070-12gb fine-tunes 1 x 512: its slack is that phase's, not the 2 x 1024 step's.
    small = got["rtx-4070-12gb"]
    assert small["matched"] == 1 and small["slack_mib"] == 300
    assert small["reserve_mib"] == 1088  # 772 + 300, rounded up to 64 MiB
    big = got["rtx-4090-24gb"]
    assert big["matched"] == 1 and big["slack_mib"] == 2000
    # a100-80gb fine-tunes 4 x 2048, which no phase ran at: every phase that fits counts
    assert got["a100-80gb"]["matched"] == 0 and got["a100-80gb"]["slack_mib"] == 2000
    # the Orin Nano's 6 GiB fits neither phase: no slack measured, the context alone
    assert got["jetson-orin-nano-8gb"]["slack_mib"] == 0
    assert got["jetson-orin-nano-8gb"]["reserve_mib"] == 832  # 772 rounded up to 64 MiB
