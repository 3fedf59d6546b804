"""How a pass hands the banks' outcomes over to be recorded: those that arrive together in one
batch, each within gather_s of the one before and all within gather_max_s of the first; at
once when the batch holds every outcome expected, or the stream ends. (A pause ending a batch:
tests/test_report_service.py.)"""

from __future__ import annotations

import asyncio
import time

from report_service.reports import BankOutcome
from report_service.worker import _END, _Arrivals

GATHER_S, GATHER_MAX_S = 0.2, 1.0  # wide: the machine running the tests may be busy


def _outcome(bank: str) -> BankOutcome:
    return BankOutcome(bank, "ANSWERED")


async def _put_later(arrivals: _Arrivals, items: list[tuple[float, object]]) -> None:
    for delay, item in items:
        await asyncio.sleep(delay)
        arrivals.put(item)


async def test_outcomes_arriving_together_are_one_batch_handed_over_when_complete():
    arrivals = _Arrivals(GATHER_S, GATHER_MAX_S)
    feeding = asyncio.create_task(_put_later(arrivals, [(0.01, _outcome("ICBC")), (0.01, _outcome("CMB")),
                                                        (0.01, _outcome("BOC"))]))
    started = time.monotonic()
    batch = await arrivals.batch(3)
    assert [o.bank_code for o in batch] == ["ICBC", "CMB", "BOC"]
    assert time.monotonic() - started < GATHER_S  # the last one expected: no wait after it
    await feeding


async def test_a_steady_trickle_is_cut_at_gather_max_s_after_the_first():
    arrivals = _Arrivals(GATHER_S, GATHER_MAX_S)
    banks = [f"B{i}" for i in range(12)]
    feeding = asyncio.create_task(_put_later(arrivals, [(GATHER_S / 2, _outcome(b)) for b in banks]))
    first = await arrivals.batch(len(banks))
    assert 0 < len(first) < len(banks)  # some 5 arrive within GATHER_MAX_S of the first
    rest = []
    while len(first) + len(rest) < len(banks):
        rest += await arrivals.batch(len(banks) - len(first) - len(rest))
    assert [o.bank_code for o in first + rest] == banks
    await feeding


async def test_the_stream_ending_hands_the_batch_over_at_once():
    arrivals = _Arrivals(GATHER_S, GATHER_MAX_S)
    arrivals.put(_outcome("ICBC"))
    started = time.monotonic()
    ending = asyncio.get_running_loop().call_later(0.01, arrivals.put, _END)
    batch = await arrivals.batch(3)
    assert batch == [_outcome("ICBC"), _END]
    assert time.monotonic() - started < GATHER_S
    ending.cancel()
    error = RuntimeError("connector gone")
    arrivals.put(error)
    assert await arrivals.batch(2) == [error]


async def test_what_arrived_during_the_last_record_is_gathered_with_what_follows():
    arrivals = _Arrivals(GATHER_S, GATHER_MAX_S)
    arrivals.put(_outcome("ICBC"))  # while the batch before was being recorded
    asyncio.get_running_loop().call_later(0.02, arrivals.put, _outcome("CMB"))
    batch = await arrivals.batch(3)
    assert [o.bank_code for o in batch] == ["ICBC", "CMB"]
