/*
 * Governed calls at their edges, through the C ABI, against a misbehaving loopback provider
 * (loopback.h): what a failed call cost, execution ids in and out, a connection that could not
 * be made, closing and freeing kernels while calls are in flight (from other threads and from
 * inside the stream callback), nested calls from a callback, and fork().
 *
 * Each scenario runs in a child process under a watchdog (alarm), so a hang is reported as a
 * failure instead of stopping the suite.
 *
 * Usage: edges DIR   (DIR is an empty, writable directory for the databases)
 */
#define _POSIX_C_SOURCE 200809L
#include "aex.h"
#include "check.h"
#include "loopback.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>

static char dir[4000];
static int port;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
  struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&t, NULL);
}

static void db_path(char *out, size_t size, const char *name) {
  snprintf(out, size, "%s/%s.db", dir, name);
}

/* A kernel on DIR/NAME.db with the loopback's models, plus `providers` / `models` lines. */
static aex_kernel *open_kernel_with(const char *name, int64_t connect_ms, int64_t request_ms, uint32_t retries,
                                    const char *providers, const char *models) {
  char yaml[4096], path[4200];
  snprintf(yaml, sizeof yaml,
           "providers:\n  local: {base_url: \"http://127.0.0.1:%d/v1\"}\n%s"
           "models:\n"
           "  ok: {provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}\n"
           "  cut: {provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}\n"
           "  stall: {provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}\n"
           "  slow: {provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}\n"
           "  fail-500: {provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}\n%s",
           port, providers, models);
  db_path(path, sizeof path, name);
  aex_options *opts = aex_options_new();
  aex_error *err = NULL;
  CHECK_STATUS(aex_options_set_config_yaml(opts, yaml, &err), AEX_OK);
  if (err) fprintf(stderr, "config: %s\n", aex_error_message(err));
  aex_error_free(err);
  CHECK_STATUS(aex_options_set_durability(opts, "normal", NULL), AEX_OK);
  CHECK_STATUS(aex_options_set_dispatch(opts, connect_ms, request_ms, retries, NULL), AEX_OK);
  aex_kernel *k = NULL;
  CHECK_STATUS(aex_kernel_open(path, opts, &k, NULL), AEX_OK);
  aex_options_free(opts);
  return k;
}

static aex_kernel *open_kernel(const char *name, int64_t request_ms) {
  return open_kernel_with(name, 2000, request_ms, 0, "", "");
}

static char *create_agent(aex_kernel *k) {
  char *token = NULL;
  CHECK_STATUS(aex_kernel_create_agent(k, "{\"name\": \"edge\", \"budget_usd\": \"1.00\"}", &token, NULL), AEX_OK);
  return token;
}

static const char *request(const char *model) {
  static _Thread_local char buf[256];
  snprintf(buf, sizeof buf, "{\"model\": \"%s\", \"messages\": [{\"role\": \"user\", \"content\": \"hello\"}]}", model);
  return buf;
}

/* A settlement no call wrote. */
static void unset(aex_settlement *s) {
  memset(s, 0, sizeof *s);
  s->state = 99;
}

static long long json_field(const char *json, const char *key) {
  char pattern[128];
  snprintf(pattern, sizeof pattern, "\"%s\":", key);
  const char *at = json ? strstr(json, pattern) : NULL;
  return at ? atoll(at + strlen(pattern)) : -1;
}

static long long agent_field(aex_kernel *k, const char *key) {
  char *json = NULL;
  long long v = -1;
  if (aex_kernel_agent(k, "edge", &json, NULL) == AEX_OK) v = json_field(json, key);
  aex_string_free(json);
  return v;
}

/* Reopens NAME.db after its kernel was closed and checks what the agent was charged. */
static void check_charged_on_reopen(const char *name, int64_t spent) {
  char path[4200];
  db_path(path, sizeof path, name);
  aex_kernel *k = NULL;
  CHECK_STATUS(aex_kernel_open(path, NULL, &k, NULL), AEX_OK);
  CHECK(agent_field(k, "spent_micro") == spent);
  CHECK(agent_field(k, "reserved_micro") == 0);
  CHECK(audit_clean(k));
  aex_kernel_free(k);
}

static bool keep_going(void *userdata, const char *data, size_t len) {
  (void)userdata;
  (void)data;
  (void)len;
  return true;
}

