"""The command line: a demo stopped by SIGTERM unwinds as Ctrl-C does, and leaves the
signal handlers as it found them."""

from __future__ import annotations

import os
import signal

import pytest

from fedtwin.cli import stop_on_signals


def test_sigterm_inside_raises_keyboard_interrupt_once_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()  # not reached: the handler raises first
        finally:
            # a second signal while cleaning up is ignored
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before
