/*
 * hello.c - an lb worker in C: a single-threaded epoll HTTP/1.1 server that
 * receives its connections from lb on fd 3 (protocol v1, docs/protocol.md).
 * Keep-alive aware, honours "Connection: close"; reports every close to lb.
 * Drains so that keep-alive clients do not notice (docs/protocol.md §4):
 * after DRAIN every response says "Connection: close" and is followed by a
 * lingering close; a connection idle for the grace period is closed.
 * Under kernel dispatch (LB_OWN_LISTENER=1) lb's first message is a
 * listener of this worker's own: it accepts from it instead, reports its
 * accepts (ACCEPTED) before their closes, and stops it on DRAIN.
 * Behind a balancer that sends PROXY headers, lb sends the client's address
 * with a connection (READY says PEER_ADDRESS): the reply names it.
 * READY also says BATCH: a CONN may carry up to 8 connections (their count
 * in header byte 2, one address line each in the payload).
 *
 *   gcc -O2 -Wall -o hello-c examples/hello.c && lb --workers 2 -- ./hello-c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

enum { CONN = 1, DRAIN = 2, LISTENER = 3, READY = 16, CLOSED = 17, ACCEPTED = 20,
       OWN_LISTENER = 1, PEER_ADDRESS = 2, BATCH = 4, MAX_CONN_FDS = 8,
       HDR = 16, BUF = 8192 };

struct conn {
    int fd, lingering;   /* lingering: our side is shut, waiting for the client's FIN */
    size_t len;
    long active_ms;      /* arrived, or last read or answered */
    struct conn *prev, *next;
    char body[128];      /* its own, naming the client, if lb sent its address */
    char buf[BUF];
};

static int chan, ep, live, draining, paused;
/* Kernel dispatch: the own listener (-1 otherwise, and after DRAIN);
 * whether lb reads reports; accepts not reported yet. */
static int lfd = -1, lpaused, report = 1;
static uint64_t accepted;
static char listener_tag;   /* its epoll data.ptr */
/* Open files kept free (more than a CONN's MAX_CONN_FDS): near the limit
 * the channel is not read, so lb sends to other workers (a CONN whose fds
 * cannot be received is lost). */
enum { FD_RESERVE = 16 };
static long fd_limit, base_fds;
static long drain_ms, grace_ms = 2000;
static struct conn *conns;   /* all open connections, for the drain's timers */
static char body[128];
static const char *slot;

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* When a draining worker closes c for want of progress: idle between
 * requests, stalled in one, or lingering, for the grace. */
static long expiry(const struct conn *c) {
    return (c->active_ms > drain_ms ? c->active_ms : drain_ms) + grace_ms;
}

static void send_msg(int kind, uint64_t value) {
    unsigned char h[HDR] = {1, (unsigned char)kind};
    for (int i = 0; i < 8; i++) h[8 + i] = (unsigned char)(value >> (8 * i));
    while (send(chan, h, HDR, MSG_NOSIGNAL) < 0 && errno == EINTR) {}
}

/* Accepts are reported before any close they cover: lb counts a CLOSED
 * beyond what it knows of as a protocol error. */
static void flush_accepted(void) {
    if (accepted && report) send_msg(ACCEPTED, accepted);
    accepted = 0;
}

static void conn_close(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);   /* before close: see docs/protocol.md */
    close(c->fd);
    if (c->prev) c->prev->next = c->next; else conns = c->next;
    if (c->next) c->next->prev = c->prev;
    free(c);
    live--;
    flush_accepted();
    if (report) send_msg(CLOSED, 1);
}

/* Answers every complete request head in the buffer; returns -1 once closed. */
static int on_readable(struct conn *c) {
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->len, BUF - c->len);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) { conn_close(c); return -1; }
        if (n < 0) break;
        if (c->lingering) continue;   /* after the last response: discarded */
        c->len += (size_t)n;
        c->active_ms = now_ms();
        char *end;
        while ((end = memmem(c->buf, c->len, "\r\n\r\n", 4))) {
            size_t head = (size_t)(end - c->buf) + 4;
            c->buf[head - 1] = 0;
            const char *b = c->body[0] ? c->body : body;
            int asked = strcasestr(c->buf, "\nconnection: close") ||
                        (strstr(c->buf, "HTTP/1.0") && !strcasestr(c->buf, "keep-alive"));
            char out[512];
            int m = snprintf(out, sizeof out,
                             "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n%s",
                             strlen(b), asked || draining ? "Connection: close\r\n" : "", b);
            if (write(c->fd, out, (size_t)m) != m || asked) { conn_close(c); return -1; }
            c->active_ms = now_ms();
            if (draining) {
                /* The client did not expect the close: shut our side and wait
                 * for its FIN, so a request it sent meanwhile cannot turn the
                 * close into a reset that destroys this response. */
                shutdown(c->fd, SHUT_WR);
                c->lingering = 1;
                c->len = 0;
                continue;
            }
            memmove(c->buf, c->buf + head, c->len - head);
            c->len -= head;
        }
        if (c->len == BUF) { conn_close(c); return -1; }   /* head too large */
    }
    return 0;
}

