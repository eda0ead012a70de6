/*
 * The C test host: the whole lifecycle through libaex, every kind of bad input, and eight
 * pthreads racing on one agent through one shared kernel handle.
 *
 * Usage: host DIR   (DIR is an empty, writable directory for the database)
 */
#define _POSIX_C_SOURCE 200809L
#include "aex.h"
#include "check.h"

#include <pthread.h>
#include <stdlib.h>

static const char *MODELS =
    "models:\n"
    "  mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 1000}\n";
static const char *REQ = "{\"model\": \"mini\", \"input_tokens\": 1000, \"max_output_tokens\": 500}";
static const int64_t PER_CALL = 450; /* micro-USD reserved and committed by REQ */

static char db_path[4096];

static aex_kernel *open_kernel(void) {
  aex_options *opts = aex_options_new();
  aex_error *err = NULL;
  CHECK_STATUS(aex_options_set_config_yaml(opts, MODELS, &err), AEX_OK);
  CHECK_STATUS(aex_options_set_durability(opts, "normal", &err), AEX_OK);
  aex_kernel *k = NULL;
  CHECK_STATUS(aex_kernel_open(db_path, opts, &k, &err), AEX_OK);
  aex_options_free(opts);
  return k;
}

static char *create_agent(aex_kernel *k, const char *spec) {
  char *token = NULL;
  aex_error *err = NULL;
  aex_status s = aex_kernel_create_agent(k, spec, &token, &err);
  if (s != AEX_OK) {
    fprintf(stderr, "create_agent: %s\n", aex_error_message(err));
    aex_error_free(err);
  }
  CHECK(s == AEX_OK && token != NULL && strncmp(token, "aex_", 4) == 0);
  return token;
}

/* The agent's JSON field `key` as an integer (the JSON is aex's own compact output). */
static long long agent_field(aex_kernel *k, const char *name, const char *key) {
  char *json = NULL;
  long long v = -1;
  if (aex_kernel_agent(k, name, &json, NULL) == AEX_OK) {
    char pattern[128];
    snprintf(pattern, sizeof pattern, "\"%s\":", key);
    const char *at = strstr(json, pattern);
    if (at) v = atoll(at + strlen(pattern));
  }
  aex_string_free(json);
  return v;
}

static void test_version(void) {
  CHECK(strcmp(aex_version(), AEX_VERSION_STRING) == 0);
  CHECK(aex_version_number() == AEX_VERSION_MAJOR * 10000u + AEX_VERSION_MINOR * 100u + AEX_VERSION_PATCH);
  CHECK(strcmp(aex_status_name(AEX_INSUFFICIENT_BUDGET), "insufficient_budget") == 0);
  CHECK(strcmp(aex_status_name(AEX_OK), "ok") == 0);
  /* A status from a newer library is named, not guessed. */
  CHECK(strcmp(aex_status_name(418), "unknown") == 0);
}

