/*
 * Runs every shared scenario vector (the JSON files in tests/vectors) through libaex. The Rust and Python
 * suites run the same files; the three must agree exactly.
 *
 * Usage: vectors FILE.json...
 */
#define _POSIX_C_SOURCE 200809L
#include "aex.h"
#include "check.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NAMES 64

struct names {
  char *key[MAX_NAMES];
  char *value[MAX_NAMES];
  int n;
};

static void remember(struct names *m, const char *key, const char *value) {
  if (!key || m->n == MAX_NAMES) return;
  m->key[m->n] = strdup(key);
  m->value[m->n] = strdup(value);
  m->n++;
}

/* The remembered value under `key`, or `key` itself (a literal). */
static const char *lookup(const struct names *m, const char *key) {
  for (int i = m->n - 1; i >= 0; i--)
    if (strcmp(m->key[i], key) == 0) return m->value[i];
  return key;
}

static char *read_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  size_t got = fread(buf, 1, (size_t)n, f);
  buf[got] = '\0';
  fclose(f);
  return buf;
}

static const char *str(const cJSON *step, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(step, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int64_t num(const cJSON *step, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(step, key);
  return cJSON_IsNumber(v) ? (int64_t)v->valuedouble : 0;
}

static const char *state_name(aex_execution_state s) {
  switch (s) {
    case AEX_EXECUTION_STATE_RESERVED: return "RESERVED";
    case AEX_EXECUTION_STATE_DISPATCHED: return "DISPATCHED";
    case AEX_EXECUTION_STATE_COMMITTED: return "COMMITTED";
    case AEX_EXECUTION_STATE_RELEASED: return "RELEASED";
    case AEX_EXECUTION_STATE_FAILED: return "FAILED";
  }
  return "?";
}

/* The result object of a failed call: status, reason, message and the denial's data. */
static cJSON *error_result(aex_status status, aex_error *err) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddNumberToObject(r, "status", status);
  cJSON_AddStringToObject(r, "reason", aex_error_reason(err));
  cJSON_AddStringToObject(r, "message", aex_error_message(err));
  if (status == AEX_INSUFFICIENT_BUDGET) {
    cJSON_AddNumberToObject(r, "needed_micro", (double)aex_error_needed_micro(err));
    cJSON_AddNumberToObject(r, "remaining_micro", (double)aex_error_remaining_micro(err));
    if (aex_error_team(err)) cJSON_AddStringToObject(r, "team", aex_error_team(err));
    else cJSON_AddNullToObject(r, "team");
  }
  if (status == AEX_RATE_LIMITED) {
    cJSON_AddNumberToObject(r, "retry_after_ms", (double)aex_error_retry_after_ms(err));
    cJSON_AddNumberToObject(r, "limit", (double)aex_error_limit(err));
  }
  if (aex_error_field(err)) cJSON_AddStringToObject(r, "field", aex_error_field(err));
  aex_error_free(err);
  return r;
}

/* A success whose payload is JSON text from aex (consumed). */
static cJSON *json_result(char *json) {
  cJSON *r = json ? cJSON_Parse(json) : cJSON_CreateObject();
  aex_string_free(json);
  cJSON_AddNumberToObject(r, "status", 0);
  return r;
}

static cJSON *settlement_result(const aex_settlement *s) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddNumberToObject(r, "status", 0);
  cJSON_AddStringToObject(r, "state", state_name(s->state));
  cJSON_AddNumberToObject(r, "reserved_micro", (double)s->reserved_micro);
  cJSON_AddNumberToObject(r, "cost_micro", (double)s->cost_micro);
  cJSON_AddNumberToObject(r, "released_micro", (double)s->released_micro);
  cJSON_AddNumberToObject(r, "overrun_micro", (double)s->overrun_micro);
  cJSON_AddBoolToObject(r, "expired", s->expired);
  cJSON_AddBoolToObject(r, "replayed", s->replayed);
  return r;
}