/* The client's address a CONN carries ("IP:port", "[v6]:port", from a PROXY
 * header: docs/protocol.md §2), into out[64] if it is one; 0 if it is not. */
static int client_of(const unsigned char *p, size_t n, char *out) {
    char text[64], *end;
    if (n == 0 || n >= sizeof text) return 0;
    memcpy(text, p, n);
    text[n] = 0;
    char *colon = strrchr(text, ':');
    if (strlen(text) != n || !colon || colon[1] < '0' || colon[1] > '9') return 0;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port > 65535) return 0;
    *colon = 0;
    int v6 = colon - text >= 3 && text[0] == '[' && colon[-1] == ']';
    if (v6) colon[-1] = 0;
    unsigned char addr[16];
    if (inet_pton(v6 ? AF_INET6 : AF_INET, text + v6, addr) != 1) return 0;
    memcpy(out, p, n);
    out[n] = 0;
    return 1;
}

static void conn_add(int fd, const char *client) {
    struct conn *c = calloc(1, sizeof *c);
    c->fd = fd;
    if (client)
        snprintf(c->body, sizeof c->body, "hello from worker %s to a client from %s (pid %d)\n",
                 slot, client, (int)getpid());
    c->active_ms = now_ms();
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->next = conns;
    if (conns) conns->prev = c;
    conns = c;
    live++;
    on_readable(c);
}

/* Takes every queued message; returns -1 when the master is gone. */
static int on_channel(void) {
    for (;;) {
        int at_limit = base_fds + live + FD_RESERVE >= fd_limit;
        if (at_limit) {
            /* What is not a connection (DRAIN, the master's EOF) is still taken. */
            unsigned char peek[HDR];
            ssize_t pn = recv(chan, peek, HDR, MSG_PEEK | MSG_DONTWAIT);
            at_limit = pn < 0 || (pn >= 2 && peek[0] == 1 && peek[1] == CONN);
        }
        if (at_limit) {
            if (!paused)
                fprintf(stderr, "hello-c: %d connections open, near the limit of %ld open "
                                "files: taking no more until some close\n", live, fd_limit);
            paused = 1;
            return 0;
        }
        /* Room for a CONN's address lines (64 bytes and '\n' each). */
        unsigned char h[HDR + MAX_CONN_FDS * 65];
        union { struct cmsghdr align; char b[CMSG_SPACE(MAX_CONN_FDS * sizeof(int))]; } cm;
        struct iovec iov = {h, sizeof h};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof cm.b};
        ssize_t n = recvmsg(chan, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n == 0) return -1;
        if (n < 0) {
            paused = 0;
            return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        }
        int fds[MAX_CONN_FDS], nfd = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                    if (nfd < MAX_CONN_FDS) fds[nfd++] = fd;
                    else close(fd);
                }
        int count = n >= HDR && h[2] > 1 ? h[2] : 1;   /* byte 2: the CONN's fds (0: one) */
        if (n >= HDR && h[0] == 1 && h[1] == CONN && nfd <= count) {
            /* Fewer than it says: the kernel had no fd for the rest. */
            if (nfd < count && report) send_msg(CLOSED, (uint64_t)(count - nfd));
            /* One address line per fd, in fd order ('\n' between; none at all
             * when the payload is empty). */
            const unsigned char *line = h + HDR, *end = h + (n > (ssize_t)sizeof h ? sizeof h : (size_t)n);
            int lines = n > HDR && !(mh.msg_flags & MSG_TRUNC);
            for (int i = 0; i < nfd; i++) {
                char client[64];
                const unsigned char *nl = lines ? memchr(line, '\n', (size_t)(end - line)) : NULL;
                size_t len = lines ? (size_t)((nl ? nl : end) - line) : 0;
                int known = lines && client_of(line, len, client);
                conn_add(fds[i], known ? client : NULL);   /* already non-blocking: lb accepted it so */
                if (nl) line = nl + 1;
                else lines = 0;
            }
        } else {
            for (int i = 0; i < nfd; i++) close(fds[i]);
            /* Nothing is closed yet: an idle connection's next request may
             * be on its way. main() closes those idle for the grace. */
            if (n >= HDR && h[0] == 1 && h[1] == DRAIN && !draining) {
                draining = 1;
                drain_ms = now_ms();
                if (lfd >= 0) {
                    /* Stopped, not just closed (lb may still hold a copy):
                     * what is queued in it moves to the other workers now. */
                    epoll_ctl(ep, EPOLL_CTL_DEL, lfd, NULL);
                    shutdown(lfd, SHUT_RD);
                    close(lfd);
                    lfd = -1;
                }
            }
        }
    }
}

