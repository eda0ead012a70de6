/* A host that links the system's libsqlite3 beside libaex, as many C and C++ programs do, and
 * opens the same database with it while aex is working: the system copy reads, writes and closes
 * in the middle of the workload; then the process is killed. Reopened, every agent that aex
 * acknowledged is there and the audit is clean.
 *
 *   two_sqlites work DIR   -- the workload; ends by SIGKILL to itself
 *   two_sqlites check DIR  -- a fresh process: counts the agents and audits
 */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sqlite3.h>

#include "aex.h"

#define AGENTS 20

static void die(const char *what, aex_status s, aex_error *err) {
    fprintf(stderr, "two-sqlites: %s failed: %s: %s\n", what, aex_status_name(s), err ? aex_error_message(err) : "");
    exit(1);
}

static aex_kernel *open_kernel(const char *db) {
    aex_options *opts = aex_options_new();
    aex_error *err = NULL;
    aex_kernel *k = NULL;
    aex_status s = aex_options_set_durability(opts, "full", &err);
    if (s != AEX_OK) die("set_durability", s, err);
    s = aex_kernel_open(db, opts, &k, &err);
    if (s != AEX_OK) die("open", s, err);
    aex_options_free(opts);
    return k;
}

static void create(aex_kernel *k, int i) {
    char spec[128];
    char *token = NULL;
    aex_error *err = NULL;
    snprintf(spec, sizeof spec, "{\"name\": \"agent-%d\", \"budget_usd\": \"1.00\"}", i);
    aex_status s = aex_kernel_create_agent(k, spec, &token, &err);
    if (s != AEX_OK) die("create_agent", s, err);
    aex_string_free(token);
}

static void system_sqlite_visit(const char *db) {
    sqlite3 *c = NULL;
    sqlite3_stmt *st = NULL;
    if (sqlite3_open(db, &c) != SQLITE_OK) { fprintf(stderr, "two-sqlites: sqlite3_open failed\n"); exit(1); }
    sqlite3_busy_timeout(c, 10000);
    if (sqlite3_prepare_v2(c, "SELECT count(*) FROM agents", -1, &st, NULL) != SQLITE_OK || sqlite3_step(st) != SQLITE_ROW) {
        fprintf(stderr, "two-sqlites: system sqlite read failed: %s\n", sqlite3_errmsg(c));
        exit(1);
    }
    sqlite3_finalize(st);
    if (sqlite3_exec(c, "CREATE TABLE IF NOT EXISTS notebook (note TEXT); INSERT INTO notebook VALUES ('x');", NULL, NULL, NULL) != SQLITE_OK) {
        fprintf(stderr, "two-sqlites: system sqlite write failed: %s\n", sqlite3_errmsg(c));
        exit(1);
    }
    sqlite3_close(c);
}

int main(int argc, char **argv) {
    char db[4096];
    if (argc != 3) { fprintf(stderr, "usage: two_sqlites work|check DIR\n"); return 2; }
    snprintf(db, sizeof db, "%s/aex.db", argv[2]);
    if (strcmp(argv[1], "work") == 0) {
        aex_kernel *k = open_kernel(db);
        create(k, 0);
        system_sqlite_visit(db);
        for (int i = 1; i < AGENTS; i++) create(k, i);
        /* Every creation above returned AEX_OK under `full`: now crash without closing. */
        kill(getpid(), SIGKILL);
        return 1;
    }
    aex_kernel *k = open_kernel(db);
    aex_error *err = NULL;
    char *json = NULL;
    int found = 0;
    for (int i = 0; i < AGENTS; i++) {
        char name[32];
        snprintf(name, sizeof name, "agent-%d", i);
        if (aex_kernel_agent(k, name, &json, &err) == AEX_OK) { found++; aex_string_free(json); }
        else { aex_error_free(err); err = NULL; }
    }
    aex_status s = aex_kernel_audit(k, NULL, &json, &err);
    if (s != AEX_OK) die("audit", s, err);
    int clean = strstr(json, "\"clean\":true") != NULL;
    if (found != AGENTS || !clean) {
        fprintf(stderr, "two-sqlites: %d of %d acknowledged agents survived; audit %s\n", found, AGENTS, json);
        return 1;
    }
    aex_string_free(json);
    aex_kernel_free(k);
    printf("two-sqlites: 1 passed, 0 failed\n");
    return 0;
}
