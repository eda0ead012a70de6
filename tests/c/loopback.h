/*
 * A loopback OpenAI-compatible provider for the C tests that need a misbehaving one: it runs in
 * a process of its own (so the tests can fork freely) and answers by the request's model name:
 *
 *   ok        200 with usage (100 prompt tokens, 6 completion tokens); SSE when "stream":true
 *   cut       plain: a 200 whose body stops half-way; stream: three chunks, then the connection
 *             closes (no usage, no [DONE])
 *   stall     reads the request and answers nothing until the client goes away
 *   slow      stream: one chunk, then nothing until the client goes away
 *   fail-500  a 500
 *
 * Every response closes its connection. A handler that waits gives up after 30 s.
 */
#ifndef AEX_TEST_LOOPBACK_H
#define AEX_TEST_LOOPBACK_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void loopback_send(int fd, const char *s) {
  size_t len = strlen(s);
  while (len > 0) {
    ssize_t n = send(fd, s, len, MSG_NOSIGNAL);
    if (n <= 0) return;
    s += n;
    len -= (size_t)n;
  }
}

/* Waits until the peer closes the connection (or 30 s pass). */
static void loopback_wait_for_close(int fd) {
  for (int i = 0; i < 300; i++) {
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 100) > 0) {
      char buf[512];
      if (recv(fd, buf, sizeof buf, 0) <= 0) return;
    }
  }
}

static void loopback_chunk(int fd, const char *word) {
  char buf[256];
  snprintf(buf, sizeof buf, "data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"%s\"}}]}\n\n", word);
  loopback_send(fd, buf);
}

static void *loopback_handle(void *arg) {
  int fd = (int)(intptr_t)arg;
  char req[65536];
  size_t got = 0;
  long body_len = -1;
  char *body = NULL;
  while (got < sizeof req - 1) {
    ssize_t n = recv(fd, req + got, sizeof req - 1 - got, 0);
    if (n <= 0) break;
    got += (size_t)n;
    req[got] = '\0';
    char *end = strstr(req, "\r\n\r\n");
    if (!end) continue;
    if (body_len < 0) {
      for (char *line = req; line && line < end; line = strstr(line, "\r\n") ? strstr(line, "\r\n") + 2 : NULL)
        if (strncasecmp(line, "content-length:", 15) == 0) body_len = atol(line + 15);
      if (body_len < 0) body_len = 0;
    }
    body = end + 4;
    if ((long)(got - (size_t)(body - req)) >= body_len) break;
  }
  char model[64] = "";
  const char *m = body ? strstr(body, "\"model\":\"") : NULL;
  if (m) {
    m += strlen("\"model\":\"");
    size_t i = 0;
    while (m[i] && m[i] != '"' && i < sizeof model - 1) {
      model[i] = m[i];
      i++;
    }
    model[i] = '\0';
  }
  int stream = body && strstr(body, "\"stream\":true") != NULL;
  const char *sse = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
  if (strcmp(model, "ok") == 0 && !stream) {
    const char *json =
        "{\"id\":\"c1\",\"object\":\"chat.completion\",\"created\":0,\"model\":\"ok\",\"choices\":[{\"index\":0,"
        "\"finish_reason\":\"stop\",\"message\":{\"role\":\"assistant\",\"content\":\"Hello from the loopback.\"}}],"
        "\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":6,\"total_tokens\":106}}";
    char head[256];
    snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", strlen(json));
    loopback_send(fd, head);
    loopback_send(fd, json);
  } else if (strcmp(model, "ok") == 0) {
    loopback_send(fd, sse);
    loopback_chunk(fd, "Hello");
    loopback_chunk(fd, " from");
    loopback_chunk(fd, " the loopback.");
    loopback_send(fd, "data: {\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":6,\"total_tokens\":106}}\n\n");
    loopback_send(fd, "data: [DONE]\n\n");
  } else if (strcmp(model, "cut") == 0 && !stream) {
    loopback_send(fd, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n");
    loopback_send(fd, "{\"id\":\"c1\",\"choices\":[{\"index\":0,\"message\":{\"content\":\"Hello");
  } else if (strcmp(model, "cut") == 0) {
    loopback_send(fd, sse);
    loopback_chunk(fd, "Hello");
    loopback_chunk(fd, " from");
    loopback_chunk(fd, " the");
  } else if (strcmp(model, "stall") == 0) {
    loopback_wait_for_close(fd);
  } else if (strcmp(model, "slow") == 0) {
    loopback_send(fd, sse);
    loopback_chunk(fd, "Hello");
    loopback_wait_for_close(fd);
  } else {
    const char *json = "{\"error\":{\"message\":\"simulated\",\"type\":\"server_error\"}}";
    char head[256];
    snprintf(head, sizeof head, "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", strlen(json));
    loopback_send(fd, head);
    loopback_send(fd, json);
  }
  shutdown(fd, SHUT_WR);
  close(fd);
  return NULL;
}

/* A TCP socket on 127.0.0.1 at a port the system chooses, listening with `backlog` (a negative
   `backlog`: bound but not listening, so connections are refused). Writes the socket to
   `*fd_out`; returns the port, or -1 on failure. */
static int loopback_listener(int backlog, int *fd_out) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  *fd_out = fd;
  if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || (backlog >= 0 && listen(fd, backlog) != 0) ||
      getsockname(fd, (struct sockaddr *)&addr, &len) != 0) {
    return -1;
  }
  return ntohs(addr.sin_port);
}

/* Starts the provider in a child process; returns its port and writes its pid to `*pid`. */
static int loopback_start(pid_t *pid) {
  int fd;
  int port = loopback_listener(64, &fd);
  if (port < 0) {
    perror("loopback");
    exit(2);
  }
  *pid = fork();
  if (*pid == 0) {
    for (;;) {
      int c = accept(fd, NULL, NULL);
      if (c < 0) {
        if (errno == EINTR) continue;
        _exit(0);
      }
      pthread_t t;
      if (pthread_create(&t, NULL, loopback_handle, (void *)(intptr_t)c) == 0) pthread_detach(t);
    }
  }
  close(fd);
  return port;
}

static void loopback_stop(pid_t pid) {
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
}

#endif