/* ---- 1. A failed call that was charged says what it cost. ---- */

static void charged_failures(void) {
  aex_kernel *k = open_kernel("charged", 1000);
  char *token = create_agent(k);
  aex_settlement s;
  aex_error *err = NULL;
  char *response = NULL;
  int64_t total = 0;

  /* A 200 whose body is cut half-way: nothing was counted, so the full reservation. */
  unset(&s);
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("cut"), NULL, NULL, &response, NULL, &s, &err), AEX_UNAVAILABLE);
  CHECK(response == NULL);
  CHECK(s.state == AEX_EXECUTION_STATE_COMMITTED && s.reserved_micro > 2000);
  CHECK(s.cost_micro == s.reserved_micro && s.released_micro == 0);
  total += s.cost_micro;
  aex_error_free(err);
  err = NULL;

  /* A stream cut after three chunks: the input and the counted output. */
  unset(&s);
  CHECK_STATUS(aex_kernel_stream(k, token, "chat", request("cut"), NULL, NULL, keep_going, NULL, NULL, &s, &err), AEX_UNAVAILABLE);
  CHECK(s.state == AEX_EXECUTION_STATE_COMMITTED && s.cost_micro > 0 && s.cost_micro < s.reserved_micro);
  CHECK(s.cost_micro + s.released_micro == s.reserved_micro);
  total += s.cost_micro;
  aex_error_free(err);
  err = NULL;

  /* No answer within the request timeout (1 s): charged in full, not retried, not waited on. */
  double t0 = now_s();
  unset(&s);
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("stall"), NULL, NULL, &response, NULL, &s, &err), AEX_UNAVAILABLE);
  CHECK(now_s() - t0 < 2.5);
  CHECK(s.state == AEX_EXECUTION_STATE_COMMITTED && s.cost_micro == s.reserved_micro);
  total += s.cost_micro;
  aex_error_free(err);
  err = NULL;

  /* A stream that stalls after its first chunk for longer than the gap allowed (1 s). */
  t0 = now_s();
  unset(&s);
  CHECK_STATUS(aex_kernel_stream(k, token, "chat", request("slow"), NULL, NULL, keep_going, NULL, NULL, &s, &err), AEX_UNAVAILABLE);
  CHECK(now_s() - t0 < 2.5);
  CHECK(s.state == AEX_EXECUTION_STATE_COMMITTED && s.cost_micro > 0 && s.cost_micro < s.reserved_micro);
  total += s.cost_micro;
  aex_error_free(err);

  CHECK(agent_field(k, "spent_micro") == total);
  CHECK(agent_field(k, "reserved_micro") == 0);
  CHECK(audit_clean(k));
  aex_string_free(token);
  aex_kernel_free(k);
}

/* ---- 2. Execution ids in and out: look a call up, retry it safely. ---- */

