"""Threads sharing one kernel, and processes sharing one file: exact accounting."""

import multiprocessing as mp
import threading

import aex
from conftest import MODELS, assert_clean

PER_CALL = 450  # micro-USD reserved and committed by each call below


def _race(kernel, token, name):
    admitted = 0
    while True:
        try:
            a = kernel.admit(token, "mini", input_tokens=1000, max_output_tokens=500)
        except aex.InsufficientBudget:
            return admitted
        agent = kernel.agent(name)
        assert agent["spent_micro"] + agent["reserved_micro"] <= agent["budget_micro"], agent
        assert kernel.commit(a["execution_id"], input_tokens=1000, output_tokens=500)["cost_micro"] == PER_CALL
        admitted += 1


def test_sixteen_threads_admit_exactly_k_calls(db):
    k_calls = 160
    kernel = aex.Kernel(db, config_yaml=MODELS, durability="normal")
    token = kernel.create_agent("atlas", aex.format_usd(k_calls * PER_CALL))
    counts = []
    lock = threading.Lock()

    def run():
        n = _race(kernel, token, "atlas")
        with lock:
            counts.append(n)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counts) == 16 and sum(counts) == k_calls
    a = kernel.agent("atlas")
    assert (a["spent_micro"], a["reserved_micro"]) == (k_calls * PER_CALL, 0)
    assert_clean(kernel)


def worker(db, token, results):
    # Each process opens its own kernel: a SQLite connection must not cross a fork.
    kernel = aex.Kernel(db, config_yaml=MODELS, durability="normal")
    results.put(_race(kernel, token, "atlas"))


def test_four_processes_admit_exactly_k_calls(db):
    k_calls = 200
    kernel = aex.Kernel(db, config_yaml=MODELS, durability="normal")
    token = kernel.create_agent("atlas", aex.format_usd(k_calls * PER_CALL))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(db, token, results)) for _ in range(4)]
    for p in procs:
        p.start()
    counts = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(counts) == k_calls
    a = kernel.agent("atlas")
    assert (a["spent_micro"], a["reserved_micro"]) == (k_calls * PER_CALL, 0)
    assert_clean(kernel)


def test_the_gil_is_released_during_store_work(db):
    # A thread spinning in Python keeps running while another waits on fsyncs ("full").
    kernel = aex.Kernel(db, config_yaml=MODELS, durability="full")
    token = kernel.create_agent("atlas", "100")
    spins = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            spins[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    for _ in range(50):
        a = kernel.admit(token, "mini", input_tokens=10, max_output_tokens=10)
        kernel.commit(a["execution_id"], input_tokens=10, output_tokens=10)
    stop.set()
    t.join()
    assert spins[0] > 1000


def test_after_fork_the_child_must_open_its_own_kernel(db):
    import os

    kernel = aex.Kernel(db, config_yaml=MODELS, durability="normal")
    token = kernel.create_agent("atlas", "1.00")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the inherited kernel refuses; a new one works
        code = 1
        try:
            try:
                kernel.admit(token, "mini", input_tokens=10, max_output_tokens=10)
            except aex.Unavailable as e:
                if "fork" in e.message:
                    mine = aex.Kernel(db, config_yaml=MODELS, durability="normal")
                    a = mine.admit(token, "mini", input_tokens=10, max_output_tokens=10)
                    mine.commit(a.execution_id, input_tokens=10, output_tokens=10)
                    code = 0
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == bytes([0])
    os.waitpid(pid, 0)
    assert kernel.agent("atlas")["spent_micro"] == 8
    assert_clean(kernel)
