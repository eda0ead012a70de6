"""The store with other users of its files: Python's own sqlite3 in the same process, the files'
permissions, and the CLI's warnings."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import aex
from conftest import MODELS, run_cli

PER_CALL = 450  # micro-USD: 1,000 input and 500 output tokens of "mini"

# One process: aex guards calls, and between them the stdlib's sqlite3 (another copy of SQLite)
# opens the same file, reads, writes and closes, as a notebook or pandas.read_sql would. The
# process waits for a line on stdin after each step, so the parent can look from outside.
CHILD = textwrap.dedent(
    """
    import sqlite3, sys, aex
    db, models = sys.argv[1], sys.argv[2]
    k = aex.Kernel(db, config=models, durability="full")
    token = k.create_agent("a", "10.00", rpm=1_000_000)

    def call():
        a = k.admit(token, "mini", input_tokens=1000, max_output_tokens=500)
        k.mark_dispatched(a["execution_id"])
        k.commit(a["execution_id"], input_tokens=1000, output_tokens=500)

    def step(n):
        print(f"step {n} {k.head()}", flush=True)
        sys.stdin.readline()

    call()
    step(1)
    con = sqlite3.connect(db)
    assert con.execute("select count(*) from agents").fetchone() == (1,)
    con.execute("create table if not exists notebook (note text)")
    con.execute("insert into notebook values ('read by pandas')")
    con.commit()
    con.close()
    for n in range(2, 7):
        call()
        step(n)
    print("done", flush=True)
    sys.stdin.readline()
    """
)


def _inspect(db):
    return json.loads(run_cli("--json", "agent", "inspect", "a", db=db).stdout)


def _run_workload(db, models, env):
    """Runs CHILD; after each step reads the agent from another process (the aex CLI). Returns
    what it saw after each step and the last head the child acknowledged; SIGKILLs the child."""
    seen, head, wal_kept = [], None, False
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, db, str(models)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        try:
            for n in range(1, 7):
                line = child.stdout.readline().split()
                assert line[:2] == ["step", str(n)], line
                head = line[2]
                a = _inspect(db)
                seen.append((a["spent_micro"], a["reserved_micro"]))
                child.stdin.write("\n")
                child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
            wal_kept = os.path.exists(db + "-wal")
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
    return seen, head, wal_kept


def test_the_stdlib_sqlite3_in_the_same_process_loses_nothing(db, tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    env = {k: v for k, v in os.environ.items() if k != "AEX_UNSAFE_CLASSIC_LOCKS"}
    seen, head, wal_kept = _run_workload(db, models, env)
    # Another process saw the current counters after every step, and the WAL stayed in place.
    assert seen == [(n * PER_CALL, 0) for n in range(1, 7)]
    assert wal_kept, "the WAL was deleted under a running kernel"
    # Reopened after the crash: every acknowledged call and event is there, and the audit is clean.
    k = aex.Kernel(db, config_yaml=MODELS)
    a = k.agent("a")
    assert (a["spent_micro"], a["reserved_micro"]) == (6 * PER_CALL, 0)
    seq, digest = head.split(":")
    events = k.events(int(seq), 1)
    assert [(e["seq"], e["hash"]) for e in events] == [(int(seq), digest)], "acknowledged events were lost"
    report = k.audit()
    assert report["clean"], report["failure"]


def test_the_control_with_classic_locks_does_lose_writes(db, tmp_path):
    """The same workload with SQLite's classic locks: the hazard is real here, so the test above
    would see it."""
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    seen, _, _ = _run_workload(db, models, dict(os.environ, AEX_UNSAFE_CLASSIC_LOCKS="1"))
    assert seen[0] == (PER_CALL, 0)
    assert seen[-1] != (6 * PER_CALL, 0), "classic locks lost nothing: this test cannot see the hazard"
    k = aex.Kernel(db, config_yaml=MODELS)
    assert k.agent("a")["spent_micro"] < 6 * PER_CALL


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_kernel_open_and_init_create_private_files_whatever_the_umask(tmp_path):
    home = tmp_path / "aexhome"
    script = textwrap.dedent(
        """
        import os, sys, aex
        os.umask(0)
        k = aex.Kernel.open(sys.argv[1], config_yaml='models: {mini: {input_price: 1, output_price: 2}}')
        t = k.create_agent("a", "1.00")
        a = k.admit(t, "mini", input_tokens=10, max_output_tokens=10)
        k.commit(a["execution_id"], input_tokens=10, output_tokens=10)
        print(k.warnings())
        for name in ["aex.db", "aex.db-wal", "aex.db-shm", "aex.db.lock"]:
            print(name, oct(os.stat(os.path.join(sys.argv[1], name)).st_mode & 0o777))
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(home)], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "[]", out.stdout
    # Read while the kernel was open: the WAL and shared memory go when the last connection closes.
    assert lines[1:] == [f"{name} 0o600" for name in ["aex.db", "aex.db-wal", "aex.db-shm", "aex.db.lock"]], lines
    assert _mode(home) == 0o700

    cli_home = tmp_path / "clihome"
    env = dict(os.environ, AEX_HOME=str(cli_home), PYTHONWARNINGS="error")
    subprocess.run(
        [sys.executable, "-c", "import os, sys; os.umask(0); from aex.cli import main; sys.exit(main(['init']))"],
        env=env,
        check=True,
        capture_output=True,
    )
    assert _mode(cli_home) == 0o700
    for name in ["aex.db", "aex.db.lock", "models.yaml"]:
        assert _mode(cli_home / name) == 0o600, name