static void execution_ids(void) {
  aex_kernel *k = open_kernel_with("ids", 2000, 5000, 1, "", "");
  char *token = create_agent(k);
  char *response = NULL, *id = NULL, *json = NULL;
  aex_settlement s;
  aex_error *err = NULL;

  /* The host's id: admitted under it, reported back, and found. */
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("ok"), NULL, "job-1", &response, &id, &s, NULL), AEX_OK);
  CHECK(id != NULL && strcmp(id, "job-1") == 0);
  aex_string_free(response);
  aex_string_free(id);
  response = id = NULL;
  CHECK_STATUS(aex_kernel_execution(k, "job-1", &json, NULL), AEX_OK);
  CHECK(json != NULL && strstr(json, "\"state\":\"COMMITTED\"") != NULL && json_field(json, "cost_micro") == 112);
  aex_string_free(json);

  /* Retrying with the same id never sends it twice, and charges nothing more. */
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("ok"), NULL, "job-1", &response, &id, &s, &err), AEX_CONFLICT);
  CHECK(strcmp(aex_error_reason(err), "idempotency_conflict") == 0);
  CHECK(response == NULL && id == NULL);
  aex_error_free(err);
  err = NULL;
  CHECK(agent_field(k, "spent_micro") == 112);

  /* A stream reports its id too; without one, aex makes a UUIDv7 the host can look up. */
  CHECK_STATUS(aex_kernel_stream(k, token, "chat", request("ok"), NULL, "job-s", keep_going, NULL, &id, &s, NULL), AEX_OK);
  CHECK(id != NULL && strcmp(id, "job-s") == 0 && s.cost_micro == 112);
  aex_string_free(id);
  id = NULL;
  CHECK_STATUS(aex_kernel_stream(k, token, "chat", request("ok"), NULL, "job-s", keep_going, NULL, &id, &s, NULL), AEX_CONFLICT);
  CHECK(id == NULL);
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("ok"), NULL, NULL, &response, &id, &s, NULL), AEX_OK);
  CHECK(id != NULL && strlen(id) == 36 && id[14] == '7');
  CHECK_STATUS(aex_kernel_execution(k, id, &json, NULL), AEX_OK);
  CHECK(json != NULL && strstr(json, "\"state\":\"COMMITTED\"") != NULL);
  aex_string_free(json);
  aex_string_free(response);
  aex_string_free(id);
  response = id = NULL;

  /* A failure reports its last attempt: a 500, retried once, is failed (nothing charged). */
  unset(&s);
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("fail-500"), NULL, "job-5", &response, &id, &s, NULL), AEX_UNAVAILABLE);
  CHECK(id != NULL && strcmp(id, "job-5.retry1") == 0);
  CHECK(s.state == AEX_EXECUTION_STATE_FAILED && s.cost_micro == 0 && s.released_micro == s.reserved_micro);
  CHECK_STATUS(aex_kernel_execution(k, "job-5", &json, NULL), AEX_OK);
  CHECK(json != NULL && strstr(json, "\"state\":\"FAILED\"") != NULL);
  aex_string_free(json);
  aex_string_free(id);
  id = NULL;

  /* A charged failure is not retried: its one attempt, and what it cost. */
  unset(&s);
  CHECK_STATUS(aex_kernel_stream(k, token, "chat", request("cut"), NULL, "job-c", keep_going, NULL, &id, &s, NULL), AEX_UNAVAILABLE);
  CHECK(id != NULL && strcmp(id, "job-c") == 0);
  CHECK(s.state == AEX_EXECUTION_STATE_COMMITTED && s.cost_micro > 0);
  CHECK_STATUS(aex_kernel_execution(k, "job-c", &json, NULL), AEX_OK);
  CHECK(json_field(json, "cost_micro") == s.cost_micro);
  aex_string_free(json);
  json = NULL;
  CHECK_STATUS(aex_kernel_execution(k, "job-c.retry1", &json, NULL), AEX_NOT_FOUND);
  aex_string_free(id);
  id = NULL;

  /* A malformed id is refused before anything is reserved; the out-params stay untouched. */
  unset(&s);
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("ok"), NULL, "a b", &response, &id, &s, &err), AEX_INVALID_REQUEST);
  CHECK(err != NULL && aex_error_field(err) != NULL && strcmp(aex_error_field(err), "execution_id") == 0);
  CHECK(response == NULL && id == NULL && s.state == 99);
  aex_error_free(err);
  err = NULL;
  CHECK_STATUS(aex_kernel_execution(k, "never-admitted", &json, &err), AEX_NOT_FOUND);
  CHECK(json == NULL && strcmp(aex_error_reason(err), "execution_not_found") == 0);
  aex_error_free(err);
  CHECK_STATUS(aex_kernel_execution(k, NULL, &json, NULL), AEX_INVALID_REQUEST);
  CHECK_STATUS(aex_kernel_execution(k, "job-1", NULL, NULL), AEX_INVALID_REQUEST);

  CHECK(agent_field(k, "reserved_micro") == 0);
  CHECK(audit_clean(k));
  aex_string_free(token);
  aex_kernel_free(k);
}

/* ---- A connection that could not be made sent nothing: the reservation comes back. ---- */