/* Kernel dispatch: accepts what the own listener holds, keeping files free
 * as on_channel does (what is left waits in its queue). */
static void on_listener(void) {
    while (lfd >= 0) {
        if (base_fds + live + FD_RESERVE >= fd_limit) {
            if (!lpaused)
                fprintf(stderr, "hello-c: %d connections open, near the limit of %ld open "
                                "files: accepting no more until some close\n", live, fd_limit);
            lpaused = 1;
            break;
        }
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
            lpaused = errno == EMFILE || errno == ENFILE;
            break;
        }
        accepted++;
        conn_add(fd, NULL);
    }
    flush_accepted();
}

int main(void) {
    const char *fd = getenv("LB_FD");
    slot = getenv("LB_WORKER_ID");
    if (!fd || !slot) { fprintf(stderr, "hello-c: start me with lb: lb -- ./hello-c\n"); return 2; }
    chan = atoi(fd);
    struct rlimit rl;
    fd_limit = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? (long)rl.rlim_cur : 1024;
    DIR *d = opendir("/proc/self/fd");
    for (struct dirent *e; d && (e = readdir(d));) if (e->d_name[0] != '.') base_fds++;
    if (d) { closedir(d); base_fds--; }   /* the directory's own fd */
    /* The idle grace: 2 s, at most a quarter of lb's drain timeout. */
    const char *drain = getenv("LB_DRAIN_TIMEOUT_MS");
    if (drain && atol(drain) / 4 < grace_ms) grace_ms = atol(drain) / 4;
    snprintf(body, sizeof body, "hello from worker %s (pid %d)\n", slot, (int)getpid());
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, chan, &ev);
    const char *own = getenv("LB_OWN_LISTENER");
    if (own && strcmp(own, "1") == 0) {
        /* The first message is LISTENER, with the listener's fd. */
        unsigned char h[HDR + 64];
        union { struct cmsghdr align; char b[CMSG_SPACE(4 * sizeof(int))]; } cm;
        struct iovec iov = {h, sizeof h};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof cm.b};
        ssize_t n = recvmsg(chan, &mh, MSG_CMSG_CLOEXEC);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        if (n < HDR || h[1] != LISTENER || !c || c->cmsg_type != SCM_RIGHTS ||
            c->cmsg_len != CMSG_LEN(sizeof(int))) {
            fprintf(stderr, "hello-c: LB_OWN_LISTENER=1 but lb's first message is no LISTENER\n");
            return 2;
        }
        memcpy(&lfd, CMSG_DATA(c), sizeof lfd);
        fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK);
        struct epoll_event lev = {.events = EPOLLIN | EPOLLET, .data.ptr = &listener_tag};
        epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
        const char *rc = getenv("LB_REPORT_CLOSED");
        report = rc && strcmp(rc, "1") == 0;
        base_fds++;
    }
    send_msg(READY, lfd >= 0 ? OWN_LISTENER : PEER_ADDRESS | BATCH);
    struct epoll_event evs[64];
    while (!(draining && live == 0)) {
        long next = -1;
        for (struct conn *c = draining ? conns : NULL; c; c = c->next)
            if (next < 0 || expiry(c) < next) next = expiry(c);
        long now = now_ms();
        int n = epoll_wait(ep, evs, 64, next < 0 ? -1 : next > now ? (int)(next - now) : 0);
        for (int i = 0; i < n; i++) {
            if (!evs[i].data.ptr) { if (on_channel() < 0) return 0; }
            else if (evs[i].data.ptr == &listener_tag) on_listener();
            else on_readable(evs[i].data.ptr);
        }
        now = now_ms();
        for (struct conn *c = draining ? conns : NULL, *after; c; c = after) {
            after = c->next;
            if (expiry(c) <= now) conn_close(c);
        }
        /* Paused at the open-files limit: a close may have made room. */
        if (paused && on_channel() < 0) return 0;
        if (lpaused) on_listener();
    }
    return 0;
}