def test_the_cli_warns_about_files_others_can_read_and_leaves_them(db):
    run_cli("agent", "create", "a", "1", "10", db=db)
    os.chmod(db, 0o644)
    proc = run_cli("agent", "list", db=db)
    assert "aex.db is readable or writable by other users (mode 0644)" in proc.stderr, proc.stderr
    assert _mode(db) == 0o644
    assert aex.Kernel(db, config_yaml=MODELS).warnings() != []


def test_a_config_others_can_write_is_refused(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    os.chmod(models, 0o666)
    try:
        aex.Kernel(str(tmp_path / "aex.db"), config=str(models))
    except aex.InvalidRequest as e:
        assert e.field == "config" and "writable by other users" in str(e), str(e)
    else:
        raise AssertionError("a world-writable config was loaded")


# A notebook's connection stays open while kernels come and go (a helper that opens aex.Kernel
# per call): closing aex's files must not drop that connection's locks, or it loses its own
# writes and reads stale counters, and the database can be corrupted.
REOPENING = textwrap.dedent(
    """
    import gc, os, sqlite3, sys, aex
    db, models = sys.argv[1], sys.argv[2]
    k = aex.Kernel(db, config=models)
    token = k.create_agent("a", "10.00", rpm=1_000_000)
    del k
    gc.collect()
    S = sqlite3.connect(db)
    S.execute("create table notebook (n)")
    S.commit()
    for cycle in range(1, 4):
        k = aex.Kernel(db, config=models)
        a = k.admit(token, "mini", input_tokens=1000, max_output_tokens=500)
        k.mark_dispatched(a["execution_id"])
        k.commit(a["execution_id"], input_tokens=1000, output_tokens=500)
        del k, a
        gc.collect()
        S.execute("insert into notebook values (?)", (cycle,))
        S.commit()
        print(S.execute("select spent_micro from agents").fetchone()[0], flush=True)
    os.kill(os.getpid(), 9)
    """
)


def _reopening(db, models, env):
    proc = subprocess.run([sys.executable, "-c", REOPENING, db, str(models)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return [int(line) for line in proc.stdout.split()]


def test_kernels_opened_and_closed_under_an_open_stdlib_connection_leave_its_locks(db, tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    env = {k: v for k, v in os.environ.items() if k != "AEX_UNSAFE_CLASSIC_LOCKS"}
    seen = _reopening(db, models, env)
    assert seen == [PER_CALL, 2 * PER_CALL, 3 * PER_CALL], "the notebook read stale counters"
    import sqlite3

    with sqlite3.connect(db) as c:
        assert c.execute("select count(*) from notebook").fetchone() == (3,), "the notebook's writes were lost"
        assert c.execute("pragma integrity_check").fetchone() == ("ok",)
    k = aex.Kernel(db, config_yaml=MODELS)
    assert k.agent("a")["spent_micro"] == 3 * PER_CALL
    assert k.audit()["clean"]


def test_the_control_kernels_closing_with_classic_locks_do_drop_them(db, tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    seen = _reopening(db, models, dict(os.environ, AEX_UNSAFE_CLASSIC_LOCKS="1"))
    import sqlite3

    with sqlite3.connect(db) as c:
        notebook = c.execute("select count(*) from notebook").fetchone()[0]
    assert seen != [PER_CALL, 2 * PER_CALL, 3 * PER_CALL] or notebook != 3, "classic locks lost nothing: the test above cannot see the hazard"
