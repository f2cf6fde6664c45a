import pytest

from runtime.core.ledger import Ledger, LedgerError, State


def test_ledger_balances_and_refuses_double_training():
    led = Ledger()
    ids = [led.admit() for _ in range(5)]
    for g in ids[:4]:
        led.advance(g, State.GENERATING)
    led.advance(ids[0], State.SCORED)
    led.advance(ids[0], State.BUFFERED)
    led.trained(ids[0])
    led.dropped(ids[1], "no_trainable_sample")
    c = led.counts()
    assert (c.admitted, c.trained, c.dropped, c.in_flight) == (5, 1, {"no_trainable_sample": 1}, 3)
    assert c.balanced
    with pytest.raises(LedgerError):
        led.trained(ids[0])
    with pytest.raises(LedgerError):
        led.dropped(ids[1], "again")
    assert led.counts().duplicates == 2
    with pytest.raises(LedgerError):
        led.advance(ids[2], State.ADMITTED)  # states only move forward
    with pytest.raises(LedgerError):
        led.trained(99)