static void connect_failures(void) {
  int dead_fd, full_fd;
  int dead = loopback_listener(-1, &dead_fd); /* bound, never listening: refused */
  int full = loopback_listener(0, &full_fd);  /* listening, never accepting: fill its queue */
  int fillers[4];
  for (int i = 0; i < 4; i++) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons((uint16_t)full);
    fillers[i] = socket(AF_INET, SOCK_STREAM, 0);
    fcntl(fillers[i], F_SETFL, O_NONBLOCK);
    connect(fillers[i], (struct sockaddr *)&addr, sizeof addr);
  }
  sleep_ms(100);
  char providers[256], models[512];
  snprintf(providers, sizeof providers, "  dead: {base_url: \"http://127.0.0.1:%d/v1\"}\n  full: {base_url: \"http://127.0.0.1:%d/v1\"}\n", dead, full);
  snprintf(models, sizeof models,
           "  dead: {provider: dead, input_price: 1, output_price: 2, max_output_tokens: 1000}\n"
           "  full: {provider: full, input_price: 1, output_price: 2, max_output_tokens: 1000}\n");
  aex_kernel *k = open_kernel_with("connect", 300, 5000, 0, providers, models);
  char *token = create_agent(k);
  aex_settlement s;
  char *response = NULL;

  unset(&s);
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("dead"), NULL, NULL, &response, NULL, &s, NULL), AEX_UNAVAILABLE);
  CHECK(s.state == AEX_EXECUTION_STATE_RELEASED && s.cost_micro == 0 && s.released_micro == s.reserved_micro);

  /* The connect timeout (300 ms) runs out: nothing was written. */
  double t0 = now_s();
  unset(&s);
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("full"), NULL, NULL, &response, NULL, &s, NULL), AEX_UNAVAILABLE);
  CHECK(now_s() - t0 < 3.0);
  CHECK(s.state == AEX_EXECUTION_STATE_RELEASED && s.cost_micro == 0 && s.released_micro == s.reserved_micro);

  CHECK(agent_field(k, "spent_micro") == 0 && agent_field(k, "reserved_micro") == 0);
  CHECK(audit_clean(k));
  aex_string_free(token);
  aex_kernel_free(k);
  for (int i = 0; i < 4; i++) close(fillers[i]);
  close(dead_fd);
  close(full_fd);
}

/* ---- Closing and freeing while calls are in flight. ---- */

struct streamer {
  aex_kernel *k;
  const char *token;
  const char *model;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int chunks;
  /* what the callback does at its first chunk */
  int close_kernel, free_kernel, agent_after_ms;
  aex_kernel *free_other;
  double callback_close_s;
  aex_status agent_status;
  double agent_s;
  /* the outcome */
  aex_status status;
  aex_settlement settlement;
  double elapsed_s;
};

static void streamer_init(struct streamer *st, aex_kernel *k, const char *token, const char *model) {
  memset(st, 0, sizeof *st);
  st->k = k;
  st->token = token;
  st->model = model;
  st->agent_status = -1;
  pthread_mutex_init(&st->lock, NULL);
  pthread_cond_init(&st->cond, NULL);
  unset(&st->settlement);
}

static bool streamer_chunk(void *userdata, const char *data, size_t len) {
  struct streamer *st = userdata;
  (void)data;
  (void)len;
  pthread_mutex_lock(&st->lock);
  int first = ++st->chunks == 1;
  pthread_cond_broadcast(&st->cond);
  pthread_mutex_unlock(&st->lock);
  if (!first) return true;
  if (st->close_kernel) {
    double t0 = now_s();
    aex_kernel_close(st->k);
    st->callback_close_s = now_s() - t0;
  }
  if (st->free_other) aex_kernel_free(st->free_other);
  if (st->free_kernel) aex_kernel_free(st->k);
  if (st->agent_after_ms) {
    sleep_ms(st->agent_after_ms);
    char *json = NULL;
    double t0 = now_s();
    st->agent_status = aex_kernel_agent(st->k, "edge", &json, NULL);
    st->agent_s = now_s() - t0;
    aex_string_free(json);
  }
  return true;
}

static void *streamer_run(void *arg) {
  struct streamer *st = arg;
  double t0 = now_s();
  st->status = aex_kernel_stream(st->k, st->token, "chat", request(st->model), NULL, NULL, streamer_chunk, st, NULL, &st->settlement, NULL);
  st->elapsed_s = now_s() - t0;
  return NULL;
}

static void streamer_wait_first_chunk(struct streamer *st) {
  pthread_mutex_lock(&st->lock);
  while (st->chunks == 0) pthread_cond_wait(&st->cond, &st->lock);
  pthread_mutex_unlock(&st->lock);
}

