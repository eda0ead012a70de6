/*
 * Governed provider calls through the C ABI, against an OpenAI-compatible server on 127.0.0.1.
 *
 * Usage: dispatch BASE_URL   (e.g. http://127.0.0.1:PORT/v1, served by tests/python/provider.py)
 */
#include "aex.h"
#include "check.h"

#include <stdlib.h>

struct chunks {
  int count;
  char text[256];
};

static bool on_chunk(void *userdata, const char *data, size_t len) {
  struct chunks *c = userdata;
  c->count++;
  const char *at = strstr(data, "\"content\": \"");
  if (at && at < data + len) {
    at += strlen("\"content\": \"");
    const char *end = strchr(at, '"');
    if (end) strncat(c->text, at, (size_t)(end - at));
  }
  return true;
}

static bool stop_at_first(void *userdata, const char *data, size_t len) {
  (void)data;
  (void)len;
  ((struct chunks *)userdata)->count++;
  return false;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s BASE_URL\n", argv[0]);
    return 2;
  }
  char yaml[1024];
  snprintf(yaml, sizeof yaml,
           "providers:\n  local: {base_url: \"%s\"}\n"
           "models:\n  mini: {provider: local, input_price: 0.15, output_price: 0.60, max_output_tokens: 1000}\n"
           "  fail-429: {provider: local, input_price: 1, output_price: 1}\n",
           argv[1]);
  aex_options *opts = aex_options_new();
  CHECK_STATUS(aex_options_set_config_yaml(opts, yaml, NULL), AEX_OK);
  CHECK_STATUS(aex_options_set_dispatch(opts, 2000, 10000, 0, NULL), AEX_OK);
  CHECK_STATUS(aex_options_set_dispatch(opts, 0, 10000, 0, NULL), AEX_INVALID_REQUEST);
  CHECK_STATUS(aex_options_set_dispatch(opts, 1, 1, 11, NULL), AEX_INVALID_REQUEST);
  aex_kernel *k = NULL;
  CHECK_STATUS(aex_kernel_open(":memory:", opts, &k, NULL), AEX_OK);
  aex_options_free(opts);
  char *token = NULL;
  CHECK_STATUS(aex_kernel_create_agent(k, "{\"name\": \"c-agent\", \"budget_usd\": \"1.00\"}", &token, NULL), AEX_OK);
  const char *req = "{\"model\": \"mini\", \"messages\": [{\"role\": \"user\", \"content\": \"hello\"}]}";

  char *response = NULL;
  aex_settlement s;
  CHECK_STATUS(aex_kernel_call(k, token, "chat", req, NULL, NULL, &response, NULL, &s, NULL), AEX_OK);
  CHECK(response && strstr(response, "Hello from the test provider.") != NULL);
  CHECK(s.state == AEX_EXECUTION_STATE_COMMITTED && s.cost_micro == 15 + 4);
  aex_string_free(response);

  struct chunks c = {0, ""};
  CHECK_STATUS(aex_kernel_stream(k, token, "chat", req, NULL, NULL, on_chunk, &c, NULL, &s, NULL), AEX_OK);
  CHECK(c.count == 7); /* six text chunks and the usage chunk */
  CHECK(strcmp(c.text, "Hello from the test provider.") == 0);
  CHECK(s.cost_micro == 19 && !s.replayed);

  struct chunks first = {0, ""};
  CHECK_STATUS(aex_kernel_stream(k, token, "chat", req, NULL, NULL, stop_at_first, &first, NULL, &s, NULL), AEX_OK);
  CHECK(first.count == 1 && s.state == AEX_EXECUTION_STATE_COMMITTED);

  aex_error *err = NULL;
  CHECK_STATUS(aex_kernel_call(k, token, "chat", "{\"model\": \"fail-429\", \"messages\": []}", NULL, NULL, &response, NULL, NULL, &err), AEX_RATE_LIMITED);
  CHECK(strcmp(aex_error_reason(err), "provider_rate_limit") == 0 && aex_error_retry_after_ms(err) >= 0);
  aex_error_free(err);
  err = NULL;
  CHECK_STATUS(aex_kernel_call(k, token, "telepathy", req, NULL, NULL, &response, NULL, NULL, &err), AEX_INVALID_REQUEST);
  CHECK(strcmp(aex_error_field(err), "endpoint") == 0);
  aex_error_free(err);
  CHECK_STATUS(aex_kernel_stream(k, token, "chat", req, NULL, NULL, NULL, NULL, NULL, NULL, NULL), AEX_INVALID_REQUEST);

  char *json = NULL;
  CHECK_STATUS(aex_kernel_agent(k, "c-agent", &json, NULL), AEX_OK);
  CHECK(strstr(json, "\"reserved_micro\":0") != NULL);
  aex_string_free(json);
  CHECK_STATUS(aex_kernel_audit(k, NULL, &json, NULL), AEX_OK);
  CHECK(strstr(json, "\"clean\":true") != NULL);
  aex_string_free(json);
  aex_string_free(token);
  aex_kernel_free(k);
  return check_summary("c-dispatch");
}
