/*
 * fdpass-master.c - the floor for a master's CPU (not a user alternative): the smallest C version of the
 * planned design, to show what the handoff itself costs. One single-threaded master accepts
 * on PORT and hands every accepted fd to one of WORKERS pre-forked ./backend processes over a
 * unix SOCK_SEQPACKET socketpair (SCM_RIGHTS), round-robin, then closes its copy.
 *
 * Usage: fdpass-master PORT
 *   env WORKERS=2        backends to pre-fork (each runs ./backend with FD_SOCK_FD=3)
 *   env BATCH=1          max fds per sendmsg: 1 = accept, sendmsg, close per connection;
 *                        >1 = accept until EAGAIN (or BATCH per worker), then one sendmsg per
 *                        worker carrying all its fds
 *   env BACKEND=path     backend binary (default: ./backend next to this binary)
 *   env MAX_LIFE=S       exit by itself after S seconds (default 900)
 * Prints "fdpass-ready master=P batch=B workers=a,b" once the workers run.
 * SIGTERM/SIGINT/SIGALRM: TERM the workers, reap them, exit.
 *
 * Build: gcc -O2 -Wall -o fdpass-master fdpass-master.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAXW 64
#define MAXBATCH 64

static volatile sig_atomic_t want_exit;
static void on_sig(int s) { (void)s; want_exit = 1; }

static int send_fds(int sock, const int *fds, int n) {
    char byte = 'F';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union { struct cmsghdr h; char buf[CMSG_SPACE(MAXBATCH * sizeof(int))]; } cm;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = cm.buf, .msg_controllen = CMSG_SPACE(n * sizeof(int))};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(n * sizeof(int));
    memcpy(CMSG_DATA(c), fds, n * sizeof(int));
    for (;;) {   /* blocking socket: back-pressure from a slow worker stalls the master */
        ssize_t r = sendmsg(sock, &mh, MSG_NOSIGNAL);
        if (r >= 0) return 0;
        if (errno == EINTR && !want_exit) continue;
        return -1;
    }
}

int main(int argc, char **argv) {
    const char *ps = argc > 1 ? argv[1] : getenv("PORT");
    if (!ps) { fprintf(stderr, "usage: %s PORT\n", argv[0]); return 2; }
    int port = atoi(ps);
    int nw = getenv("WORKERS") ? atoi(getenv("WORKERS")) : 2;
    int batch = getenv("BATCH") ? atoi(getenv("BATCH")) : 1;
    int max_life = getenv("MAX_LIFE") ? atoi(getenv("MAX_LIFE")) : 900;
    if (nw < 1 || nw > MAXW) nw = 2;
    if (batch < 1) batch = 1;
    if (batch > MAXBATCH) batch = MAXBATCH;

    char backend[PATH_MAX];
    if (getenv("BACKEND")) snprintf(backend, sizeof backend, "%s", getenv("BACKEND"));
    else {
        ssize_t n = readlink("/proc/self/exe", backend, sizeof backend - 16);
        if (n < 0) { perror("readlink"); return 1; }
        backend[n] = 0;
        char *slash = strrchr(backend, '/');
        strcpy(slash ? slash + 1 : backend, "backend");
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sig;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (max_life > 0) alarm((unsigned)max_life);

    int wsock[MAXW];
    pid_t wpid[MAXW];
    for (int i = 0; i < nw; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) { perror("socketpair"); return 1; }
        pid_t p = fork();
        if (p < 0) { perror("fork"); return 1; }
        if (p == 0) {
            if (dup2(sv[1], 3) < 0) _exit(127);      /* dup2 clears CLOEXEC on fd 3 */
            setenv("FD_SOCK_FD", "3", 1);
            char label[16];
            snprintf(label, sizeof label, "%d", i + 1);   /* "port" label = worker number */
            execl(backend, backend, label, (char *)NULL);
            perror("exec backend");
            _exit(127);
        }
        close(sv[1]);
        wsock[i] = sv[0];
        wpid[i] = p;
    }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 4096) < 0) {
        perror("bind/listen");
        want_exit = 1;
    } else {
        char line[256];
        int n = snprintf(line, sizeof line, "fdpass-ready master=%d batch=%d workers=", (int)getpid(), batch);
        for (int i = 0; i < nw; i++)
            n += snprintf(line + n, sizeof line - n, "%s%d", i ? "," : "", (int)wpid[i]);
        n += snprintf(line + n, sizeof line - n, "\n");
        ssize_t w = write(1, line, (size_t)n); (void)w;
    }

    unsigned long long handed = 0;
    int next = 0;
    int pend[MAXW][MAXBATCH];
    int npend[MAXW] = {0};
    while (!want_exit) {
        struct pollfd pfd = {.fd = lfd, .events = POLLIN};
        if (poll(&pfd, 1, -1) < 0) continue;   /* EINTR: re-check want_exit */
        for (;;) {
            int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) break;   /* EAGAIN (or EMFILE etc.): flush and poll again */
            int w = next;
            next = (next + 1) % nw;
            if (batch == 1) {
                send_fds(wsock[w], &fd, 1);
                close(fd);
                handed++;
                continue;
            }
            pend[w][npend[w]++] = fd;
            if (npend[w] == batch) {
                send_fds(wsock[w], pend[w], npend[w]);
                for (int k = 0; k < npend[w]; k++) close(pend[w][k]);
                handed += npend[w];
                npend[w] = 0;
            }
        }
        for (int w = 0; w < nw; w++) {
            if (!npend[w]) continue;
            send_fds(wsock[w], pend[w], npend[w]);
            for (int k = 0; k < npend[w]; k++) close(pend[w][k]);
            handed += npend[w];
            npend[w] = 0;
        }
    }
    for (int i = 0; i < nw; i++) kill(wpid[i], SIGTERM);
    for (int i = 0; i < nw; i++) waitpid(wpid[i], NULL, 0);
    fprintf(stdout, "final master=%d handed=%llu\n", (int)getpid(), handed);
    return 0;
}
