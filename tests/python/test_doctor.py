"""``aex doctor``: one line per check, exit 1 when one fails, ``--json`` for scripts."""

import json
import os
import socket
import sqlite3

import aex
from conftest import run_cli
from provider import Provider


def write_config(tmp_path, provider_url, key_env="AEX_DOCTOR_KEY", free=False):
    prices = "input_price: 0, output_price: 0" if free else "input_price: 1, output_price: 2"
    path = tmp_path / "models.yaml"
    path.write_text(f"""
providers:
  local: {{base_url: "{provider_url}", api_key_env: {key_env}}}
models:
  mini: {{provider: local, {prices}}}
""")
    return str(path)


def doctor(db, config, *extra):
    return run_cli("--json", "--config", config, "doctor", *extra, db=db, check=False)


def by_check(proc):
    data = json.loads(proc.stdout)
    return data, {c["check"]: c for c in data["checks"]}


def test_a_healthy_setup_passes_every_check_and_the_network_one(tmp_path, monkeypatch):
    monkeypatch.setenv("AEX_DOCTOR_KEY", "sk-test")
    provider = Provider()
    try:
        db, config = str(tmp_path / "aex.db"), write_config(tmp_path, provider.url)
        aex.Kernel(db, config=config)  # the database exists (doctor never creates one)
        proc = doctor(db, config, "--network")
        data, checks = by_check(proc)
        assert proc.returncode == 0 and data["ok"], proc.stdout
        assert {"config", "database", "lock", "permissions", "audit", "wal", "provider local", "prices", "network local"} <= checks.keys()
        assert all(c["status"] == "ok" for c in data["checks"]), data
        assert "schema version" in checks["database"]["detail"]
        assert "sk-test" not in proc.stdout + proc.stderr, "a key never reaches the output"
        text = run_cli("--config", config, "doctor", db=db, check=False)
        assert text.stdout.splitlines()[0].startswith("ok    config")
    finally:
        provider.stop()


def test_each_problem_fails_its_check_and_the_exit(tmp_path, monkeypatch):
    monkeypatch.delenv("AEX_DOCTOR_UNSET", raising=False)
    # A dead port, a key variable unset with no agent allowed to bring its own, free models.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    db, config = str(tmp_path / "aex.db"), write_config(tmp_path, dead, key_env="AEX_DOCTOR_UNSET", free=True)
    proc = doctor(db, config, "--network")
    data, checks = by_check(proc)
    assert proc.returncode == 1 and not data["ok"]
    assert checks["provider local"]["status"] == "fail" and "AEX_DOCTOR_UNSET" in checks["provider local"]["detail"]
    assert checks["network local"]["status"] == "fail"
    assert checks["prices"]["status"] == "warn" and "mini" in checks["prices"]["detail"]

    # An agent allowed to bring its own key makes the unset variable bring-your-own-key.
    aex.Kernel(db, config=config).create_agent("byok", "1.00", allow_passthrough=True)
    _, checks = by_check(doctor(db, config))
    assert checks["provider local"]["status"] == "ok" and "bring-your-own-key" in checks["provider local"]["detail"]

    # A rewritten ledger fails the audit check.
    with sqlite3.connect(db) as c:
        c.execute("DROP TRIGGER ledger_no_update")
        c.execute("UPDATE ledger SET amount_micro = 7 WHERE kind = 'agent.created'")
    proc = doctor(db, config)
    data, checks = by_check(proc)
    assert proc.returncode == 1 and checks["audit"]["status"] == "fail"

    # A config that does not parse fails the config check, naming the problem.
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    proc = doctor(str(tmp_path / "other.db"), str(bad))
    data, checks = by_check(proc)
    assert proc.returncode == 1 and checks["config"]["status"] == "fail"


def test_files_open_to_other_users_fail_the_permissions_check(tmp_path, monkeypatch):
    monkeypatch.setenv("AEX_DOCTOR_KEY", "x")
    provider = Provider()
    try:
        db, config = str(tmp_path / "aex.db"), write_config(tmp_path, provider.url, key_env="AEX_DOCTOR_KEY")
        aex.Kernel(db, config=config)
        os.chmod(db, 0o644)
        proc = doctor(db, config)
        data, checks = by_check(proc)
        assert proc.returncode == 1 and checks["permissions"]["status"] == "fail", checks["permissions"]
    finally:
        provider.stop()


def test_a_missing_database_fails_and_is_not_created(tmp_path, provider):
    db = tmp_path / "typo" / "dir" / "aex.db"
    config = write_config(tmp_path, provider.url, key_env="AEX_DOCTOR_KEY")
    proc = doctor(str(db), config)
    data, checks = by_check(proc)
    assert proc.returncode == 1 and checks["database"]["status"] == "fail" and "no database" in checks["database"]["detail"]
    assert not db.exists() and not db.parent.exists(), "looking created nothing"


def test_the_network_check_fails_a_wrong_base_url_and_a_provider_that_never_finishes(tmp_path, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Slow(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            if self.path.startswith("/wrong"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(60):  # one byte every 3 s: never whole within the deadline
                self.wfile.write(b"x")
                self.wfile.flush()
                threading.Event().wait(3)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        monkeypatch.setenv("AEX_DOCTOR_KEY", "x")
        db = str(tmp_path / "aex.db")
        for base, needle in ((f"http://127.0.0.1:{port}/wrong", "404"), (f"http://127.0.0.1:{port}/v1", "within")):
            config = write_config(tmp_path, base)
            aex.Kernel(db, config=config)
            proc = doctor(db, config, "--network")
            data, checks = by_check(proc)
            assert proc.returncode == 1 and checks["network local"]["status"] == "fail", checks["network local"]
            assert needle in checks["network local"]["detail"]
    finally:
        server.shutdown()
        server.server_close()
