"""The ``aex`` command: operate the agents, budgets and ledger of one database.

Works on ``~/.aex/aex.db`` (or ``$AEX_HOME``) by default, or ``--db PATH``; reads
``models.yaml`` beside the database unless ``--config`` says otherwise. Tables for people,
``--json`` for scripts; errors are one line on stderr and a non-zero exit. The argument order of
``agent create`` is the HTTP daemon's, so existing scripts keep working.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from . import __version__, check_config, format_usd
from ._kernel import Kernel, default_home, is_database_url, make_private_dir, shown
from .errors import AexError

_HOUR_MS = 3_600_000


def _usd(micro: Optional[int]) -> str:
    return "-" if micro is None else "$" + format_usd(micro)


def _ts(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _hours_to_ms(hours: Optional[float]) -> Optional[int]:
    return None if hours is None else int(round(hours * _HOUR_MS))


_MAX_TTL_HOURS = 24 * 366 * 100  # a century: anything longer is a mistake, not a lifetime


def _positive_hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of hours, got {text!r}") from None
    if not 0 < hours <= _MAX_TTL_HOURS:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a positive number of hours up to {_MAX_TTL_HOURS}, got {text!r}")
    return hours


def _int_between(low: int, high: int, what: str) -> Any:
    """An argparse type: an integer from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"must be {what} from {low} to {high}, got {n}")
        return n

    return parse


_NETWORK_DEADLINE = 10.0  # seconds for a provider's whole answer


def _reachable(base_url: str) -> tuple[str, str]:
    """Whether a provider's OpenAI-compatible API answers at ``base_url``: its ``/models`` within
    the deadline, whole. 401/403 are answers (the key is the provider check's business); 404
    says the base URL is wrong; anything else, or no answer in time, fails."""
    outcome: list[tuple[str, str]] = []
    started = time.monotonic()

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(base_url.rstrip("/") + "/models", method="GET"), timeout=5) as r:  # noqa: S310
                r.read()
            outcome.append(("ok", f"{base_url}: answered in {(time.monotonic() - started) * 1000:.0f} ms"))
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                outcome.append(("ok", f"{base_url}: answered {e.code} (it wants a key) in {(time.monotonic() - started) * 1000:.0f} ms"))
            elif e.code == 404:
                outcome.append(("fail", f"{base_url}: answered 404 for /models: is base_url the API root (…/v1)?"))
            else:
                outcome.append(("fail", f"{base_url}: answered {e.code}"))
        except (OSError, ValueError) as e:
            outcome.append(("fail", f"{base_url}: no answer ({e})"))

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(_NETWORK_DEADLINE)
    return outcome[0] if outcome else ("fail", f"{base_url}: no whole answer within {_NETWORK_DEADLINE:.0f} s")


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


