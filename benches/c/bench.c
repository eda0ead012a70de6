/* The C side of scripts/bench: admit + commit through libaex from THREADS threads, each with its
 * own agent, on a fresh database file. Prints one JSON row like the Rust harness.
 *
 *   bench DB DURABILITY THREADS CALLS
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "aex.h"

static const char *MODELS =
    "models:\n  gpt-4o-mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 16384}\n";
static const char *REQUEST = "{\"model\": \"gpt-4o-mini\", \"input_tokens\": 1200, \"max_output_tokens\": 256}";

static aex_kernel *kernel;
static pthread_barrier_t start_line;

typedef struct {
    char *token;
    int calls;
    double *micros;
} worker;

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void check(aex_status status, aex_error *err, const char *what) {
    if (status != AEX_OK) {
        fprintf(stderr, "%s: %d %s\n", what, status, aex_error_message(err));
        exit(1);
    }
}

static void one_call(const char *token) {
    aex_admission *a = NULL;
    aex_error *err = NULL;
    check(aex_kernel_admit(kernel, token, REQUEST, &a, &err), err, "admit");
    aex_usage usage = {1200, 180, 0};
    aex_settlement s;
    check(aex_kernel_commit(kernel, aex_admission_execution_id(a), &usage, &s, &err), err, "commit");
    aex_admission_free(a);
}

static void *run(void *arg) {
    worker *w = arg;
    one_call(w->token); /* warm up */
    pthread_barrier_wait(&start_line);
    for (int i = 0; i < w->calls; i++) {
        double t = now_us();
        one_call(w->token);
        w->micros[i] = now_us() - t;
    }
    return NULL;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: bench DB DURABILITY THREADS CALLS\n");
        return 2;
    }
    const char *durability = argv[2];
    int threads = atoi(argv[3]), per_thread = atoi(argv[4]) / threads;
    aex_error *err = NULL;
    aex_options *opts = aex_options_new();
    check(aex_options_set_durability(opts, durability, &err), err, "durability");
    check(aex_options_set_config_yaml(opts, MODELS, &err), err, "config");
    check(aex_kernel_open(argv[1], opts, &kernel, &err), err, "open");
    aex_options_free(opts);

    worker *workers = calloc(threads, sizeof *workers);
    pthread_t *ids = calloc(threads, sizeof *ids);
    pthread_barrier_init(&start_line, NULL, threads + 1);
    for (int i = 0; i < threads; i++) {
        char spec[128];
        snprintf(spec, sizeof spec, "{\"name\": \"c%d\", \"budget_micro\": 1000000000000000}", i);
        check(aex_kernel_create_agent(kernel, spec, &workers[i].token, &err), err, "create agent");
        workers[i].calls = per_thread;
        workers[i].micros = calloc(per_thread, sizeof(double));
        pthread_create(&ids[i], NULL, run, &workers[i]);
    }
    pthread_barrier_wait(&start_line);
    double start = now_us();
    for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    double wall = now_us() - start;

    int n = per_thread * threads;
    double *all = calloc(n, sizeof(double));
    for (int i = 0; i < threads; i++) {
        memcpy(all + i * per_thread, workers[i].micros, per_thread * sizeof(double));
        aex_string_free(workers[i].token);
        free(workers[i].micros);
    }
    qsort(all, n, sizeof(double), by_value);
    printf("{\"surface\": \"c\", \"case\": \"admit+commit\", \"durability\": \"%s\", \"threads\": %d, "
           "\"processes\": 1, \"calls\": %d, \"p50_us\": %.1f, \"p99_us\": %.1f, \"ops_per_s\": %.0f}\n",
           durability, threads, n, all[(int)((n - 1) * 0.5 + 0.5)], all[(int)((n - 1) * 0.99 + 0.5)], n / (wall / 1e6));
    aex_kernel_free(kernel);
    free(all);
    free(workers);
    free(ids);
    return 0;
}
