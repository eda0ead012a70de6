/* A minimal test harness for the C hosts: CHECK counts, reports and keeps going. */
#ifndef AEX_TEST_CHECK_H
#define AEX_TEST_CHECK_H

#include "aex.h"

#include <stdio.h>
#include <string.h>

static int checks_passed = 0;
static int checks_failed = 0;

#define CHECK(cond)                                                                    \
  do {                                                                                 \
    if (cond) {                                                                        \
      checks_passed++;                                                                 \
    } else {                                                                           \
      checks_failed++;                                                                 \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);         \
    }                                                                                  \
  } while (0)

#define CHECK_STATUS(expr, want)                                                       \
  do {                                                                                 \
    aex_status got_ = (expr);                                                          \
    if (got_ == (want)) {                                                              \
      checks_passed++;                                                                 \
    } else {                                                                           \
      checks_failed++;                                                                 \
      fprintf(stderr, "%s:%d: %s returned %d (%s), wanted %d\n", __FILE__, __LINE__,   \
              #expr, (int)got_, aex_status_name(got_), (int)(want));                   \
    }                                                                                  \
  } while (0)

/* Whether the kernel's audit is clean; prints the report to stderr when it is not. */
static inline int audit_clean(aex_kernel *k) {
  char *json = NULL;
  int clean = aex_kernel_audit(k, NULL, &json, NULL) == AEX_OK && strstr(json, "\"clean\":true") != NULL;
  if (!clean && json) fprintf(stderr, "audit: %s\n", json);
  aex_string_free(json);
  return clean;
}

/* Prints the closing line the test runner reads and returns the exit code. */
static int check_summary(const char *suite) {
  printf("%s: %d passed, %d failed\n", suite, checks_passed, checks_failed);
  return checks_failed == 0 ? 0 : 1;
}

#endif
