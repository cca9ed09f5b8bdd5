/*
 * backend.c - the one trivial single-threaded HTTP/1.1 server every front in
 * scripts/bench.sh runs behind, so the fronts are all that differ.
 *
 * Replies "ok" (keep-alive aware, honours Connection: close). GET /slow
 * burns SLOW_MS (default 5) ms of CPU first: the skewed-load scenario.
 *
 * Where it gets connections from:
 *   LB_FD=3        lb's protocol v1 (READY with BATCH: a CONN may carry up to
 *                  8 fds, all taken; CLOSED reports batched per loop,
 *                  unless LB_REPORT_CLOSED=0 says nothing reads them); with
 *                  LB_OWN_LISTENER=1 (kernel dispatch) it accepts from the
 *                  listener lb sends first, ACCEPTED batched like CLOSED
 *   FD_SOCK_FD=3   bare fds over a unix socket (the reference fdpass-master)
 *   PORT=N         its own listener on 127.0.0.1:N (REUSEPORT=1 to share it);
 *                  checked first, so lb's shim and proxy modes run it as any
 *                  server that knows nothing of lb
 *   LISTEN_FDS=1   an inherited listener at fd 3 (systemd socket activation,
 *                  lb's shared mode), when LISTEN_PID is this process
 *
 * Counters: with REPORT_DIR set, "<requests> <conns>" is written to
 * $REPORT_DIR/<pid> at start and on SIGUSR1 or SIGUSR2 (so a benchmark can
 * find every backend of any front and read its split). SIGTERM/SIGINT, DRAIN
 * from lb, or EOF on the fd socket end it.
 *
 * gcc -O2 -Wall -o backend scripts/bench/backend.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 8192
enum { CONN = 1, DRAIN = 2, LISTENER = 3, READY = 16, CLOSED = 17, ACCEPTED = 20, HDR = 16 };

static const char OK_KA[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
static const char OK_CLOSE[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

struct conn { int fd; size_t len; char buf[BUF]; };

static volatile sig_atomic_t want_report, want_exit;
static int ep, chan = -1, lfd = -1, lb_protocol, report_closed, draining;
static unsigned long long requests, conns, unreported, unaccepted;
static long slow_ms = 5;
static char tag;   /* epoll data.ptr for the channel / listener */
static char own_tag;   /* for the own listener, beside lb's channel */

static void on_sig(int s) { if (s == SIGUSR1 || s == SIGUSR2) want_report = 1; else want_exit = 1; }

/* Rewrites $REPORT_DIR/<pid> (outside the signal handler). */
static void report(void) {
    const char *dir = getenv("REPORT_DIR");
    if (!dir) return;
    char path[512], tmp[520], line[64];
    snprintf(path, sizeof path, "%s/%d", dir, (int)getpid());
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    snprintf(line, sizeof line, "%llu %llu\n", requests, conns);
    fputs(line, f);
    fclose(f);
    rename(tmp, path);
}

static void send_msg(int kind, uint64_t value) {
    unsigned char h[HDR] = {1, (unsigned char)kind};
    for (int i = 0; i < 8; i++) h[8 + i] = (unsigned char)(value >> (8 * i));
    while (send(chan, h, HDR, MSG_NOSIGNAL) < 0 && errno == EINTR) {}
}

static void burn(long ms) {
    struct timespec t0, t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    do clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    while ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 < ms);
}

static void conn_close(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
    unreported++;
}

static void on_readable(struct conn *c) {
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->len, BUF - c->len);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) { conn_close(c); return; }
        if (n < 0) return;
        c->len += (size_t)n;
        char *end;
        while ((end = memmem(c->buf, c->len, "\r\n\r\n", 4))) {
            size_t head = (size_t)(end - c->buf) + 4;
            c->buf[head - 1] = 0;
            int cl = draining || strcasestr(c->buf, "\nconnection: close") != NULL;
            if (strncmp(c->buf, "GET /slow", 9) == 0) burn(slow_ms);
            const char *r = cl ? OK_CLOSE : OK_KA;
            size_t rl = cl ? sizeof OK_CLOSE - 1 : sizeof OK_KA - 1;
            requests++;
            if (write(c->fd, r, rl) != (ssize_t)rl || cl) { conn_close(c); return; }
            memmove(c->buf, c->buf + head, c->len - head);
            c->len -= head;
        }
        if (c->len == BUF) { conn_close(c); return; }
    }
}

/* Kernel dispatch: the LISTENER lb sends first, non-blocking; -1 if not. */
static int own_listener(void) {
    unsigned char h[64];
    union { struct cmsghdr a; char b[CMSG_SPACE(4 * sizeof(int))]; } cm;
    struct iovec iov = {h, sizeof h};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof cm.b};
    ssize_t n = recvmsg(chan, &mh, MSG_CMSG_CLOEXEC);
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    if (n < HDR || h[1] != LISTENER || !c || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int)))
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void add(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = malloc(sizeof *c);
    c->fd = fd; c->len = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    conns++;
    on_readable(c);
}