static void test_lifecycle(aex_kernel *k) {
  char *token = create_agent(k, "{\"name\": \"atlas\", \"budget_micro\": 1000}");
  aex_admission *adm = NULL;
  aex_error *err = NULL;
  CHECK_STATUS(aex_kernel_admit(k, token, REQ, &adm, &err), AEX_OK);
  CHECK(aex_admission_reserved_micro(adm) == PER_CALL);
  CHECK(aex_admission_max_output_tokens(adm) == 500);
  CHECK(aex_admission_state(adm) == AEX_EXECUTION_STATE_RESERVED);
  CHECK(!aex_admission_replayed(adm));
  CHECK(strlen(aex_admission_execution_id(adm)) == 36); /* a UUIDv7 */
  CHECK(agent_field(k, "atlas", "reserved_micro") == PER_CALL);

  CHECK_STATUS(aex_kernel_mark_dispatched(k, aex_admission_execution_id(adm), &err), AEX_OK);
  aex_usage usage = {1000, 200, 0};
  aex_settlement s;
  CHECK_STATUS(aex_kernel_commit(k, aex_admission_execution_id(adm), &usage, &s, &err), AEX_OK);
  CHECK(s.state == AEX_EXECUTION_STATE_COMMITTED && s.cost_micro == 270 && s.released_micro == 180 && !s.replayed);
  CHECK_STATUS(aex_kernel_commit(k, aex_admission_execution_id(adm), &usage, &s, &err), AEX_OK);
  CHECK(s.replayed && s.cost_micro == 270);
  usage.output_tokens = 201;
  CHECK_STATUS(aex_kernel_commit(k, aex_admission_execution_id(adm), &usage, &s, &err), AEX_CONFLICT);
  CHECK(strcmp(aex_error_reason(err), "invalid_transition") == 0);
  aex_error_free(err);
  err = NULL;
  aex_admission_free(adm);

  /* Idempotent replay, then release and fail. */
  const char *job = "{\"model\": \"mini\", \"input_tokens\": 10, \"max_output_tokens\": 10, \"execution_id\": \"job-1\"}";
  CHECK_STATUS(aex_kernel_admit(k, token, job, &adm, NULL), AEX_OK);
  aex_admission_free(adm);
  CHECK_STATUS(aex_kernel_admit(k, token, job, &adm, NULL), AEX_OK);
  CHECK(aex_admission_replayed(adm));
  aex_admission_free(adm);
  CHECK_STATUS(aex_kernel_release(k, "job-1", "cancelled", &s, NULL), AEX_OK);
  CHECK(s.state == AEX_EXECUTION_STATE_RELEASED && s.released_micro == 8);
  CHECK_STATUS(aex_kernel_admit(k, token, REQ, &adm, NULL), AEX_OK);
  CHECK_STATUS(aex_kernel_fail(k, aex_admission_execution_id(adm), NULL, &s, NULL), AEX_OK);
  CHECK(s.state == AEX_EXECUTION_STATE_FAILED);
  aex_admission_free(adm);

  /* 402 with the amounts, and nothing reserved. */
  CHECK_STATUS(aex_kernel_set_budget(k, "atlas", 500, NULL), AEX_OK);
  adm = NULL;
  CHECK_STATUS(aex_kernel_admit(k, token, REQ, &adm, &err), AEX_INSUFFICIENT_BUDGET);
  CHECK(adm == NULL); /* out-params are written only on success */
  CHECK(aex_error_status(err) == AEX_INSUFFICIENT_BUDGET);
  CHECK(strcmp(aex_error_reason(err), "budget_exceeded") == 0);
  CHECK(aex_error_needed_micro(err) == PER_CALL && aex_error_remaining_micro(err) == 230);
  CHECK(aex_error_team(err) == NULL && aex_error_retry_after_ms(err) == -1);
  CHECK(strstr(aex_error_message(err), "needed") != NULL);
  CHECK(strstr(aex_error_message(err), token) == NULL); /* never the token */
  aex_error_free(err);
  err = NULL;
  CHECK(agent_field(k, "atlas", "reserved_micro") == 0);

  /* Rotation revokes the old token at once. */
  char *fresh = NULL;
  CHECK_STATUS(aex_kernel_rotate_token(k, "atlas", 0, &fresh, NULL), AEX_OK);
  CHECK_STATUS(aex_kernel_set_budget(k, "atlas", 1000000, NULL), AEX_OK);
  CHECK_STATUS(aex_kernel_admit(k, token, REQ, &adm, &err), AEX_UNAUTHENTICATED);
  CHECK(strcmp(aex_error_reason(err), "unknown_token") == 0);
  aex_error_free(err);
  err = NULL;
  CHECK_STATUS(aex_kernel_admit(k, fresh, REQ, &adm, NULL), AEX_OK);
  aex_admission_free(adm);

  char *list = NULL;
  CHECK_STATUS(aex_kernel_list_agents(k, &list, NULL), AEX_OK);
  CHECK(strstr(list, "\"name\":\"atlas\"") != NULL && strstr(list, fresh) == NULL);
  aex_string_free(list);
  char *head = NULL;
  CHECK_STATUS(aex_kernel_head(k, &head, NULL), AEX_OK);
  CHECK(head != NULL && strchr(head, ':') != NULL);
  aex_string_free(head);
  CHECK(audit_clean(k));

  CHECK_STATUS(aex_kernel_create_team(k, "org", 1000, NULL, NULL), AEX_OK);
  CHECK_STATUS(aex_kernel_create_team(k, "org", 1000, NULL, &err), AEX_CONFLICT);
  CHECK(strcmp(aex_error_reason(err), "name_taken") == 0);
  aex_error_free(err);
  err = NULL;
  CHECK_STATUS(aex_kernel_delete_agent(k, "atlas", NULL), AEX_OK);
  CHECK_STATUS(aex_kernel_agent(k, "atlas", &list, &err), AEX_NOT_FOUND);
  aex_error_free(err);
  CHECK(audit_clean(k));
  aex_string_free(token);
  aex_string_free(fresh);
}