/* A stream cancelled by close settles as charged: input plus what was counted. */
static void check_cancelled(const struct streamer *st) {
  CHECK_STATUS(st->status, AEX_UNAVAILABLE);
  CHECK(st->elapsed_s < 3.0);
  CHECK(st->settlement.state == AEX_EXECUTION_STATE_COMMITTED);
  CHECK(st->settlement.cost_micro > 0 && st->settlement.cost_micro < st->settlement.reserved_micro);
}

static void close_in_callback(void) {
  aex_kernel *k = open_kernel("close-in-callback", 10000);
  char *token = create_agent(k);
  struct streamer st;
  streamer_init(&st, k, token, "slow");
  st.close_kernel = 1;
  streamer_run(&st);
  CHECK(st.callback_close_s < 1.0);
  check_cancelled(&st);
  char *json = NULL;
  CHECK_STATUS(aex_kernel_list_agents(k, &json, NULL), AEX_UNAVAILABLE);
  aex_kernel_free(k);
  aex_string_free(token);
  check_charged_on_reopen("close-in-callback", st.settlement.cost_micro);
}

/* Payloads already received are not delivered after close: the stream ends there. */
static void close_in_callback_with_more_received(void) {
  aex_kernel *k = open_kernel("close-in-callback-ok", 10000);
  char *token = create_agent(k);
  struct streamer st;
  streamer_init(&st, k, token, "ok");
  st.close_kernel = 1;
  streamer_run(&st);
  CHECK(st.chunks == 1);
  check_cancelled(&st);
  aex_kernel_free(k);
  aex_string_free(token);
  check_charged_on_reopen("close-in-callback-ok", st.settlement.cost_micro);
}

static void free_in_callback(void) {
  aex_kernel *k = open_kernel("free-in-callback", 10000);
  char *token = create_agent(k);
  struct streamer st;
  streamer_init(&st, k, token, "slow");
  st.free_kernel = 1;
  streamer_run(&st);
  check_cancelled(&st);
  aex_string_free(token);
  check_charged_on_reopen("free-in-callback", st.settlement.cost_micro);
}

/* Freeing another kernel (one whose dispatcher ran) from inside a callback. */
static void free_other_in_callback(void) {
  aex_kernel *k = open_kernel("free-other-a", 10000);
  aex_kernel *other = open_kernel("free-other-b", 10000);
  char *token = create_agent(k);
  char *other_token = create_agent(other);
  char *response = NULL;
  CHECK_STATUS(aex_kernel_call(other, other_token, "chat", request("ok"), NULL, NULL, &response, NULL, NULL, NULL), AEX_OK);
  aex_string_free(response);
  struct streamer st;
  streamer_init(&st, k, token, "ok");
  st.free_other = other;
  streamer_run(&st);
  CHECK_STATUS(st.status, AEX_OK);
  CHECK(st.settlement.state == AEX_EXECUTION_STATE_COMMITTED && st.settlement.cost_micro == 112);
  aex_string_free(token);
  aex_string_free(other_token);
  aex_kernel_free(k);
}

/* Another thread closes the kernel while a stream stalls: close returns at once, the stream is
   cancelled and settled, and a call made after close began fails at once. */
static void close_while_streaming(void) {
  aex_kernel *k = open_kernel("close-while-streaming", 8000);
  char *token = create_agent(k);
  struct streamer st;
  streamer_init(&st, k, token, "slow");
  pthread_t t;
  pthread_create(&t, NULL, streamer_run, &st);
  streamer_wait_first_chunk(&st);
  double t0 = now_s();
  aex_kernel_close(k);
  CHECK(now_s() - t0 < 1.0);
  char *json = NULL;
  t0 = now_s();
  CHECK_STATUS(aex_kernel_list_agents(k, &json, NULL), AEX_UNAVAILABLE);
  CHECK(now_s() - t0 < 0.5);
  pthread_join(t, NULL);
  check_cancelled(&st);
  aex_kernel_free(k);
  aex_string_free(token);
  check_charged_on_reopen("close-while-streaming", st.settlement.cost_micro);
}

struct closer {
  aex_kernel *k;
  double elapsed_s;
};

static void *closer_run(void *arg) {
  struct closer *c = arg;
  double t0 = now_s();
  aex_kernel_close(c->k);
  c->elapsed_s = now_s() - t0;
  return NULL;
}

