"""`signal_each` freezes a process tree whose members may exit while it is being listed
(test_outages_e2e stops PostgreSQL and its backends; a backend whose client closed exited
between `descendants` and `os.kill`, and the test failed with ProcessLookupError)."""

import signal
import subprocess
import sys

from tests.helpers.processes import alive, signal_each


def test_a_process_that_exited_after_it_was_listed_is_skipped_and_the_others_are_signalled():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()   # reaped: its pid no longer names a process
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        reached = signal_each([gone.pid, sleeper.pid], signal.SIGTERM)
        assert reached == [sleeper.pid]
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
        assert not alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