static cJSON *run_step(aex_kernel *k, const cJSON *step, struct names *names) {
  const char *op = str(step, "op");
  aex_error *err = NULL;
  aex_status st = AEX_OK;
  if (strcmp(op, "create_agent") == 0) {
    char *spec = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(step, "spec"));
    char *token = NULL;
    st = aex_kernel_create_agent(k, spec, &token, &err);
    free(spec);
    if (st != AEX_OK) return error_result(st, err);
    remember(names, str(step, "as"), token);
    aex_string_free(token);
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(step, "spec"), "name");
    char *json = NULL;
    aex_kernel_agent(k, name->valuestring, &json, NULL);
    return json_result(json);
  }
  if (strcmp(op, "create_team") == 0) {
    st = aex_kernel_create_team(k, str(step, "name"), num(step, "budget_micro"), str(step, "parent"), &err);
    if (st != AEX_OK) return error_result(st, err);
    char *json = NULL;
    aex_kernel_team(k, str(step, "name"), &json, NULL);
    return json_result(json);
  }
  if (strcmp(op, "admit") == 0) {
    char *req = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(step, "request"));
    aex_admission *adm = NULL;
    st = aex_kernel_admit(k, lookup(names, str(step, "token")), req, &adm, &err);
    free(req);
    if (st != AEX_OK) return error_result(st, err);
    remember(names, str(step, "as"), aex_admission_execution_id(adm));
    cJSON *r = cJSON_CreateObject();
    cJSON_AddNumberToObject(r, "status", 0);
    cJSON_AddStringToObject(r, "execution_id", aex_admission_execution_id(adm));
    cJSON_AddNumberToObject(r, "reserved_micro", (double)aex_admission_reserved_micro(adm));
    cJSON_AddNumberToObject(r, "input_tokens", (double)aex_admission_input_tokens(adm));
    cJSON_AddNumberToObject(r, "max_output_tokens", (double)aex_admission_max_output_tokens(adm));
    cJSON_AddNumberToObject(r, "expires_at_ms", (double)aex_admission_expires_at_ms(adm));
    cJSON_AddBoolToObject(r, "replayed", aex_admission_replayed(adm));
    cJSON_AddStringToObject(r, "state", state_name(aex_admission_state(adm)));
    aex_admission_free(adm);
    return r;
  }
  if (strcmp(op, "dispatch") == 0) {
    st = aex_kernel_mark_dispatched(k, lookup(names, str(step, "execution")), &err);
    if (st != AEX_OK) return error_result(st, err);
    cJSON *r = cJSON_CreateObject();
    cJSON_AddNumberToObject(r, "status", 0);
    cJSON_AddStringToObject(r, "state", "DISPATCHED");
    return r;
  }
  if (strcmp(op, "commit") == 0 || strcmp(op, "release") == 0 || strcmp(op, "fail") == 0) {
    const char *id = lookup(names, str(step, "execution"));
    aex_settlement s;
    if (op[0] == 'c') {
      const cJSON *u = cJSON_GetObjectItemCaseSensitive(step, "usage");
      aex_usage usage = {num(u, "input_tokens"), num(u, "output_tokens"), num(u, "cached_input_tokens")};
      st = aex_kernel_commit(k, id, &usage, &s, &err);
    } else if (op[0] == 'r') {
      st = aex_kernel_release(k, id, str(step, "reason"), &s, &err);
    } else {
      st = aex_kernel_fail(k, id, str(step, "error"), &s, &err);
    }
    return st == AEX_OK ? settlement_result(&s) : error_result(st, err);
  }
  if (strcmp(op, "set_budget") == 0 || strcmp(op, "disable") == 0 || strcmp(op, "enable") == 0) {
    const char *agent = str(step, "agent");
    if (op[0] == 's') st = aex_kernel_set_budget(k, agent, num(step, "budget_micro"), &err);
    else st = aex_kernel_set_disabled(k, agent, op[0] == 'd', &err);
    if (st != AEX_OK) return error_result(st, err);
    char *json = NULL;
    aex_kernel_agent(k, agent, &json, NULL);
    return json_result(json);
  }
  if (strcmp(op, "delete_agent") == 0) {
    st = aex_kernel_delete_agent(k, str(step, "agent"), &err);
    return st == AEX_OK ? json_result(NULL) : error_result(st, err);
  }
  if (strcmp(op, "rotate_token") == 0) {
    char *token = NULL;
    st = aex_kernel_rotate_token(k, str(step, "agent"), num(step, "ttl_ms"), &token, &err);
    if (st != AEX_OK) return error_result(st, err);
    remember(names, str(step, "as"), token);
    aex_string_free(token);
    return json_result(NULL);
  }
  if (strcmp(op, "inspect") == 0 || strcmp(op, "inspect_team") == 0) {
    char *json = NULL;
    st = op[7] == '_' ? aex_kernel_team(k, str(step, "team"), &json, &err) : aex_kernel_agent(k, str(step, "agent"), &json, &err);
    return st == AEX_OK ? json_result(json) : error_result(st, err);
  }
  if (strcmp(op, "advance") == 0) {
    st = aex_kernel_advance_clock(k, num(step, "ms"), &err);
    return st == AEX_OK ? json_result(NULL) : error_result(st, err);
  }
  if (strcmp(op, "audit") == 0) {
    char *json = NULL;
    st = aex_kernel_audit(k, NULL, &json, &err);
    return st == AEX_OK ? json_result(json) : error_result(st, err);
  }
  fprintf(stderr, "unknown op %s\n", op);
  return NULL;
}