/* While one thread is in close, a call from another thread (here: a stream's callback, and the
   main thread) returns at once. */
static void call_while_closing(void) {
  aex_kernel *k = open_kernel("call-while-closing", 6000);
  char *token = create_agent(k);
  struct streamer st;
  streamer_init(&st, k, token, "slow");
  st.agent_after_ms = 300;
  pthread_t t, c;
  pthread_create(&t, NULL, streamer_run, &st);
  streamer_wait_first_chunk(&st);
  struct closer closer = {k, 0};
  pthread_create(&c, NULL, closer_run, &closer);
  sleep_ms(100);
  char *json = NULL;
  double t0 = now_s();
  CHECK_STATUS(aex_kernel_list_agents(k, &json, NULL), AEX_UNAVAILABLE);
  CHECK(now_s() - t0 < 0.5);
  pthread_join(c, NULL);
  pthread_join(t, NULL);
  CHECK(closer.elapsed_s < 1.0);
  CHECK_STATUS(st.agent_status, AEX_UNAVAILABLE);
  CHECK(st.agent_s < 0.5);
  check_cancelled(&st);
  aex_kernel_free(k);
  aex_string_free(token);
  check_charged_on_reopen("call-while-closing", st.settlement.cost_micro);
}

/* ---- What a callback may call. ---- */

struct nested {
  aex_kernel *k, *other;
  const char *token, *other_token;
  int chunks;
  aex_status call, stream, other_call, agent;
  char call_field[64];
};

static bool nested_chunk(void *userdata, const char *data, size_t len) {
  struct nested *n = userdata;
  (void)data;
  (void)len;
  if (++n->chunks > 1) return true;
  char *response = NULL, *json = NULL;
  aex_settlement s;
  aex_error *err = NULL;
  n->call = aex_kernel_call(n->k, n->token, "chat", request("ok"), NULL, NULL, &response, NULL, &s, &err);
  if (aex_error_field(err)) snprintf(n->call_field, sizeof n->call_field, "%s", aex_error_field(err));
  aex_error_free(err);
  aex_string_free(response);
  n->stream = aex_kernel_stream(n->k, n->token, "chat", request("ok"), NULL, NULL, keep_going, NULL, NULL, &s, NULL);
  n->other_call = aex_kernel_call(n->other, n->other_token, "chat", request("ok"), NULL, NULL, &response, NULL, &s, NULL);
  aex_string_free(response);
  n->agent = aex_kernel_agent(n->k, "edge", &json, NULL);
  aex_string_free(json);
  return true;
}

