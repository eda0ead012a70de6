/*
 * The header in the oldest dialects a host may compile it with: run.sh builds this file as C89
 * and as C++98, pedantic, warnings as errors, with -fshort-enums. It checks what such hosts
 * rely on: block comments only, no trailing enumerator comma, named structs that can be
 * forward-declared, no enum-typed struct field (whose size -fshort-enums would change), and an
 * aex_kernel_close that takes the kernel it shuts down as mutable. It links and runs too.
 */
#include <stdio.h>
#include <string.h>

/* A host's own header may forward-declare aex's plain structs before aex.h is included. */
struct aex_settlement;
struct aex_usage;
static int committed(const struct aex_settlement *s);

#include "aex.h"

/* Compile-time checks (a negative array size fails the build). */
typedef char aex_state_is_32_bits[sizeof(((aex_settlement *)0)->state) == 4 ? 1 : -1];
typedef char aex_status_is_32_bits[sizeof(aex_status) == 4 ? 1 : -1];
typedef char aex_usage_is_three_int64[sizeof(aex_usage) == 24 ? 1 : -1];

static int committed(const struct aex_settlement *s) {
  return s->state == AEX_EXECUTION_STATE_COMMITTED;
}

int main(void) {
  int passed = 0, failed = 0;
  void (*close_kernel)(aex_kernel *) = aex_kernel_close;
  aex_settlement s;
  aex_kernel *k = NULL;
  aex_error *err = NULL;
  char *json = NULL;

  memset(&s, 0, sizeof s);
  s.state = AEX_EXECUTION_STATE_COMMITTED;
  if (committed(&s)) passed++; else failed++;
  if (aex_version_number() == AEX_VERSION_MAJOR * 10000u + AEX_VERSION_MINOR * 100u + AEX_VERSION_PATCH) passed++; else failed++;
  if (strcmp(aex_version(), AEX_VERSION_STRING) == 0) passed++; else failed++;

  if (aex_kernel_open(":memory:", NULL, &k, &err) == AEX_OK) passed++; else failed++;
  close_kernel(k);
  if (aex_kernel_list_agents(k, &json, &err) == AEX_UNAVAILABLE) passed++; else failed++;
  aex_error_free(err);
  aex_kernel_free(k);

  printf("%s: %d passed, %d failed\n",
#ifdef __cplusplus
         "cpp98-header",
#else
         "c89-header",
#endif
         passed, failed);
  return failed == 0 ? 0 : 1;
}
