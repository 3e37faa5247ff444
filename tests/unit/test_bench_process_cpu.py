"""bench/_common's one reading of a process's or a thread's CPU from /proc, which
bench/verify (proc_sample), bench/assign_cpu (thread_cpu) and bench/assign_service use."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from bench._common import cpu_times_s, process_cpu_s
from bench.assign_cpu import thread_cpu
from bench.verify import proc_sample


def _burn_cpu(seconds: float) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def _burn_cpu_of_this_thread(seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def test_the_fields_are_read_after_a_name_that_holds_spaces_and_parentheses():
    tick = os.sysconf("SC_CLK_TCK")
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    stat = f"123 (a (b) c) S 1 1 1 0 -1 0 0 0 0 0 {3 * tick} {2 * tick} 0 0 20 0 1 0 5"
    assert cpu_times_s(stat) == (3.0, 2.0)


def test_this_process_cpu_is_what_the_kernel_counts_for_it():
    _burn_cpu(0.05)
    own = os.times()
    read = process_cpu_s(os.getpid())
    after = os.times()
    # /proc counts in clock ticks (1/100 s) what os.times counts finer: within a tick or two
    assert own.user + own.system - 0.03 <= read <= after.user + after.system + 0.03
    sample = proc_sample(os.getpid())
    assert sample is not None and sample[0] >= read and sample[1] > 1   # RSS MB of a Python process


def test_threads_are_split_and_a_busy_one_counts_its_own_cpu():
    burnt, release = threading.Event(), threading.Event()

    def spin():
        _burn_cpu_of_this_thread(0.05)
        burnt.set()
        release.wait(30)

    worker = threading.Thread(target=spin, name="bench-spinner")
    worker.start()
    try:
        assert burnt.wait(30)
        threads = thread_cpu(os.getpid())
    finally:
        release.set()
        worker.join()
    (user, system), = [times for (tid, _name), times in threads.items() if tid == worker.native_id]
    assert user + system >= 0.04   # of 0.05 s, in 0.01 s ticks
    assert sum(u + s for u, s in threads.values()) <= process_cpu_s(os.getpid()) + 0.03


def test_a_process_that_is_gone_has_no_sample():
    child = subprocess.Popen(["true"])
    child.wait()
    assert proc_sample(child.pid) is None