static long file_size(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static void nested_calls(void) {
  aex_kernel *k = open_kernel("nested", 10000);
  aex_kernel *other = open_kernel("nested-other", 10000);
  struct nested n;
  memset(&n, 0, sizeof n);
  n.k = k;
  n.other = other;
  n.token = create_agent(k);
  n.other_token = create_agent(other);
  aex_settlement s;
  unset(&s);

  /* Whatever happens, aex writes nothing to the host's stdout or stderr. */
  char out_path[4200], err_path[4200];
  snprintf(out_path, sizeof out_path, "%s/nested.stdout", dir);
  snprintf(err_path, sizeof err_path, "%s/nested.stderr", dir);
  fflush(stdout);
  fflush(stderr);
  int saved_out = dup(1), saved_err = dup(2);
  int out_fd = open(out_path, O_CREAT | O_WRONLY | O_TRUNC, 0600);
  int err_fd = open(err_path, O_CREAT | O_WRONLY | O_TRUNC, 0600);
  dup2(out_fd, 1);
  dup2(err_fd, 2);
  aex_status status = aex_kernel_stream(k, n.token, "chat", request("ok"), NULL, NULL, nested_chunk, &n, NULL, &s, NULL);
  fflush(stdout);
  fflush(stderr);
  dup2(saved_out, 1);
  dup2(saved_err, 2);
  close(out_fd);
  close(err_fd);
  close(saved_out);
  close(saved_err);

  CHECK_STATUS(status, AEX_OK);
  CHECK(s.state == AEX_EXECUTION_STATE_COMMITTED && s.cost_micro == 112);
  CHECK_STATUS(n.call, AEX_INVALID_REQUEST);
  CHECK(strcmp(n.call_field, "callback") == 0);
  CHECK_STATUS(n.stream, AEX_INVALID_REQUEST);
  CHECK_STATUS(n.other_call, AEX_INVALID_REQUEST);
  CHECK_STATUS(n.agent, AEX_OK);
  CHECK(file_size(out_path) == 0);
  CHECK(file_size(err_path) == 0);
  if (file_size(err_path) > 0) fprintf(stderr, "  aex wrote to stderr (see %s)\n", err_path);
  /* Only the outer stream was charged; the refused nested calls reserved nothing. */
  CHECK(agent_field(k, "spent_micro") == 112 && agent_field(k, "reserved_micro") == 0);
  CHECK(agent_field(other, "spent_micro") == 0);
  CHECK(audit_clean(k));
  aex_string_free((char *)n.token);
  aex_string_free((char *)n.other_token);
  aex_kernel_free(k);
  aex_kernel_free(other);
}

/* ---- fork(): the child can free (or close) the parent's kernel. ---- */

static void fork_child(void) {
  aex_kernel *k = open_kernel("fork", 10000);
  char *token = create_agent(k);
  char *response = NULL;
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("ok"), NULL, NULL, &response, NULL, NULL, NULL), AEX_OK);
  aex_string_free(response);
  for (int close_first = 0; close_first < 2; close_first++) {
    pid_t pid = fork();
    if (pid == 0) {
      alarm(5);
      char *json = NULL;
      /* The kernel belongs to the parent: unavailable here, and freeing it returns. */
      int unavailable = aex_kernel_agent(k, "edge", &json, NULL) == AEX_UNAVAILABLE;
      if (close_first) aex_kernel_close(k);
      aex_kernel_free(k);
      _exit(unavailable ? 0 : 3);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (WIFSIGNALED(status)) fprintf(stderr, "  the child was killed by signal %d (%s)\n", WTERMSIG(status), WTERMSIG(status) == SIGALRM ? "hung" : "crashed");
  }
  /* The parent's kernel is untouched. */
  CHECK_STATUS(aex_kernel_call(k, token, "chat", request("ok"), NULL, NULL, &response, NULL, NULL, NULL), AEX_OK);
  aex_string_free(response);
  CHECK(agent_field(k, "spent_micro") == 224);
  aex_string_free(token);
  aex_kernel_free(k);
}

/* ---- The harness. ---- */

static void run(const char *name, void (*scenario)(void), unsigned seconds) {
  int p[2];
  if (pipe(p) != 0) exit(2);
  pid_t pid = fork();
  if (pid == 0) {
    close(p[0]);
    checks_passed = checks_failed = 0;
    alarm(seconds);
    scenario();
    int counts[2] = {checks_passed, checks_failed};
    if (write(p[1], counts, sizeof counts) != (ssize_t)sizeof counts) _exit(2);
    close(p[1]);
    exit(0);
  }
  close(p[1]);
  int counts[2] = {0, 0};
  ssize_t n = read(p[0], counts, sizeof counts);
  close(p[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (n == (ssize_t)sizeof counts) {
    checks_passed += counts[0];
    checks_failed += counts[1];
  }
  if (n != (ssize_t)sizeof counts || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    checks_failed++;
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM)
      fprintf(stderr, "%s: hung (stopped after %u s)\n", name, seconds);
    else if (WIFSIGNALED(status))
      fprintf(stderr, "%s: killed by signal %d\n", name, WTERMSIG(status));
    else
      fprintf(stderr, "%s: exited with status %d\n", name, WEXITSTATUS(status));
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  snprintf(dir, sizeof dir, "%s", argv[1]);
  pid_t provider;
  port = loopback_start(&provider);
  run("charged_failures", charged_failures, 30);
  run("execution_ids", execution_ids, 30);
  run("connect_failures", connect_failures, 30);
  run("close_in_callback", close_in_callback, 20);
  run("close_in_callback_with_more_received", close_in_callback_with_more_received, 20);
  run("free_in_callback", free_in_callback, 20);
  run("free_other_in_callback", free_other_in_callback, 20);
  run("close_while_streaming", close_while_streaming, 20);
  run("call_while_closing", call_while_closing, 20);
  run("nested_calls", nested_calls, 20);
  run("fork_child", fork_child, 30);
  loopback_stop(provider);
  return check_summary("c-edges");
}
