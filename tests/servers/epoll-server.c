/*
 * A small, ordinary single-threaded HTTP/1.1 server: socket, bind, listen,
 * epoll, accept4, close. It knows nothing of lb (the tests put it behind
 * lb's accept shim); it only prints LB_WORKER_ID, when set, so the tests
 * can tell the workers apart.
 *
 *   epoll-server PORT
 *
 * GET /slow/<ms> answers after <ms>; SIGTERM stops accepting and exits
 * once the connections in progress are answered (a graceful stop).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 4096

struct conn {
    int fd;
    int timer;   /* -1, or the timerfd of a /slow request */
    size_t len;  /* bytes of the request so far */
    char buf[2048];
};

static volatile sig_atomic_t stopping;
static void on_term(int sig) { (void)sig; stopping = 1; }

static struct conn *conns[65536];
static int open_conns;

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->timer >= 0) {
        conns[c->timer] = NULL;
        close(c->timer);
    }
    conns[c->fd] = NULL;
    close(c->fd);
    free(c);
    open_conns--;
}

static void respond(int ep, struct conn *c) {
    char body[128], resp[512];
    const char *id = getenv("LB_WORKER_ID");
    int blen = snprintf(body, sizeof body, "hello from worker %s (pid %d)\n", id ? id : "-", getpid());
    int keep = !stopping && !strstr(c->buf, "Connection: close");
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n%s", blen,
                     keep ? "keep-alive" : "close", body);
    if (write(c->fd, resp, (size_t)n) != n || !keep) {
        drop(ep, c);
        return;
    }
    c->len = 0;
}

static void on_request(int ep, struct conn *c) {
    int ms;
    if (sscanf(c->buf, "GET /slow/%d", &ms) == 1 && ms > 0) {
        c->timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        struct itimerspec t = {{0, 0}, {ms / 1000, (long)(ms % 1000) * 1000000}};
        timerfd_settime(c->timer, 0, &t, NULL);
        conns[c->timer] = c;
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = c->timer};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->timer, &ev);
        return;
    }
    respond(ep, c);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 128) != 0) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("listening on port %s\n", argv[1]);
    fflush(stdout);
    struct epoll_event evs[64];
    while (!stopping || open_conns > 0) {
        if (stopping && ls >= 0) {
            epoll_ctl(ep, EPOLL_CTL_DEL, ls, NULL);
            close(ls);
            ls = -1;
        }
        int n = epoll_wait(ep, evs, 64, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0)
                        break;
                    struct conn *cn = calloc(1, sizeof *cn);
                    cn->fd = c;
                    cn->timer = -1;
                    conns[c] = cn;
                    open_conns++;
                    struct epoll_event e = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &e);
                }
                continue;
            }
            struct conn *c = conns[fd];
            if (!c)
                continue;
            if (fd == c->timer) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->timer, NULL);
                conns[c->timer] = NULL;
                close(c->timer);
                c->timer = -1;
                respond(ep, c);
                continue;
            }
            ssize_t r = read(fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN)
                    continue;
                drop(ep, c);
                continue;
            }
            c->len += (size_t)r;
            c->buf[c->len] = 0;
            if (strstr(c->buf, "\r\n\r\n") && c->timer < 0)
                on_request(ep, c);
            else if (c->len >= sizeof c->buf - 1)
                drop(ep, c);
        }
    }
    return 0;
}
