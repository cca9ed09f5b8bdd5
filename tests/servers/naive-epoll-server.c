/*
 * The textbook single-threaded epoll HTTP/1.1 server, written the way most
 * tutorials and many real C servers are: each connection is a malloc'd
 * struct whose pointer is the epoll registration's data, and it ends with
 * plain `close(fd); free(conn);` -- no EPOLL_CTL_DEL first, because close()
 * removes the registration (when the last reference to the socket goes).
 * It knows nothing of lb.
 *
 *   naive-epoll-server PORT
 *
 * It checks what it trusts: an event whose connection was freed aborts the
 * process loudly ("event for a freed connection"), instead of the silent
 * heap corruption such an event causes in the wild.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define LIVE 0x4c495645u  /* "LIVE" */
#define FREED 0x44454144u /* "DEAD" */

struct conn {
    /* Past the bytes malloc's free list reuses, so a freed one still says FREED. */
    char pad[32];
    unsigned magic;
    int fd;
    size_t len;
    char buf[2048];
};

static void finish(struct conn *c) {
    close(c->fd);
    c->magic = FREED;
    free(c);
}

static void respond(struct conn *c) {
    char body[128], resp[512];
    const char *id = getenv("LB_WORKER_ID");
    int blen = snprintf(body, sizeof body, "hello from worker %s (pid %d)\n", id ? id : "-", getpid());
    int keep = strstr(c->buf, "Connection: close") == NULL;
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n%s", blen,
                     keep ? "keep-alive" : "close", body);
    if (write(c->fd, resp, (size_t)n) != n || !keep) {
        finish(c);
        return;
    }
    c->len = 0;
}

static void on_readable(struct conn *c) {
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            finish(c);
            return;
        }
        if (n < 0)
            return;
        c->len += (size_t)n;
        c->buf[c->len] = 0;
        if (strstr(c->buf, "\r\n\r\n")) {
            respond(c);
            return;
        }
        if (c->len == sizeof c->buf - 1) {
            finish(c);
            return;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 511)) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    c = calloc(1, sizeof *c);
                    c->magic = LIVE;
                    c->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (c->magic != LIVE) {
                fprintf(stderr, "naive-epoll-server: event for a freed connection (events %#x)\n",
                        evs[i].events);
                abort();
            }
            on_readable(c);
        }
    }
}