/* Runs one vector on a kernel opened at `where`: ":memory:", or a database URL. */
static void run_vector(const char *path, const char *where) {
  char *text = read_file(path);
  cJSON *v = text ? cJSON_Parse(text) : NULL;
  free(text);
  CHECK(v != NULL);
  if (!v) return;
  aex_options *opts = aex_options_new();
  CHECK_STATUS(aex_options_set_config_yaml(opts, str(v, "models_yaml"), NULL), AEX_OK);
  CHECK_STATUS(aex_options_set_manual_clock(opts, num(v, "start_ms"), NULL), AEX_OK);
  if (cJSON_GetObjectItemCaseSensitive(v, "reservation_ttl_ms"))
    CHECK_STATUS(aex_options_set_reservation_ttl_ms(opts, num(v, "reservation_ttl_ms"), NULL), AEX_OK);
  aex_kernel *k = NULL;
  CHECK_STATUS(aex_kernel_open(where, opts, &k, NULL), AEX_OK);
  aex_options_free(opts);
  if (!k) {
    fprintf(stderr, "  %s: no kernel at %s\n", path, where);
    cJSON_Delete(v);
    return;
  }
  struct names names = {0};
  int i = 0;
  const cJSON *step;
  cJSON_ArrayForEach(step, cJSON_GetObjectItemCaseSensitive(v, "steps")) {
    cJSON *result = run_step(k, step, &names);
    CHECK(result != NULL);
    const cJSON *expect = cJSON_GetObjectItemCaseSensitive(step, "expect");
    cJSON *want = expect ? cJSON_Duplicate(expect, 1) : cJSON_CreateObject();
    if (!cJSON_GetObjectItemCaseSensitive(want, "status")) cJSON_AddNumberToObject(want, "status", 0);
    const cJSON *item;
    cJSON_ArrayForEach(item, want) {
      const cJSON *got = result ? cJSON_GetObjectItemCaseSensitive(result, item->string) : NULL;
      int same = got != NULL && cJSON_Compare(got, item, 1);
      CHECK(same);
      if (!same) {
        char *g = result ? cJSON_PrintUnformatted(result) : NULL;
        fprintf(stderr, "  %s step %d (%s): '%s' differs; result %s\n", path, i, str(step, "op"), item->string, g ? g : "(none)");
        free(g);
      }
    }
    cJSON_Delete(want);
    cJSON_Delete(result);
    i++;
  }
  for (int n = 0; n < names.n; n++) {
    free(names.key[n]);
    free(names.value[n]);
  }
  aex_kernel_free(k);
  cJSON_Delete(v);
}

/* With AEX_TEST_POSTGRES_DBS (one empty database URL per vector, separated by spaces), each
   vector runs on its own PostgreSQL database instead of in memory: the fleet store through the
   C API. */
int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s FILE.json...\n", argv[0]);
    return 2;
  }
  const char *dbs = getenv("AEX_TEST_POSTGRES_DBS");
  char *list = dbs ? malloc(strlen(dbs) + 1) : NULL;
  char *next = NULL;
  if (list) {
    strcpy(list, dbs);
    next = strtok(list, " ");
  }
  for (int i = 1; i < argc; i++) {
    CHECK(!list || next != NULL);
    if (list && !next) break;
    run_vector(argv[i], list ? next : ":memory:");
    if (list) next = strtok(NULL, " ");
  }
  free(list);
  CHECK(argc - 1 >= 5);
  return check_summary(dbs ? "c-vectors-postgres" : "c-vectors");
}