static void test_bad_input(aex_kernel *k) {
  char *token = create_agent(k, "{\"name\": \"bad-input\", \"budget_micro\": 100000}");
  char *before = NULL;
  CHECK_STATUS(aex_kernel_head(k, &before, NULL), AEX_OK);
  aex_admission *adm = NULL;
  aex_error *err = NULL;
  char *unused = NULL;

#define EXPECT_400(call, field_name)                                                   \
  do {                                                                                 \
    err = NULL;                                                                        \
    CHECK_STATUS(call, AEX_INVALID_REQUEST);                                           \
    CHECK(err != NULL && aex_error_field(err) != NULL &&                              \
          strcmp(aex_error_field(err), field_name) == 0);                              \
    if (err && aex_error_field(err) && strcmp(aex_error_field(err), field_name))       \
      fprintf(stderr, "  field was %s: %s\n", aex_error_field(err), aex_error_message(err)); \
    aex_error_free(err);                                                               \
  } while (0)

  EXPECT_400(aex_kernel_admit(NULL, token, REQ, &adm, &err), "kernel");
  EXPECT_400(aex_kernel_admit(k, NULL, REQ, &adm, &err), "token");
  EXPECT_400(aex_kernel_admit(k, token, NULL, &adm, &err), "request_json");
  EXPECT_400(aex_kernel_admit(k, token, REQ, NULL, &err), "out");
  EXPECT_400(aex_kernel_admit(k, "\xff\xfe", REQ, &adm, &err), "token");
  EXPECT_400(aex_kernel_admit(k, token, "{\"model\": \"mini\"", &adm, &err), "request");
  EXPECT_400(aex_kernel_admit(k, token, "{\"model\": \"mini\", \"max_tokens\": 5}", &adm, &err), "request");
  EXPECT_400(aex_kernel_admit(k, token, "{\"model\": \"mini\", \"max_output_tokens\": -5}", &adm, &err), "max_output_tokens");
  EXPECT_400(aex_kernel_admit(k, token, "{\"model\": \"mini\", \"execution_id\": \"a b\"}", &adm, &err), "execution_id");
  EXPECT_400(aex_kernel_create_agent(k, "{\"name\": \"\", \"budget_micro\": 1}", &unused, &err), "name");
  EXPECT_400(aex_kernel_create_agent(k, "{\"name\": \"n\", \"budget_micro\": -1}", &unused, &err), "budget_micro");
  EXPECT_400(aex_kernel_create_agent(k, "{\"name\": \"n\", \"budget_usd\": \"0.0000001\"}", &unused, &err), "budget_usd");
  EXPECT_400(aex_kernel_set_budget(k, "bad-input", -1, &err), "budget_micro");
  EXPECT_400(aex_kernel_audit(k, "not-an-anchor", &unused, &err), "anchor");

  /* Over-long strings: 81 MiB of 'a'. */
  size_t huge_len = (size_t)81 << 20;
  char *huge = malloc(huge_len + 1);
  memset(huge, 'a', huge_len);
  huge[huge_len] = '\0';
  EXPECT_400(aex_kernel_admit(k, huge, REQ, &adm, &err), "token");
  free(huge);

  /* Settling: unknown, NULL usage, negative usage. */
  aex_settlement s;
  aex_usage negative = {-1, 0, 0};
  CHECK_STATUS(aex_kernel_admit(k, token, REQ, &adm, NULL), AEX_OK);
  EXPECT_400(aex_kernel_commit(k, aex_admission_execution_id(adm), NULL, &s, &err), "usage");
  EXPECT_400(aex_kernel_commit(k, aex_admission_execution_id(adm), &negative, &s, &err), "usage.input_tokens");
  EXPECT_400(aex_kernel_commit(k, aex_admission_execution_id(adm), &negative, NULL, &err), "out");
  CHECK_STATUS(aex_kernel_commit(k, "no-such-execution", &negative, &s, NULL), AEX_INVALID_REQUEST);
  aex_usage fine = {1, 1, 0};
  CHECK_STATUS(aex_kernel_commit(k, "no-such-execution", &fine, &s, &err), AEX_NOT_FOUND);
  CHECK(strcmp(aex_error_reason(err), "execution_not_found") == 0);
  aex_error_free(err);
  CHECK_STATUS(aex_kernel_release(k, aex_admission_execution_id(adm), NULL, &s, NULL), AEX_OK);
  aex_admission_free(adm);

  /* A NULL err is allowed: the status still says what happened. */
  CHECK_STATUS(aex_kernel_admit(k, "aex_nope", REQ, &adm, NULL), AEX_UNAUTHENTICATED);

  /* Every _free accepts NULL. */
  aex_string_free(NULL);
  aex_error_free(NULL);
  aex_admission_free(NULL);
  aex_options_free(NULL);
  aex_kernel_free(NULL);
  aex_kernel_close(NULL);
  CHECK(aex_error_status(NULL) == AEX_OK && strcmp(aex_error_message(NULL), "") == 0);

  /* Nothing above changed the money: only the admit/release pair and the two denials moved the
     ledger, and the agent holds nothing. */
  CHECK(agent_field(k, "bad-input", "reserved_micro") == 0);
  CHECK(agent_field(k, "bad-input", "spent_micro") == 0);
  CHECK(unused == NULL); /* no out-param was written by a failing call */
  CHECK(audit_clean(k));
  aex_string_free(before);
  aex_string_free(token);
#undef EXPECT_400
}