/* Takes every queued message; -1 when the master is gone or said DRAIN. */
static int on_channel(void) {
    for (;;) {
        unsigned char h[64];
        union { struct cmsghdr a; char b[CMSG_SPACE(64 * sizeof(int))]; } cm;
        struct iovec iov = {h, sizeof h};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof cm.b};
        ssize_t n = recvmsg(chan, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n == 0) return -1;
        if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        if (lb_protocol && n >= HDR && h[1] == DRAIN) {
            /* Kernel dispatch: its queue moves to the other workers now. */
            if (lfd >= 0) shutdown(lfd, SHUT_RD);
            draining = 1;
            return -1;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                    add(fd);
                }
    }
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    /* The handled signals are blocked except inside epoll_pwait: one that
     * arrived between checking the flags and going to sleep would otherwise
     * be noticed only at the next event, which an idle backend never gets. */
    sigset_t handled, during_wait;
    sigemptyset(&handled);
    struct sigaction sa = {.sa_handler = on_sig};
    int sigs[] = {SIGUSR1, SIGUSR2, SIGTERM, SIGINT};
    for (int i = 0; i < 4; i++) {
        sigaction(sigs[i], &sa, NULL);
        sigaddset(&handled, sigs[i]);
    }
    sigprocmask(SIG_BLOCK, &handled, &during_wait);
    if (getenv("SLOW_MS")) slow_ms = atol(getenv("SLOW_MS"));
    ep = epoll_create1(EPOLL_CLOEXEC);
    int lfd = -1;
    const char *listen_pid = getenv("LISTEN_PID");
    if (!getenv("PORT") && getenv("LISTEN_FDS") && listen_pid && atol(listen_pid) == (long)getpid()) {
        lfd = 3;
        fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK);
    } else if (!getenv("PORT") && (getenv("LB_FD") || getenv("FD_SOCK_FD"))) {
        lb_protocol = getenv("LB_FD") != NULL;
        const char *rc = getenv("LB_REPORT_CLOSED");
        report_closed = lb_protocol && !(rc && strcmp(rc, "0") == 0);
        chan = atoi(lb_protocol ? getenv("LB_FD") : getenv("FD_SOCK_FD"));
        const char *own = getenv("LB_OWN_LISTENER");
        if (lb_protocol && own && strcmp(own, "1") == 0 && (lfd = own_listener()) < 0) {
            fprintf(stderr, "backend: LB_OWN_LISTENER=1 but lb sent no LISTENER first\n");
            return 2;
        }
    } else {
        const char *p = getenv("PORT");
        if (!p) { fprintf(stderr, "backend: set LB_FD, FD_SOCK_FD, LISTEN_FDS or PORT\n"); return 2; }
        lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (getenv("REUSEPORT")) setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(p))};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 4096) < 0) { perror("backend"); return 1; }
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.ptr = &tag};
    epoll_ctl(ep, EPOLL_CTL_ADD, chan >= 0 ? chan : lfd, &ev);
    if (chan >= 0 && lfd >= 0) {
        struct epoll_event own = {.events = EPOLLIN | EPOLLET, .data.ptr = &own_tag};
        epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &own);
    }
    report();
    /* 1: OWN_LISTENER; 4: BATCH, a CONN may carry several fds (on_channel
     * takes every fd of every message). */
    if (lb_protocol) send_msg(READY, lfd >= 0 ? 1 : 4);
    struct epoll_event evs[256];
    while (!want_exit) {
        /* Accepts before the closes they cover (lb counts open = accepted - closed). */
        if (report_closed && unaccepted) { send_msg(ACCEPTED, unaccepted); unaccepted = 0; }
        if (report_closed && unreported) { send_msg(CLOSED, unreported); unreported = 0; }
        int n = epoll_pwait(ep, evs, 256, -1, &during_wait);
        if (want_report) { want_report = 0; report(); }
        for (int i = 0; i < n; i++) {
            int own = evs[i].data.ptr == &own_tag;
            if (evs[i].data.ptr != &tag && !own) { on_readable(evs[i].data.ptr); continue; }
            if (chan >= 0 && !own) { if (on_channel() < 0) want_exit = 1; continue; }
            for (;;) {
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0 && own && (errno == EINTR || errno == ECONNABORTED)) continue;
                if (fd < 0) break;
                unaccepted += own;
                add(fd);
            }
            /* Said before serving them: a long request next would hide them
             * from least-connections (neither queued nor reported) for as
             * long as it runs. */
            if (own && report_closed && unaccepted) { send_msg(ACCEPTED, unaccepted); unaccepted = 0; }
        }
    }
    report();
    return 0;
}