class Cli:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        db = args.db or os.environ.get("AEX_DB") or str(default_home() / "aex.db")
        # A PostgreSQL URL for a fleet, or a SQLite file (then its directory is aex's home).
        self.url: Optional[str] = db if is_database_url(db) else None
        self.target = db
        self.db = Path(db) if self.url is None else default_home() / "aex.db"
        self.shown = shown(db)
        config = args.config or os.environ.get("AEX_CONFIG")
        beside = self.db.parent / "models.yaml"
        self.config: Optional[Path] = Path(config) if config else (beside if beside.exists() else None)

    def kernel(self) -> Kernel:
        if self.url is None:
            make_private_dir(self.db.parent)
        k = Kernel(self.target, config=str(self.config) if self.config else None)
        for warning in self.warnings(k):
            print(f"aex: warning: {warning}", file=sys.stderr)
        return k

    def warnings(self, k: Kernel) -> list[str]:
        """The kernel's warnings about its files, and aex's home directory if others can enter it."""
        out = list(k.warnings())
        home = self.db.parent
        if self.url is None and home.resolve() == default_home().resolve():
            mode = home.stat().st_mode & 0o777
            if mode & 0o077:
                out.append(f"{home} is accessible by other users (mode {mode:04o}): run chmod 700 on it")
        return out

    def out(self, data: Any, text: str) -> None:
        print(json.dumps(data, indent=2, sort_keys=True) if self.args.json else text)

    # ---- commands --------------------------------------------------------------------------

    def doctor(self) -> int:
        """One line per check; exit 1 when one fails (a warning does not)."""
        checks: list[dict[str, str]] = []

        def check(name: str, status: str, detail: str) -> None:
            checks.append({"check": name, "status": status, "detail": detail})

        config: Optional[dict[str, Any]] = None
        if self.config is None:
            check("config", "warn", "no models.yaml: aex runs with no models configured (aex init writes one)")
        else:
            try:
                config = check_config(str(self.config))
                check("config", "ok", f"{self.config}: valid, {len(config['models'])} models, sha256 {config['hash'][:12]}")
            except AexError as e:
                check("config", "fail", f"{self.config}: {e.message}")
        started = time.monotonic()
        k: Optional[Kernel] = None
        if self.url is None and not self.db.exists():
            # Looking must not create: a mistyped --db would otherwise pass as a new, empty database.
            check("database", "fail", f"no database at {self.db} (aex init creates one)")
        else:
            try:
                k = Kernel(self.target, config=str(self.config) if config is not None and self.config else None)
            except AexError as e:
                check("database", "fail", f"{self.shown}: {e.message}")
                if e.status == 503:
                    check("lock", "fail", f"gave up after {time.monotonic() - started:.1f} s: another process holds the database")
        opened = time.monotonic() - started
        if k is not None:
            config = k.models()
            check("database", "ok", f"{self.shown}: schema version {k.schema_version()}, opened in {opened * 1000:.0f} ms")
            if opened > 1.0:
                check("lock", "warn", f"opening waited {opened:.1f} s for the database: another process holds it for long")
            else:
                check("lock", "ok", "the database is not held for long")
            problems = self.warnings(k)
            check("permissions", "fail" if problems else "ok", "; ".join(problems) or "files and directory private to their owner")
            report = k.audit()
            if report["clean"]:
                check("audit", "ok", f"clean: {report['events']} events, head {report['head']}")
            else:
                check("audit", "fail", f"{report['failure']['rule']}: {report['failure']['message']}")
            wal = Path(str(self.db) + "-wal")
            size = wal.stat().st_size if self.url is None and wal.exists() else 0
            if self.url is None:
                check("wal", "warn" if size > 64 << 20 else "ok", f"{size / (1 << 20):.1f} MiB" + (": a long-lived reader may be starving checkpoints" if size > 64 << 20 else ""))
        if config is not None:
            passthrough = k is not None and any(a["allow_passthrough"] for a in k.list_agents())
            for name, p in sorted(config.get("providers", {}).items()):
                var = p["api_key_env"]
                if var is None:
                    check(f"provider {name}", "ok", f"{p['base_url']}: no key needed")
                elif os.environ.get(var):
                    check(f"provider {name}", "ok", f"{p['base_url']}: key in ${var}")
                elif passthrough:
                    check(f"provider {name}", "ok", f"${var} unset: bring-your-own-key (agents allowed passthrough send their own)")
                else:
                    check(f"provider {name}", "fail", f"${var} is unset and no agent may bring its own key: nothing can call it")
            unpriced = sorted(n for n, m in config["models"].items() if not m["input_micro_per_mtok"] and not m["output_micro_per_mtok"])
            check("prices", "warn" if unpriced else "ok", ("free (no prices): " + ", ".join(unpriced)) if unpriced else "every model is priced")
            if self.args.network:
                for name, p in sorted(config.get("providers", {}).items()):
                    check(f"network {name}", *_reachable(p["base_url"]))
        failed = any(c["status"] == "fail" for c in checks)
        width = max(len(c["check"]) for c in checks)
        self.out({"ok": not failed, "checks": checks}, "\n".join(f"{c['status']:<5} {c['check']:<{width}}  {c['detail']}" for c in checks))
        return 1 if failed else 0

    def serve(self) -> int:
        a = self.args
        admin_token = None
        if a.admin_token_env:
            admin_token = os.environ.get(a.admin_token_env)
            if not admin_token:
                raise AexError(f"admin token: the variable {a.admin_token_env} is not set", status=400, reason="invalid_request")
        k = self.kernel()

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt  # SIGTERM stops it like Ctrl-C: gracefully

        signal.signal(signal.SIGTERM, stop)

        def ready(url: str) -> None:
            print(f"aex serve: listening on {url} (database {self.shown})", flush=True)

        try:
            k.serve(a.host, a.port, admin_token=admin_token, config_path=str(self.config) if self.config else None, ready=ready)
        except KeyboardInterrupt:
            print("aex serve: stopped", flush=True)
        return 0

    def init(self) -> int:
        home = self.db.parent
        make_private_dir(home)
        models = self.config or home / "models.yaml"
        wrote = False
        if not models.exists() or self.args.force:
            # Private from the first byte: a config decides where prompts and keys go.
            fd = os.open(models, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(Path(__file__).with_name("default_models.yaml").read_bytes())
            wrote = True
        self.config = models
        k = self.kernel()
        data = {"db": self.shown, "config": str(models), "config_written": wrote, "models": len(k.models()["models"])}
        self.out(data, f"database  {self.shown}\nconfig    {models}{' (written)' if wrote else ' (kept)'}\nmodels    {data['models']}")
        return 0

    def agent_create(self) -> int:
        a = self.args
        k = self.kernel()
        token = k.create_agent(
            a.name,
            a.budget_usd,
            rpm=a.rpm,
            tpm=a.tpm,
            allowed_models=[m for m in (a.allowed_models or "").split(",") if m],
            tools=not a.no_tools,
            streaming=not a.no_streaming,
            vision=not a.no_vision,
            strict=a.strict,
            ttl_ms=_hours_to_ms(a.ttl),
            scope=a.scope,
            allow_passthrough=a.allow_passthrough,
            max_concurrent=a.max_concurrent,
            budget_period=a.budget_period,
            team=a.parent,
        )
        agent = k.agent(a.name)
        self.out(
            {"agent": agent, "token": token},
            f"created agent {a.name} with budget {_usd(agent['budget_micro'])}\n"
            f"token: {token}\n(shown once: aex stores only its hash)",
        )
        return 0

    def agent_list(self) -> int:
        agents = self.kernel().list_agents()
        rows = [
            [a["name"], _usd(a["budget_micro"]), _usd(a["spent_micro"]), _usd(a["reserved_micro"]), _usd(a["remaining_micro"]),
             str(a["rpm"] or "-"), a["scope"], "disabled" if a["disabled"] else "active", a["token_prefix"] + "…"]
            for a in agents
        ]
        headers = ["NAME", "BUDGET", "SPENT", "RESERVED", "REMAINING", "RPM", "SCOPE", "STATE", "TOKEN"]
        self.out(agents, _table(rows, headers) if rows else "no agents")
        return 0

    def agent_inspect(self) -> int:
        a = self.kernel().agent(self.args.name)
        lines = [f"{k:<18} {v}" for k, v in sorted(a.items())]
        self.out(a, "\n".join(lines))
        return 0

    def agent_delete(self) -> int:
        self.kernel().delete_agent(self.args.name)
        self.out({"deleted": self.args.name}, f"deleted agent {self.args.name}")
        return 0

    def agent_rotate(self) -> int:
        token = self.kernel().rotate_token(self.args.name, ttl_ms=_hours_to_ms(self.args.ttl))
        self.out({"agent": self.args.name, "token": token}, f"new token for {self.args.name}: {token}\n(the old one no longer works)")
        return 0

    def agent_set_budget(self) -> int:
        a = self.kernel().set_budget(self.args.name, self.args.budget_usd)
        self.out(a, f"{a['name']}: budget {_usd(a['budget_micro'])}, remaining {_usd(a['remaining_micro'])}")
        return 0

    def team_create(self) -> int:
        t = self.kernel().create_team(self.args.name, self.args.budget_usd, parent=self.args.parent)
        self.out(t, f"created team {t['name']} with budget {_usd(t['budget_micro'])}")
        return 0

    def team_list(self) -> int:
        teams = self.kernel().list_teams()
        rows = [[t["name"], t["parent"] or "-", _usd(t["budget_micro"]), _usd(t["spent_micro"]), _usd(t["reserved_micro"]), _usd(t["remaining_micro"])] for t in teams]
        self.out(teams, _table(rows, ["TEAM", "PARENT", "BUDGET", "SPENT", "RESERVED", "REMAINING"]) if rows else "no teams")
        return 0

    def audit(self) -> int:
        r = self.kernel().audit(self.args.anchor)
        if r["clean"]:
            text = f"audit: clean — {r['events']} events ({r['mode']}), {r['agents']} agents, {r['executions']} executions, head {r['head']}"
        else:
            f = r["failure"]
            where = f" at seq {f['seq']}" if f["seq"] is not None else ""
            who = f" ({f['agent']})" if f["agent"] else ""
            text = f"audit: FAILED — {f['rule']}{where}{who}: {f['message']}"
        self.out(r, text)
        return 0 if r["clean"] else 1

    def metrics(self) -> int:
        k = self.kernel()
        last_hour = k.spend_in_window(_HOUR_MS)
        data = []
        for a in k.list_agents():
            burn = last_hour.get(a["name"], 0)
            exhaustion = (a["remaining_micro"] / burn) if burn > 0 and a["remaining_micro"] > 0 else None
            data.append({
                "agent": a["name"], "budget_micro": a["budget_micro"], "spent_micro": a["spent_micro"],
                "reserved_micro": a["reserved_micro"], "remaining_micro": a["remaining_micro"],
                "burn_micro_per_hour": burn, "hours_to_exhaustion": exhaustion,
            })
        rows = [
            [d["agent"], _usd(d["budget_micro"]), _usd(d["spent_micro"]), _usd(d["reserved_micro"]), _usd(d["remaining_micro"]),
             _usd(d["burn_micro_per_hour"]) + "/h", "-" if d["hours_to_exhaustion"] is None else f"{d['hours_to_exhaustion']:.1f} h"]
            for d in data
        ]
        headers = ["AGENT", "BUDGET", "SPENT", "RESERVED", "REMAINING", "BURN (1h)", "EXHAUSTED IN"]
        self.out(data, _table(rows, headers) if rows else "no agents")
        return 0

    def status(self) -> int:
        k = self.kernel()
        data = {
            "version": __version__, "db": self.shown, "config": str(self.config) if self.config else None,
            "config_hash": k.config_hash(), "models": len(k.models()["models"]), "head": k.head(),
            "agents": len(k.list_agents()), "teams": len(k.list_teams()),
        }
        lines = [f"{key:<12} {'-' if v is None else v}" for key, v in data.items()]
        self.out(data, "\n".join(lines))
        return 0

    def models_check(self) -> int:
        path = self.args.path or self.config
        if path is None:
            raise AexError("no models.yaml: pass a PATH or --config", status=400, reason="invalid_request")
        c = check_config(str(path))
        rows = [[name, m["provider"] or "-", _usd(m["input_micro_per_mtok"]), _usd(m["output_micro_per_mtok"]), str(m["max_output_tokens"])] for name, m in sorted(c["models"].items())]
        self.out(c, f"{path}: valid, {len(rows)} models, sha256 {c['hash']}\n" + _table(rows, ["MODEL", "PROVIDER", "IN /1M", "OUT /1M", "MAX OUT"]))
        return 0

    def models_reload(self) -> int:
        path = self.args.path or self.config
        if path is None:
            raise AexError("no models.yaml: pass a PATH or --config", status=400, reason="invalid_request")
        self.config = None
        k = self.kernel()
        k.reload_config(str(path))
        self.out({"config": str(path), "hash": k.config_hash()}, f"reloaded {path} (sha256 {k.config_hash()}); recorded in the ledger")
        return 0

    def version(self) -> int:
        self.out({"version": __version__}, f"aex {__version__}")
        return 0

    def ledger_tail(self) -> int:
        k = self.kernel()
        head = k.head()
        last = int(head.split(":")[0]) if head else 0
        events = k.events(max(1, last - self.args.n + 1), self.args.n) if last else []
        rows = [[str(e["seq"]), _ts(e["ts_ms"]), e["kind"], e["agent"] or "-", e["execution_id"] or "-", str(e["amount_micro"])] for e in events]
        self.out(events, _table(rows, ["SEQ", "TIME", "KIND", "AGENT", "EXECUTION", "AMOUNT µ$"]) if head else "empty ledger")
        return 0

    def ledger_export(self) -> int:
        k = self.kernel()
        seq = self.args.from_seq
        while True:
            page = k.events(seq, 1000)
            for e in page:
                print(json.dumps(e, sort_keys=True))
            if len(page) < 1000:
                return 0
            seq = page[-1]["seq"] + 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aex", description="Operate aex: agents, budgets, the ledger.")
    p.add_argument("--db", help="database file, or a postgresql:// URL for a fleet (default: $AEX_DB or ~/.aex/aex.db)")
    p.add_argument("--config", help="models.yaml (default: $AEX_CONFIG or models.yaml beside the database)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create the database and a default models.yaml")
    init.add_argument("--force", action="store_true", help="overwrite an existing models.yaml")
    init.set_defaults(run=Cli.init)

    agent = sub.add_parser("agent", help="manage agents").add_subparsers(dest="agent_command", required=True)
    c = agent.add_parser("create", help="create an agent and print its token once")
    c.add_argument("name")
    c.add_argument("budget_usd", help="budget in USD, e.g. 5.00")
    c.add_argument("rpm", type=_int_between(1, 2**32 - 1, "a number of requests per minute"), help="requests per minute (at least 1)")
    c.add_argument("--tpm", type=int, help="tokens per minute")
    c.add_argument("--allowed-models", help="comma-separated models (default: any configured)")
    c.add_argument("--no-tools", action="store_true")
    c.add_argument("--no-streaming", action="store_true")
    c.add_argument("--no-vision", action="store_true")
    c.add_argument("--strict", action="store_true", help="deny calls whose cost cannot be bounded")
    c.add_argument("--ttl", type=_positive_hours, help="token lifetime in hours")
    c.add_argument("--scope", choices=["execution", "read-only"], default="execution")
    c.add_argument("--allow-passthrough", action="store_true")
    c.add_argument("--parent", help="team whose budget the agent also draws from")
    c.add_argument("--max-concurrent", type=int)
    c.add_argument("--budget-period", choices=["never", "day", "week", "month"], default="never")
    c.set_defaults(run=Cli.agent_create)
    agent.add_parser("list", help="list agents").set_defaults(run=Cli.agent_list)
    for name, run, help_text in [("inspect", Cli.agent_inspect, "show one agent"), ("delete", Cli.agent_delete, "delete an agent")]:
        s = agent.add_parser(name, help=help_text)
        s.add_argument("name")
        s.set_defaults(run=run)
    r = agent.add_parser("rotate-token", help="replace an agent's token")
    r.add_argument("name")
    r.add_argument("--ttl", type=_positive_hours, help="new token lifetime in hours")
    r.set_defaults(run=Cli.agent_rotate)
    b = agent.add_parser("set-budget", help="set an agent's budget")
    b.add_argument("name")
    b.add_argument("budget_usd")
    b.set_defaults(run=Cli.agent_set_budget)

    team = sub.add_parser("team", help="manage team budgets").add_subparsers(dest="team_command", required=True)
    t = team.add_parser("create", help="create a team budget")
    t.add_argument("name")
    t.add_argument("budget_usd")
    t.add_argument("--parent")
    t.set_defaults(run=Cli.team_create)
    team.add_parser("list", help="list teams").set_defaults(run=Cli.team_list)

    a = sub.add_parser("audit", help="verify the ledger and the counters")
    a.add_argument("--anchor", help="SEQ:HASH of a head kept elsewhere")
    a.set_defaults(run=Cli.audit)
    sub.add_parser("metrics", help="spend, burn rate and time to exhaustion per agent").set_defaults(run=Cli.metrics)
    sub.add_parser("status", help="database, config and ledger head").set_defaults(run=Cli.status)

    models = sub.add_parser("models", help="the models config").add_subparsers(dest="models_command", required=True)
    for name, run, help_text in [("check", Cli.models_check, "validate a models.yaml"), ("reload", Cli.models_reload, "load a models.yaml and record it in the ledger")]:
        m = models.add_parser(name, help=help_text)
        m.add_argument("path", nargs="?")
        m.set_defaults(run=run)

    doctor = sub.add_parser("doctor", help="check the config, keys, database, audit and files; exit 1 if a check fails")
    doctor.add_argument("--network", action="store_true", help="also check that every provider answers")
    doctor.set_defaults(run=Cli.doctor)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible gateway: OPENAI_BASE_URL=http://HOST:PORT/v1, API key = agent token")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_int_between(0, 65535, "a port"), default=9000, help="port (default 9000; 0: any free port)")
    serve.add_argument("--admin-token-env", metavar="VAR", help="environment variable holding the admin token (required beyond loopback)")
    serve.set_defaults(run=Cli.serve)
    sub.add_parser("version", help="print the version").set_defaults(run=Cli.version)
    ledger = sub.add_parser("ledger", help="read the ledger").add_subparsers(dest="ledger_command", required=True)
    lt = ledger.add_parser("tail", help="the newest events")
    lt.add_argument("-n", type=_int_between(1, 100_000, "a number of events"), default=20)
    lt.set_defaults(run=Cli.ledger_tail)
    le = ledger.add_parser("export", help="every event as JSON lines")
    le.add_argument("--from", dest="from_seq", type=_int_between(1, 2**63 - 1, "a ledger sequence number"), default=1)
    le.set_defaults(run=Cli.ledger_export)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(Cli(args)))
    except AexError as e:
        if args.json:  # scripts read the error where they read the answer
            error = {"status": e.status, "reason": e.reason, "message": e.message, "field": getattr(e, "field", None)}
            print(json.dumps({"error": error}, sort_keys=True))
        else:
            print(f"aex: error: {e.message} [{e.status} {e.reason}]", file=sys.stderr)
        return 1
    except OSError as e:
        if args.json:
            print(json.dumps({"error": {"status": 503, "reason": "io_error", "message": str(e), "field": None}}, sort_keys=True))
        else:
            print(f"aex: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