struct racer {
  aex_kernel *k;
  const char *token;
  int admitted;
  int errors;
};

static void *race(void *arg) {
  struct racer *r = arg;
  for (;;) {
    aex_admission *adm = NULL;
    aex_error *err = NULL;
    aex_status s = aex_kernel_admit(r->k, r->token, REQ, &adm, &err);
    if (s == AEX_INSUFFICIENT_BUDGET) {
      aex_error_free(err);
      return NULL;
    }
    if (s != AEX_OK) {
      fprintf(stderr, "race: %s\n", aex_error_message(err));
      aex_error_free(err);
      r->errors++;
      return NULL;
    }
    aex_usage usage = {1000, 500, 0};
    aex_settlement settled;
    if (aex_kernel_commit(r->k, aex_admission_execution_id(adm), &usage, &settled, NULL) != AEX_OK ||
        settled.cost_micro != PER_CALL)
      r->errors++;
    aex_admission_free(adm);
    r->admitted++;
  }
}

static void test_threads(aex_kernel *k) {
  enum { THREADS = 8, K = 100 };
  char spec[128];
  snprintf(spec, sizeof spec, "{\"name\": \"racer\", \"budget_micro\": %lld}", (long long)(K * PER_CALL));
  char *token = create_agent(k, spec);
  pthread_t threads[THREADS];
  struct racer racers[THREADS];
  for (int i = 0; i < THREADS; i++) {
    racers[i] = (struct racer){k, token, 0, 0};
    pthread_create(&threads[i], NULL, race, &racers[i]);
  }
  int total = 0, errors = 0;
  for (int i = 0; i < THREADS; i++) {
    pthread_join(threads[i], NULL);
    total += racers[i].admitted;
    errors += racers[i].errors;
  }
  CHECK(errors == 0);
  CHECK(total == K);
  CHECK(agent_field(k, "racer", "spent_micro") == K * PER_CALL);
  CHECK(agent_field(k, "racer", "reserved_micro") == 0);
  CHECK(audit_clean(k));
  aex_string_free(token);
}

static void test_closed_kernel(aex_kernel *k) {
  aex_kernel_close(k);
  aex_error *err = NULL;
  char *json = NULL;
  CHECK_STATUS(aex_kernel_list_agents(k, &json, &err), AEX_UNAVAILABLE);
  CHECK(json == NULL && strstr(aex_error_message(err), "closed") != NULL);
  aex_error_free(err);
  aex_kernel_close(k); /* twice is fine */
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  snprintf(db_path, sizeof db_path, "%s/aex.db", argv[1]);
  test_version();
  aex_kernel *k = open_kernel();
  test_lifecycle(k);
  test_bad_input(k);
  test_threads(k);
  test_closed_kernel(k);
  aex_kernel_free(k);
  return check_summary("c-host");
}
