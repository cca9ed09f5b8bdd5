/*
 * lb's accept shim: makes an unmodified, dynamically linked server an lb
 * worker. lb loads it with LD_PRELOAD (an in-memory file) and starts the
 * server with its channel at LB_FD (fd 3) and the port to take over in
 * LB_SHIM_PORT. When the server listen()s on a TCP socket it bound to that
 * port, the shim puts the channel in that socket's place (the real bind is
 * skipped: lb owns the port) and says READY; the server's own accept() and
 * accept4() then return the connections lb hands over, and its close() of
 * one is reported as CLOSED, so least-connections works. Everything else
 * passes straight through. Under kernel dispatch (LB_OWN_LISTENER=1) the
 * listen() instead puts the listening socket lb sends (LISTENER) in that
 * socket's place and says READY with OWN_LISTENER: the server accepts
 * from it with the kernel's own calls, and a thread of the shim answers
 * DRAIN. Protocol: docs/protocol.md; design and limits: docs/modes.md.
 * Behind a balancer that sends PROXY protocol headers, a CONN carries the
 * client's address (READY says PEER_ADDRESS): accept()'s address and
 * getpeername() on that connection answer it instead of the balancer's.
 * A connection from one of lb's Unix listeners is an AF_UNIX socket the
 * server takes for TCP: its peer is given as loopback, port 0, and TCP
 * options set on it succeed without effect.
 *
 * Rules kept throughout (see docs/modes.md, `shim`):
 *  - inert unless LB_FD names an AF_UNIX SOCK_SEQPACKET socket;
 *  - lazy: nothing changes until this process listens on the port, so
 *    wrapper scripts (sh, pyenv) pass fd 3 and the environment on intact;
 *  - the connection path (accept, close) only uses atomics and
 *    async-signal-safe calls, never allocates or locks, preserves errno;
 *  - close() of a handed-over connection or a listener first removes it
 *    from the epoll sets this process added it to: the server trusts
 *    close() to end its registrations, which it does only when the last
 *    reference goes, and lb (or the shim's channel) may still hold one;
 *  - fork children report only their own closes; only the process that
 *    claimed the channel says LEAVING; only the process that registered an
 *    fd with epoll removes it (a child shares its parent's epoll).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* Protocol v1 (src/proto/wire.rs). */
#define LB_VERSION 1
#define KIND_CONN 1
#define KIND_DRAIN 2
#define KIND_LISTENER 3
#define KIND_READY 16
#define KIND_CLOSED 17
#define KIND_LEAVING 18
#define KIND_STOP 19
#define KIND_ACCEPTED 20
#define READY_OWN_LISTENER 1
#define READY_PEER_ADDRESS 2
#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif
#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif
#ifndef SO_ATTACH_REUSEPORT_EBPF
#define SO_ATTACH_REUSEPORT_EBPF 52
#endif
#ifndef SO_DETACH_REUSEPORT_BPF
#define SO_DETACH_REUSEPORT_BPF 68
#endif
#define HEADER_LEN 16
#define MAX_MESSAGE 4096

/* Close reports are sent before the server blocks, once this many wait,
   or when the last report is this old (a close on a thread while another
   one sleeps in poll would otherwise wait for its timeout). */
#define CLOSE_BATCH 16
#define CLOSE_MAX_AGE_MS 5
/* fds tracked by number; higher ones pass through untracked. */
#define MAX_FDS 65536
/* Registrations with epoll remembered (for DEL before close): every one of
   a listener, and a connection's beyond the first (which has a slot of its
   own per fd). */
#define MAX_REGS 256
/* Addresses of bound/listening sockets on the port. */
#define MAX_LISTENERS 64

/* K_OWN and K_ACCEPTED only under kernel dispatch (LB_OWN_LISTENER=1):
   the worker's own kernel listener in the server's socket's place, and a
   connection the server accepted from it (tracked to count its close). */
enum kind { K_NONE = 0, K_BOUND = 1, K_LISTENER = 2, K_CONN = 3, K_OWN = 4, K_ACCEPTED = 5 };

static _Atomic unsigned char kinds[MAX_FDS];

struct listener {
    _Atomic int fd; /* -1: free */
    struct sockaddr_storage addr;
    socklen_t len;
};
static struct listener listeners[MAX_LISTENERS];

struct reg {
    _Atomic int epfd; /* -1: free */
    int fd;
    pid_t pid;
};
static struct reg regs[MAX_REGS];
static int reg_add(int epfd, int fd, pid_t pid);
/* Per handed-over connection: 1 + the epoll set this process added it to
   first (0: none). Until the master has closed its copy, the server's close
   does not end the socket, so a registration left behind would report
   events for a connection the server has freed: the shim removes it. */
static _Atomic int conn_ep[MAX_FDS];
/* Connections registered in more than one set have the rest in `regs`. */
static _Atomic int conn_extra_regs;

/* Per handed-over connection whose CONN carried the client's address (a
   PROXY header's, docs/protocol.md §2), or that came from one of lb's Unix
   listeners to a server on TCP (loopback, port 0): that address as
   accept() and getpeername() give it (`len` 0: none), and the socket's cookie, which
   no other socket ever has: a number reused behind the shim's back (a
   close by raw syscall, a fork child's) never answers for another socket. */
union peer_addr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
};
struct peer {
    _Atomic socklen_t len;
    uint64_t cookie;
    union peer_addr addr;
};
static struct peer peers[MAX_FDS];
/* Set once a CONN has carried one: until then closes never look. */
static _Atomic int peers_used;

static int active;                 /* LB_FD is a channel: the shim works */
static _Atomic int chan = -1;      /* the channel's fd (3 until claimed) */
static int shim_port;              /* the port taken over */
static _Atomic int claimed;        /* this process (or its parent) claimed it */
static _Atomic pid_t claimer;      /* the pid that claimed (says LEAVING) */
static _Atomic pid_t self_pid;
static _Atomic int open_listeners; /* listeners of the claiming process */
static _Atomic unsigned long closes_pending;
static _Atomic long last_flush_ms;
static _Atomic int eof_seen;
static _Atomic int drain_seen;

static int preload_fd = -1; /* the in-memory .so (LB_SHIM_FD), CLOEXEC'd at claim */
static int reports = 1;     /* LB_REPORT_CLOSED=0: the policy reads no close reports */
/* Open files kept free: near the limit accept() says EMFILE (as it would
   without lb) and leaves the connection in the channel, where lb sees it
   wait and sends others elsewhere, instead of receiving one whose fd the
   kernel cannot give (it closes it: the client is lost). */
#define FD_RESERVE 16
static _Atomic long open_conns;    /* handed-over connections open here */
static int stop_signal = SIGTERM; /* LB_STOP_SIGNAL: what DRAIN becomes */

/* Kernel dispatch (LB_OWN_LISTENER=1): lb sends this worker a listening
   socket of its own, which listen() puts in the server's socket's place;
   the server accepts from it with the kernel's own calls. */
static int own_listener;
static _Atomic int own_received; /* the LISTENER came (in this process or its parent) */
/* Reports waiting: accepts in the high 32 bits, closes in the low ones, so
   one exchange takes both and an ACCEPTED always goes out before the
   CLOSED of the same connection (lb ignores and counts a CLOSED beyond
   what it was told was accepted). */
static _Atomic uint64_t own_pending;
#define OWN_ACCEPT (1ULL << 32)
/* How long listen() waits for the LISTENER, which lb sends as soon as the
   worker starts: a second process of the server listening on its own
   (fork before listen) would otherwise wait forever for a message sent
   once. */
#define LISTENER_WAIT_MS 10000
/* Epoll registrations of a socket bound to the port that does not listen
   yet: the listener that takes its place at listen() is another socket,
   and a registration of the old one goes with it, so listen() makes them
   again for the new one (a server that registers before it listens would
   otherwise never hear of a connection). */
#define MAX_EARLY_REGS 16
struct early_reg {
    _Atomic int epfd; /* -1: free, -2: being filled */
    int fd;
    struct epoll_event ev;
};
static struct early_reg early_regs[MAX_EARLY_REGS];

/* Asks the server to stop as it would be asked without lb: the pool's stop
   signal (SIGTERM unless configured) to the process that claimed the
   channel (a prefork server's master, not the child that happened to read
   the message). */
static void stop_server(void) {
    pid_t p = atomic_load(&claimer);
    kill(p > 0 ? p : getpid(), stop_signal);
}

/* The real functions. */
static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int (*real_listen)(int, int);
static int (*real_accept)(int, struct sockaddr *, socklen_t *);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
static int (*real_close)(int);
static long (*real_syscall)(long, ...);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_fcntl)(int, int, ...);
static int (*real_fcntl64)(int, int, ...);
static int (*real_close_range)(unsigned, unsigned, int);
static void (*real_closefrom)(int);
static int (*real_getsockname)(int, struct sockaddr *, socklen_t *);
static int (*real_getpeername)(int, struct sockaddr *, socklen_t *);
static int (*real_setsockopt)(int, int, int, const void *, socklen_t);
static int (*real_getsockopt)(int, int, int, void *, socklen_t *);
static int (*real_shutdown)(int, int);
static int (*real_epoll_ctl)(int, int, int, struct epoll_event *);
static int (*real_epoll_wait)(int, struct epoll_event *, int, int);
static int (*real_epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);
static int (*real_epoll_pwait2)(int, struct epoll_event *, int, const struct timespec *,
                                const sigset_t *);
static int (*real_poll)(struct pollfd *, nfds_t, int);
static int (*real_ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
static int (*real_select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
static int (*real_pselect)(int, fd_set *, fd_set *, fd_set *, const struct timespec *,
                           const sigset_t *);

#define RESOLVE(name) (real_##name = (__typeof__(real_##name))dlsym(RTLD_NEXT, #name))

static void resolve_all(void) {
    RESOLVE(bind);
    RESOLVE(listen);
    RESOLVE(accept);
    RESOLVE(accept4);
    RESOLVE(close);
    RESOLVE(syscall);
    RESOLVE(dup);
    RESOLVE(dup2);
    RESOLVE(dup3);
    RESOLVE(fcntl);
    RESOLVE(fcntl64);
    RESOLVE(close_range);
    RESOLVE(closefrom);
    RESOLVE(getsockname);
    RESOLVE(getpeername);
    RESOLVE(setsockopt);
    RESOLVE(getsockopt);
    RESOLVE(shutdown);
    RESOLVE(epoll_ctl);
    RESOLVE(epoll_wait);
    RESOLVE(epoll_pwait);
    RESOLVE(epoll_pwait2);
    RESOLVE(poll);
    RESOLVE(ppoll);
    RESOLVE(select);
    RESOLVE(pselect);
    if (!real_fcntl64)
        real_fcntl64 = real_fcntl;
}

static int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    if (!v || !*v)
        return fallback;
    char *end;
    long n = strtol(v, &end, 10);
    return (*end || n < 0 || n > 1 << 30) ? fallback : (int)n;
}

/* Files this process has open, counted with raw getdents64 (no
   allocation: the accept path may not allocate). -1 if it cannot tell. */
static long count_open_fds(void) {
    int dir = (int)real_syscall(SYS_openat, AT_FDCWD, "/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0)
        return -1;
    long n = -1; /* the directory's own fd */
    char buf[4096];
    for (;;) {
        long got = real_syscall(SYS_getdents64, dir, buf, sizeof buf);
        if (got <= 0)
            break;
        for (long at = 0; at < got;) {
            unsigned short reclen;
            memcpy(&reclen, buf + at + 16, sizeof reclen);
            const char *name = buf + at + 19;
            if (name[0] != '.')
                n++;
            at += reclen;
        }
    }
    real_close(dir);
    return n;
}

/* Whether one more connection fits below the open-files limit with the
   reserve kept free. Counts the process's fds only when close to it. */
static _Atomic long fd_limit = -1; /* RLIMIT_NOFILE, read again when close to it */

static long read_fd_limit(void) {
    struct rlimit rl;
    long limit = getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY
                     ? (1L << 30)
                     : (long)rl.rlim_cur;
    atomic_store(&fd_limit, limit);
    return limit;
}

static int room_for_a_conn(void) {
    long limit = atomic_load(&fd_limit);
    if (limit < 0)
        limit = read_fd_limit();
    if (atomic_load(&open_conns) + 4 * FD_RESERVE < limit)
        return 1; /* far from it, whatever else is open */
    limit = read_fd_limit(); /* the server may have raised it */
    long open = count_open_fds();
    return open < 0 || open + FD_RESERVE < limit;
}

static void child_after_fork(void) {
    /* The parent reports its own connections' closes; this process
       reports only the ones it accepts itself. */
    atomic_store(&self_pid, getpid());
    atomic_store(&closes_pending, 0);
    atomic_store(&own_pending, 0);
    atomic_store(&open_conns, 0);
    /* Every registration remembered so far is the parent's: this process
       never removes those (it shares the sets), so it forgets them. */
    for (int i = 0; i < MAX_REGS; i++)
        atomic_store(&regs[i].epfd, -1);
    atomic_store(&conn_extra_regs, 0);
    for (int i = 0; i < MAX_FDS; i++)
        if (atomic_load_explicit(&kinds[i], memory_order_relaxed) == K_CONN ||
            atomic_load_explicit(&kinds[i], memory_order_relaxed) == K_ACCEPTED) {
            atomic_store_explicit(&kinds[i], K_NONE, memory_order_relaxed);
            atomic_store_explicit(&conn_ep[i], 0, memory_order_relaxed);
        }
}

__attribute__((constructor)) static void shim_init(void) {
    resolve_all();
    for (int i = 0; i < MAX_LISTENERS; i++)
        atomic_store(&listeners[i].fd, -1);
    for (int i = 0; i < MAX_REGS; i++)
        atomic_store(&regs[i].epfd, -1);
    for (int i = 0; i < MAX_EARLY_REGS; i++)
        atomic_store(&early_regs[i].epfd, -1);
    atomic_store(&self_pid, getpid());
    int fd = env_int("LB_FD", -1);
    shim_port = env_int("LB_SHIM_PORT", -1);
    preload_fd = env_int("LB_SHIM_FD", -1);
    reports = env_int("LB_REPORT_CLOSED", 1) != 0;
    own_listener = env_int("LB_OWN_LISTENER", 0) == 1;
    stop_signal = env_int("LB_STOP_SIGNAL", SIGTERM);
    if (stop_signal <= 0 || stop_signal >= 64)
        stop_signal = SIGTERM;
    if (fd < 0 || shim_port <= 0 || shim_port > 65535)
        return;
    int type = 0;
    socklen_t len = sizeof type;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (real_getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_SEQPACKET ||
        real_getsockname(fd, (struct sockaddr *)&ss, &sl) != 0 || ss.ss_family != AF_UNIX)
        return; /* not an lb worker (or a child that lost fd 3): inert */
    atomic_store(&chan, fd);
    active = 1;
    pthread_atfork(NULL, NULL, child_after_fork);
}

/* ------------------------------------------------------------ protocol */

static void put_header(unsigned char *h, unsigned char kind, uint64_t value) {
    memset(h, 0, HEADER_LEN);
    h[0] = LB_VERSION;
    h[1] = kind;
    for (int i = 0; i < 8; i++)
        h[8 + i] = (unsigned char)(value >> (8 * i));
}

/* Async-signal-safe, never blocks, keeps errno. */
static int send_kind(unsigned char kind, uint64_t value) {
    int saved = errno;
    unsigned char h[HEADER_LEN];
    put_header(h, kind, value);
    int fd = atomic_load(&chan);
    ssize_t n = fd >= 0 ? send(fd, h, HEADER_LEN, MSG_DONTWAIT | MSG_NOSIGNAL) : -1;
    errno = saved;
    return n == HEADER_LEN ? 0 : -1;
}

/* One message from the channel, without blocking: up to `max` of the fds
   it carried in `got` (`*ngot` of them), every other one closed;
   `*ctrunc` says the kernel dropped some for want of room. */
static ssize_t recv_with_fds(int c, unsigned char *buf, size_t len, int *got, int max, int *ngot,
                             int *ctrunc) {
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(4 * sizeof(int))];
    } cm;
    struct iovec iov = {buf, len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cm.space;
    msg.msg_controllen = sizeof cm.space;
    ssize_t n = recvmsg(c, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    *ngot = 0;
    *ctrunc = n >= 0 && (msg.msg_flags & MSG_CTRUNC);
    for (struct cmsghdr *h = n > 0 ? CMSG_FIRSTHDR(&msg) : NULL; h; h = CMSG_NXTHDR(&msg, h))
        if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
            int cnt = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < cnt; i++) {
                int f;
                memcpy(&f, CMSG_DATA(h) + i * sizeof(int), sizeof f);
                if (*ngot < max)
                    got[(*ngot)++] = f;
                else
                    real_close(f);
            }
        }
    return n;
}

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts); /* async-signal-safe, no syscall (vDSO) */
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Accepts before closes; what does not fit in the channel waits. */
static void flush_own(void) {
    uint64_t x = atomic_exchange(&own_pending, 0);
    uint64_t accepted = x >> 32, closed = x & 0xffffffffULL;
    if (accepted && send_kind(KIND_ACCEPTED, accepted) != 0) {
        atomic_fetch_add(&own_pending, x);
        return;
    }
    if (closed && send_kind(KIND_CLOSED, closed) != 0)
        atomic_fetch_add(&own_pending, closed);
}

static void flush_closes(void) {
    atomic_store_explicit(&last_flush_ms, now_ms(), memory_order_relaxed);
    unsigned long n = atomic_exchange(&closes_pending, 0);
    if (n && send_kind(KIND_CLOSED, n) != 0)
        atomic_fetch_add(&closes_pending, n); /* channel full: next time */
    if (own_listener)
        flush_own();
}

/* An accept (OWN_ACCEPT) or a close (1) from the own listener, reported
   when the batch is full or old, as closes are in master dispatch. */
static void note_own(uint64_t what) {
    uint64_t x = atomic_fetch_add(&own_pending, what) + what;
    if ((x >> 32) + (x & 0xffffffffULL) >= CLOSE_BATCH ||
        now_ms() - atomic_load_explicit(&last_flush_ms, memory_order_relaxed) >= CLOSE_MAX_AGE_MS)
        flush_closes();
}

static inline int kind_of(int fd) {
    return (fd >= 0 && fd < MAX_FDS) ? atomic_load_explicit(&kinds[fd], memory_order_acquire)
                                     : K_NONE;
}

static inline void set_kind(int fd, int k) {
    if (fd >= 0 && fd < MAX_FDS)
        atomic_store_explicit(&kinds[fd], (unsigned char)k, memory_order_release);
}

static struct listener *listener_of(int fd) {
    for (int i = 0; i < MAX_LISTENERS; i++)
        if (atomic_load(&listeners[i].fd) == fd)
            return &listeners[i];
    return NULL;
}

static struct listener *listener_add(int fd, const struct sockaddr *addr, socklen_t len) {
    for (int i = 0; i < MAX_LISTENERS; i++) {
        int free_slot = -1;
        if (atomic_compare_exchange_strong(&listeners[i].fd, &free_slot, fd)) {
            if (len > sizeof listeners[i].addr)
                len = sizeof listeners[i].addr;
            memcpy(&listeners[i].addr, addr, len);
            listeners[i].len = len;
            return &listeners[i];
        }
    }
    return NULL;
}

static void listener_forget(int fd) {
    struct listener *l = listener_of(fd);
    if (l)
        atomic_store(&l->fd, -1);
}

/* ------------------------------------------------------------ claiming */

/* The first listen() on the port: the channel moves to a high fd of its
   own (CLOEXEC, so the server's children never see it) and the variables
   that would make a child try to claim it are removed. */
static void claim(void) {
    int expected = 0;
    if (!atomic_compare_exchange_strong(&claimed, &expected, 1))
        return;
    int old = atomic_load(&chan);
    int high = real_fcntl(old, F_DUPFD_CLOEXEC, 1000);
    if (high >= 0) {
        atomic_store(&chan, high);
        real_close(old);
    }
    atomic_store(&claimer, getpid());
    if (preload_fd >= 0)
        real_fcntl(preload_fd, F_SETFD, FD_CLOEXEC);
    /* Rare race with getenv on other threads; claiming happens at startup. */
    unsetenv("LB_FD");
    unsetenv("LB_SHIM_PORT");
    unsetenv("LB_SHIM_FD");
    unsetenv("LB_STOP_SIGNAL");
    unsetenv("LB_PROTOCOL");
    unsetenv("LB_REPORT_CLOSED");
    if (own_listener)
        unsetenv("LB_OWN_LISTENER");
    unsetenv("LD_PRELOAD");
}

static int port_of(const struct sockaddr *addr, socklen_t len) {
    if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in))
        return ntohs(((const struct sockaddr_in *)addr)->sin_port);
    if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6))
        return ntohs(((const struct sockaddr_in6 *)addr)->sin6_port);
    return -1;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    if (!real_bind)
        resolve_all();
    if (active && addr && port_of(addr, len) == shim_port) {
        int type = 0;
        socklen_t tl = sizeof type;
        if (real_getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && type == SOCK_STREAM &&
            listener_add(fd, addr, len)) {
            /* lb owns the port: the socket is only recorded here. */
            set_kind(fd, K_BOUND);
            return 0;
        }
    }
    return real_bind(fd, addr, len);
}

/* ------------------------------------------------------------ kernel dispatch */

/* One line on the server's stderr, which lb logs as the worker's. */
static void complain(const char *what, long a, long b) {
    int saved = errno;
    char line[512], why[400];
    snprintf(why, sizeof why, what, a, b);
    int n = snprintf(line, sizeof line, "lb accept shim: listen() on port %d fails: %s\n",
                     shim_port, why);
    if (n > 0)
        (void)!write(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    errno = saved;
}

/* The LISTENER lb sends first under kernel dispatch: its fd, or -1 (the
   server's listen() then fails) when anything else comes, or nothing. */
static int receive_listener(int c) {
    long deadline = now_ms() + LISTENER_WAIT_MS;
    for (;;) {
        long left = deadline - now_ms();
        struct pollfd p = {c, POLLIN, 0};
        int r = left > 0 ? real_poll(&p, 1, (int)left) : 0;
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            complain("no LISTENER from lb in %ld ms (does another process of this server "
                     "listen on the port too?)",
                     LISTENER_WAIT_MS, 0);
            errno = EADDRNOTAVAIL;
            return -1;
        }
        unsigned char buf[MAX_MESSAGE];
        int got[4], ngot = 0, ctrunc = 0;
        /* Not blocking: another process may have read what poll saw. */
        ssize_t n = recv_with_fds(c, buf, sizeof buf, got, 4, &ngot, &ctrunc);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0) {
            complain(n == 0 ? "lb closed the channel before it sent the listener"
                            : "reading lb's channel failed (errno %ld)",
                     (long)errno, 0);
            errno = EADDRNOTAVAIL;
            return -1;
        }
        int kind = n >= HEADER_LEN && buf[0] == LB_VERSION ? buf[1] : -1;
        int type = 0, acc = 0;
        socklen_t tl = sizeof type, al = sizeof acc;
        if (kind == KIND_LISTENER && ngot == 1 && !ctrunc &&
            real_getsockopt(got[0], SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && type == SOCK_STREAM &&
            real_getsockopt(got[0], SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) == 0 && acc)
            return got[0];
        for (int i = 0; i < ngot; i++)
            real_close(got[i]);
        complain("lb's first message was kind %ld with %ld fds, not a LISTENER with one listening "
                 "TCP socket",
                 kind, ngot);
        errno = EPROTO;
        return -1;
    }
}

/* Under kernel dispatch no message carries connections, so a thread of
   the claiming process waits for DRAIN (answered with STOP, as the accept
   path does in master dispatch) and for the master's end (the server is
   stopped, once). It blocks every signal, so the server's handlers run on
   its own threads. */
static void *watch_channel(void *unused) {
    (void)unused;
    for (;;) {
        /* Read each time: a dup2 onto its number moves the channel. */
        int c = atomic_load(&chan);
        struct pollfd p = {c, POLLIN, 0};
        if (real_poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        unsigned char buf[MAX_MESSAGE];
        int none, ctrunc = 0;
        /* (None is expected after the LISTENER: any fd is closed.) */
        ssize_t n = recv_with_fds(c, buf, sizeof buf, &none, 0, &none, &ctrunc);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return NULL;
        }
        if (n == 0) {
            if (!atomic_exchange(&eof_seen, 1))
                stop_server();
            return NULL;
        }
        if (n >= HEADER_LEN && buf[0] == LB_VERSION && buf[1] == KIND_DRAIN &&
            !atomic_exchange(&drain_seen, 1)) {
            flush_closes();
            if (send_kind(KIND_STOP, 0) != 0)
                stop_server();
        }
    }
}

static void start_watching(void) {
    static _Atomic int started;
    if (atomic_exchange(&started, 1))
        return;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_t t;
    int ok = pthread_attr_init(&attr) == 0;
    if (ok) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        ok = pthread_create(&t, &attr, watch_channel, NULL) == 0;
        pthread_attr_destroy(&attr);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!ok) {
        static const char line[] = "lb accept shim: no thread to read lb's channel: DRAIN will "
                                   "not reach the server (lb stops it at its drain timeout)\n";
        (void)!write(2, line, sizeof line - 1);
    }
}

/* An own listener this process already holds (a second listen() on the
   port: IPv4 and IPv6, or nginx's `reuseport` per worker), or -1. */
static int own_listener_fd(void) {
    for (int i = 0; i < MAX_FDS; i++)
        if (atomic_load_explicit(&kinds[i], memory_order_relaxed) == K_OWN)
            return i;
    return -1;
}

/* Follows epoll_ctl on a bound, not yet listening socket (start-up only). */
static void note_early(int epfd, int op, int fd, const struct epoll_event *ev) {
    for (int i = 0; i < MAX_EARLY_REGS; i++) {
        int ep = atomic_load(&early_regs[i].epfd);
        if (ep == epfd && early_regs[i].fd == fd) {
            if (op == EPOLL_CTL_MOD && ev)
                early_regs[i].ev = *ev;
            else if (op == EPOLL_CTL_DEL || op == EPOLL_CTL_ADD)
                atomic_store(&early_regs[i].epfd, -1);
            if (op != EPOLL_CTL_ADD)
                return;
        }
    }
    if (op != EPOLL_CTL_ADD || !ev)
        return;
    for (int i = 0; i < MAX_EARLY_REGS; i++) {
        int free_slot = -1;
        if (atomic_compare_exchange_strong(&early_regs[i].epfd, &free_slot, -2)) {
            early_regs[i].fd = fd;
            early_regs[i].ev = *ev;
            atomic_store(&early_regs[i].epfd, epfd);
            return;
        }
    }
}

/* Registers the new listener at `fd` where the socket it replaced was
   (`again`), or only forgets those registrations (the socket closed). */
static void redo_early(int fd, int again) {
    for (int i = 0; i < MAX_EARLY_REGS; i++) {
        int ep = atomic_load(&early_regs[i].epfd);
        if (ep < 0 || early_regs[i].fd != fd ||
            !atomic_compare_exchange_strong(&early_regs[i].epfd, &ep, -1))
            continue;
        struct epoll_event ev = early_regs[i].ev;
        if (again && real_epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0)
            reg_add(ep, fd, atomic_load(&self_pid));
    }
}

/* listen() under kernel dispatch: the worker's own listener takes the
   server's socket's fd number, with the server's O_NONBLOCK and CLOEXEC,
   and from then on the kernel serves accept and readiness on it. */
static int listen_own(int fd, int fl, int fdfl) {
    int first = !atomic_exchange(&own_received, 1);
    int own = first ? receive_listener(atomic_load(&chan)) : own_listener_fd();
    if (own < 0) {
        if (first)
            atomic_store(&own_received, 0);
        else {
            complain("this process closed the listener lb gave it", 0, 0);
            errno = EADDRNOTAVAIL;
        }
        return -1;
    }
    /* Its file status flags are shared with lb's copy, which never accepts. */
    int ofl = real_fcntl(own, F_GETFL);
    if (fl >= 0 && ofl >= 0)
        real_fcntl(own, F_SETFL, (ofl & ~O_NONBLOCK) | (fl & O_NONBLOCK));
    if (real_dup3(own, fd, (fdfl >= 0 && (fdfl & FD_CLOEXEC)) ? O_CLOEXEC : 0) < 0) {
        int e = errno;
        if (first) {
            real_close(own);
            atomic_store(&own_received, 0);
        }
        errno = e;
        return -1;
    }
    /* No copy stays behind: when the server closes its listener (its
       graceful stop), what is queued there moves to the other workers. */
    if (first)
        real_close(own);
    set_kind(fd, K_OWN);
    redo_early(fd, 1);
    if (atomic_fetch_add(&open_listeners, 1) == 0) {
        send_kind(KIND_READY, READY_OWN_LISTENER);
        start_watching();
    }
    return 0;
}

int listen(int fd, int backlog) {
    if (!real_listen)
        resolve_all();
    int k = kind_of(fd);
    if (k == K_LISTENER || k == K_OWN)
        return 0; /* nginx listens twice to change the backlog (lb's, with --backlog) */
    if (k != K_BOUND)
        return real_listen(fd, backlog);
    int saved = errno;
    int fl = real_fcntl(fd, F_GETFL);
    int fdfl = real_fcntl(fd, F_GETFD);
    claim();
    if (own_listener) {
        if (listen_own(fd, fl, fdfl) != 0)
            return -1;
        errno = saved;
        return 0;
    }
    int c = atomic_load(&chan);
    /* The server's blocking mode goes to the channel's description. */
    int cfl = real_fcntl(c, F_GETFL);
    if (fl >= 0 && cfl >= 0)
        real_fcntl(c, F_SETFL, (cfl & ~O_NONBLOCK) | (fl & O_NONBLOCK));
    if (real_dup3(c, fd, (fdfl >= 0 && (fdfl & FD_CLOEXEC)) ? O_CLOEXEC : 0) < 0)
        return -1;
    set_kind(fd, K_LISTENER);
    if (atomic_fetch_add(&open_listeners, 1) == 0)
        send_kind(KIND_READY, READY_PEER_ADDRESS);
    errno = saved;
    return 0;
}

/* ------------------------------------------------------------ accepting */

/* Keeps errno (the accept and getpeername paths do). */
static uint64_t cookie_of(int fd) {
    int saved = errno;
    uint64_t c = 0;
    socklen_t l = sizeof c;
    if (real_getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l) != 0)
        c = 0;
    errno = saved;
    return c;
}

/* The client's address in a CONN's payload ("a.b.c.d:port", "[v6]:port"),
   in the family of the server's socket, as the kernel would give it: an
   IPv4 client of an IPv6 socket v4-mapped, a v4-mapped client of an IPv4
   socket unmapped; an IPv6 client of an IPv4 socket has no such form
   (servers size the buffer by their socket's family), so it is none.
   Its length, or 0 for none (also: empty, or not an address; the
   connection is served all the same, with the socket's own peer).
   inet_pton is pure computation (no allocation, no locks) in glibc and
   musl. */
static socklen_t peer_of_payload(const unsigned char *p, size_t n, int family,
                                 union peer_addr *out) {
    char text[64];
    if (n == 0 || n >= sizeof text)
        return 0;
    memcpy(text, p, n);
    text[n] = 0;
    char *colon = strrchr(text, ':');
    if (strlen(text) != n || !colon || !colon[1])
        return 0;
    long port = 0;
    for (const char *d = colon + 1; *d; d++) {
        if (*d < '0' || *d > '9' || (port = port * 10 + (*d - '0')) > 65535)
            return 0;
    }
    *colon = 0;
    memset(out, 0, sizeof *out);
    if (text[0] == '[') {
        size_t hl = strlen(text);
        if (hl < 3 || text[hl - 1] != ']')
            return 0;
        text[hl - 1] = 0;
        struct in6_addr v6;
        if (inet_pton(AF_INET6, text + 1, &v6) != 1)
            return 0;
        if (family == AF_INET) {
            if (!IN6_IS_ADDR_V4MAPPED(&v6))
                return 0;
            out->in.sin_family = AF_INET;
            out->in.sin_port = htons((uint16_t)port);
            memcpy(&out->in.sin_addr, &v6.s6_addr[12], 4);
            return sizeof out->in;
        }
        out->in6.sin6_addr = v6;
        out->in6.sin6_family = AF_INET6;
        out->in6.sin6_port = htons((uint16_t)port);
        return sizeof out->in6;
    }
    struct in_addr v4;
    if (inet_pton(AF_INET, text, &v4) != 1)
        return 0;
    if (family == AF_INET6) {
        out->in6.sin6_family = AF_INET6;
        out->in6.sin6_port = htons((uint16_t)port);
        out->in6.sin6_addr.s6_addr[10] = 0xff;
        out->in6.sin6_addr.s6_addr[11] = 0xff;
        memcpy(&out->in6.sin6_addr.s6_addr[12], &v4, sizeof v4);
        return sizeof out->in6;
    }
    out->in.sin_family = AF_INET;
    out->in.sin_port = htons((uint16_t)port);
    out->in.sin_addr = v4;
    return sizeof out->in;
}

/* The socket's family (SO_DOMAIN); keeps errno. */
static int domain_of(int fd) {
    int saved = errno;
    int d = AF_UNSPEC;
    socklen_t l = sizeof d;
    if (real_getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &d, &l) != 0)
        d = AF_UNSPEC;
    errno = saved;
    return d;
}

/* 127.0.0.1 or ::1, port 0; its length. */
static socklen_t loopback(int family, union peer_addr *out) {
    memset(out, 0, sizeof *out);
    if (family == AF_INET6) {
        out->in6.sin6_family = AF_INET6;
        out->in6.sin6_addr = in6addr_loopback;
        return sizeof out->in6;
    }
    out->in.sin_family = AF_INET;
    out->in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sizeof out->in;
}

/* As the kernel fills an address out-parameter: truncated to the room
   given, the full length told. */
static void give_addr(const union peer_addr *a, socklen_t len, struct sockaddr *addr,
                      socklen_t *alen) {
    memcpy(addr, a, *alen < len ? *alen : len);
    *alen = len;
}

static void forget_peer(int fd) {
    /* Loaded first: closes of fds that never had one write nothing. */
    if (fd >= 0 && fd < MAX_FDS && atomic_load_explicit(&peers_used, memory_order_relaxed) &&
        atomic_load_explicit(&peers[fd].len, memory_order_relaxed))
        atomic_store_explicit(&peers[fd].len, 0, memory_order_relaxed);
}

/* getpeername() of a connection whose CONN carried the client's address. */
static int answer_peer(int fd, struct sockaddr *addr, socklen_t *alen) {
    if (fd < 0 || fd >= MAX_FDS || !addr || !alen ||
        !atomic_load_explicit(&peers_used, memory_order_relaxed))
        return 0;
    socklen_t len = atomic_load_explicit(&peers[fd].len, memory_order_acquire);
    if (!len || peers[fd].cookie != cookie_of(fd))
        return 0;
    give_addr(&peers[fd].addr, len, addr, alen);
    return 1;
}

/* One connection from the channel, with the caller's accept4 flags. */
static int take_conn(int lfd, struct sockaddr *addr, socklen_t *alen, int flags) {
    flush_closes();
    if (!room_for_a_conn()) {
        errno = EMFILE;
        return -1;
    }
    for (;;) {
        unsigned char buf[MAX_MESSAGE];
        union {
            struct cmsghdr h;
            char space[CMSG_SPACE(4 * sizeof(int))];
        } cm;
        struct iovec iov = {buf, sizeof buf};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cm.space;
        msg.msg_controllen = sizeof cm.space;
        ssize_t n = recvmsg(lfd, &msg, (flags & SOCK_CLOEXEC) ? MSG_CMSG_CLOEXEC : 0);
        if (n < 0)
            return -1; /* EAGAIN, EINTR, timeouts: the caller's flags decide */
        if (n == 0) {
            /* The master is gone: make the server stop, once, instead of
               letting a level-triggered loop spin on EOF. This process too,
               when it is not the claimer: a prefork child that dropped its
               privileges cannot signal its master, or outlived it. */
            if (!atomic_exchange(&eof_seen, 1)) {
                stop_server();
                if (atomic_load(&claimer) != getpid())
                    kill(getpid(), stop_signal);
            }
            errno = ECONNABORTED;
            return -1;
        }
        int got[4], ngot = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int cnt = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < cnt; i++) {
                    int f;
                    memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
                    if (ngot < 4)
                        got[ngot++] = f;
                    else
                        real_close(f);
                }
            }
        int is_conn = n >= HEADER_LEN && buf[0] == LB_VERSION && buf[1] == KIND_CONN;
        if (!is_conn || ngot != 1) {
            for (int i = 0; i < ngot; i++)
                real_close(got[i]);
            if (is_conn && ngot == 0 && (msg.msg_flags & MSG_CTRUNC)) {
                /* The kernel could not give us the fd and closed it: the
                   client is gone, and least-conn must hear of it. */
                if (reports)
                    atomic_fetch_add(&closes_pending, 1);
                errno = EMFILE;
                return -1;
            }
            /* DRAIN comes after every connection sent before it, so the
               server has taken them all when it is asked to stop. The
               master sends the signal (this may be a child that dropped
               the privileges to signal its parent, as nginx's workers do);
               only if it cannot be asked does the shim try itself. */
            if (n >= HEADER_LEN && buf[0] == LB_VERSION && buf[1] == KIND_DRAIN &&
                !atomic_exchange(&drain_seen, 1) && send_kind(KIND_STOP, 0) != 0)
                stop_server();
            continue; /* USER, anything else: not a connection */
        }
        int fd = got[0];
        /* The master hands over non-blocking sockets: clear it for
           callers that did not ask for it (plain accept()). */
        if (!(flags & SOCK_NONBLOCK)) {
            int off = 0;
            ioctl(fd, FIONBIO, &off);
        }
        struct listener *l = listener_of(lfd);
        int family = l ? l->addr.ss_family : AF_UNSPEC;
        union peer_addr client;
        socklen_t clen = peer_of_payload(buf + HEADER_LEN, (size_t)n - HEADER_LEN, family,
                                         &client);
        socklen_t room = alen ? *alen : 0;
        int peer_known = 0; /* getpeername filled addr */
        if (addr && alen) {
            if (clen)
                give_addr(&client, clen, addr, alen);
            else
                peer_known = real_getpeername(fd, addr, alen) == 0;
        }
        /* From one of lb's Unix listeners, for a server that listened on
           TCP: its peer would be AF_UNIX, which such servers misread
           (Python's http.server fails the request on the empty path;
           redis's protected mode refuses the "non-local" client). It is
           given as what it is, a client on this host: loopback in the
           server's family, port 0. */
        /* (When getpeername failed, a client already gone, the caller's
           buffer says nothing: the socket's own domain decides.) */
        if (!clen && (family == AF_INET || family == AF_INET6) &&
            (peer_known && room >= sizeof(sa_family_t) ? addr->sa_family == AF_UNIX
                                                       : domain_of(fd) == AF_UNIX)) {
            clen = loopback(family, &client);
            if (addr && alen) {
                *alen = room; /* (getpeername told the AF_UNIX length) */
                give_addr(&client, clen, addr, alen);
            }
        }
        if (fd < MAX_FDS) { /* a number last closed behind the shim's back */
            atomic_store(&conn_ep[fd], 0);
            if (clen) {
                atomic_store_explicit(&peers_used, 1, memory_order_relaxed);
                atomic_store_explicit(&peers[fd].len, 0, memory_order_relaxed);
                peers[fd].addr = client;
                peers[fd].cookie = cookie_of(fd);
                atomic_store_explicit(&peers[fd].len, clen, memory_order_release);
            } else {
                forget_peer(fd);
            }
        }
        set_kind(fd, K_CONN);
        atomic_fetch_add(&open_conns, 1);
        return fd;
    }
}

/* A connection the kernel's accept returned from the own listener: counted
   for ACCEPTED and its close for CLOSED, when least-connections reads them
   (an fd beyond the tracked ones is not counted at all). Keeps errno. */
static int accepted_own(int fd) {
    if (fd >= 0 && fd < MAX_FDS && reports) {
        set_kind(fd, K_ACCEPTED);
        note_own(OWN_ACCEPT);
    }
    return fd;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *alen, int flags) {
    if (!real_accept4)
        resolve_all();
    int k = kind_of(fd);
    if (k == K_LISTENER)
        return take_conn(fd, addr, alen, flags);
    if (k == K_OWN)
        return accepted_own(real_accept4(fd, addr, alen, flags));
    return real_accept4(fd, addr, alen, flags);
}

int accept(int fd, struct sockaddr *addr, socklen_t *alen) {
    if (!real_accept)
        resolve_all();
    int k = kind_of(fd);
    if (k == K_LISTENER)
        return take_conn(fd, addr, alen, 0);
    if (k == K_OWN)
        return accepted_own(real_accept(fd, addr, alen));
    return real_accept(fd, addr, alen);
}

/* ------------------------------------------------------------ closing */

/* Registrations beyond the per-fd slots. Lock-free: a slot is taken by
   swapping its epfd from -1 (free) to -2 (being filled). */
static int reg_add(int epfd, int fd, pid_t pid) {
    for (int i = 0; i < MAX_REGS; i++) {
        int free_slot = -1;
        if (atomic_compare_exchange_strong(&regs[i].epfd, &free_slot, -2)) {
            regs[i].fd = fd;
            regs[i].pid = pid;
            atomic_store(&regs[i].epfd, epfd);
            return 1;
        }
    }
    return 0; /* full: that registration is not removed before close */
}

/* Forgets `fd`'s registration in `epfd` (every one of `fd`'s when epfd is
   -1), removing it from its set first when `del`; how many there were. */
static int reg_drop(int epfd, int fd, pid_t pid, int del) {
    int n = 0;
    for (int i = 0; i < MAX_REGS; i++) {
        int ep = atomic_load(&regs[i].epfd);
        if (ep >= 0 && (epfd < 0 || ep == epfd) && regs[i].fd == fd && regs[i].pid == pid &&
            atomic_compare_exchange_strong(&regs[i].epfd, &ep, -1)) {
            if (del)
                real_epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            n++;
        }
    }
    return n;
}

/* A vfork child (CPython's subprocess, say, which then sweeps its fds with
   close_range) would share our memory and epoll sets while having fds of
   its own, and its closes would change what is ours. So vfork() is fork()
   here: the child gets copies (and the fork handler), at the price of
   copying the page tables once per child, instead of a getpid on every
   close. (posix_spawn's child runs none of these hooks.) */
pid_t vfork(void) {
    return fork();
}

/* Removes a handed-over connection from the epoll sets this process added
   it to, as its close would if lb held no copy. */
static void unregister_conn(int fd) {
    int ep = fd < MAX_FDS ? atomic_exchange(&conn_ep[fd], 0) : 0;
    if (ep)
        real_epoll_ctl(ep - 1, EPOLL_CTL_DEL, fd, NULL);
    if (atomic_load(&conn_extra_regs))
        atomic_fetch_sub(&conn_extra_regs, reg_drop(-1, fd, atomic_load(&self_pid), 1));
}

/* What closing the tracked `fd` (of kind `k`) means to the shim; called
   before the real close, in this process (not a vfork child), so the
   number is still ours until then and a concurrent accept cannot reuse
   it. Keeps errno. */
static void drop_tracked(int fd, int k) {
    int saved = errno;
    if (k == K_CONN) {
        unregister_conn(fd);
        forget_peer(fd);
        set_kind(fd, K_NONE);
        atomic_fetch_sub(&open_conns, 1);
        if (reports &&
            (atomic_fetch_add(&closes_pending, 1) + 1 >= CLOSE_BATCH ||
             now_ms() - atomic_load_explicit(&last_flush_ms, memory_order_relaxed) >=
                 CLOSE_MAX_AGE_MS))
            flush_closes();
    } else if (k == K_ACCEPTED) {
        /* The kernel's own socket, held by nobody else: its close ends
           its epoll registrations by itself. */
        set_kind(fd, K_NONE);
        note_own(1);
    } else {
        set_kind(fd, K_NONE);
        pid_t me = atomic_load(&self_pid);
        if (k == K_LISTENER || k == K_OWN) {
            /* The channel (or lb's copy of an own listener) outlives this
               fd: a registration left in an epoll set would keep reporting
               it (stale events). Only the process that registered removes
               it: a fork child shares the set. */
            reg_drop(-1, fd, me, 1);
            if (me == atomic_load(&claimer) && atomic_fetch_sub(&open_listeners, 1) == 1) {
                flush_closes();
                send_kind(KIND_LEAVING, 0);
            }
        }
        if (k == K_BOUND && own_listener)
            redo_early(fd, 0);
        listener_forget(fd);
    }
    errno = saved;
}

static void forget(int fd) {
    int k = kind_of(fd);
    if (k != K_NONE)
        drop_tracked(fd, k);
}

int close(int fd) {
    if (!real_close)
        resolve_all();
    if (active && fd == atomic_load(&chan) && fd >= 0) {
        errno = EBADF; /* the shim's own channel is not the server's to close */
        return -1;
    }
    if (active) {
        forget(fd);
        forget_peer(fd); /* also a fork child's, whose kinds were reset */
    }
    return real_close(fd);
}

/* A dup of a listener is a listener (and a dup onto a tracked fd closes it). */
static int track_dup(int oldfd, int newfd) {
    if (newfd < 0)
        return newfd;
    int k = kind_of(oldfd);
    if (k == K_LISTENER || k == K_BOUND || k == K_OWN) {
        struct listener *l = listener_of(oldfd);
        if (l)
            listener_add(newfd, (struct sockaddr *)&l->addr, l->len);
        set_kind(newfd, k);
        if ((k == K_LISTENER || k == K_OWN) && atomic_load(&self_pid) == atomic_load(&claimer))
            atomic_fetch_add(&open_listeners, 1);
    }
    return newfd;
}

/* Before `oldfd` is dup'ed onto `newfd`: the channel moves off that
   number, and a tracked fd there is closed. Only when the dup will work
   (oldfd is open), and not in a vfork child (its fds are its own). */
static void before_dup_onto(int oldfd, int newfd) {
    if (!active || oldfd == newfd)
        return;
    int k = kind_of(newfd);
    int is_chan = newfd == atomic_load(&chan);
    if ((k == K_NONE && !is_chan) || real_fcntl(oldfd, F_GETFD) < 0)
        return;
    if (is_chan) {
        int high = real_fcntl(newfd, F_DUPFD_CLOEXEC, 1000);
        if (high >= 0)
            atomic_store(&chan, high);
    }
    if (k != K_NONE)
        drop_tracked(newfd, k);
}

int dup(int fd) {
    if (!real_dup)
        resolve_all();
    return track_dup(fd, real_dup(fd));
}

int dup2(int oldfd, int newfd) {
    if (!real_dup2)
        resolve_all();
    before_dup_onto(oldfd, newfd);
    return track_dup(oldfd, real_dup2(oldfd, newfd));
}

int dup3(int oldfd, int newfd, int flags) {
    if (!real_dup3)
        resolve_all();
    before_dup_onto(oldfd, newfd);
    return track_dup(oldfd, real_dup3(oldfd, newfd, flags));
}

static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, va_list ap) {
    /* Every fcntl argument is an int or a pointer, passed as a long. */
    long arg = va_arg(ap, long);
    int r = real(fd, cmd, arg);
    if (active && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC))
        return track_dup(fd, r);
    return r;
}

int fcntl(int fd, int cmd, ...) {
    if (!real_fcntl)
        resolve_all();
    va_list ap;
    va_start(ap, cmd);
    int r = fcntl_common(real_fcntl, fd, cmd, ap);
    va_end(ap);
    return r;
}

int fcntl64(int fd, int cmd, ...) {
    if (!real_fcntl64)
        resolve_all();
    va_list ap;
    va_start(ap, cmd);
    int r = fcntl_common(real_fcntl64, fd, cmd, ap);
    va_end(ap);
    return r;
}

static int do_close_range(unsigned first, unsigned last, int flags) {
    if (real_close_range)
        return real_close_range(first, last, flags);
    return (int)real_syscall(SYS_close_range, first, last, flags);
}

/* Daemons sweep their fds at startup: the sweep goes around the channel. */
static int sweep(unsigned first, unsigned last, int flags) {
    unsigned top = last < MAX_FDS ? last : MAX_FDS - 1;
    if (active && !(flags & CLOSE_RANGE_CLOEXEC))
        for (unsigned f = first; f <= top; f++) {
            int k = kind_of((int)f);
            if (k != K_NONE)
                drop_tracked((int)f, k);
            forget_peer((int)f);
        }
    int c = atomic_load(&chan);
    if (!active || c < 0 || (unsigned)c < first || (unsigned)c > last)
        return do_close_range(first, last, flags);
    int r = 0;
    if ((unsigned)c > first)
        r |= do_close_range(first, (unsigned)c - 1, flags);
    if ((unsigned)c < last)
        r |= do_close_range((unsigned)c + 1, last, flags);
    return r;
}

int close_range(unsigned first, unsigned last, int flags) {
    if (!real_close_range)
        resolve_all();
    return sweep(first, last, flags);
}

void closefrom(int lowfd) {
    if (!real_closefrom)
        resolve_all();
    if (lowfd < 0)
        lowfd = 0;
    sweep((unsigned)lowfd, ~0U, 0);
}

/* libuv (Node) closes with syscall(SYS_close); accepts can come this way too. */
long syscall(long number, ...) {
    if (!real_syscall)
        resolve_all();
    va_list ap;
    va_start(ap, number);
    long a[6];
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (active) {
        if (number == SYS_close)
            return close((int)a[0]);
        if (number == SYS_accept4)
            return accept4((int)a[0], (struct sockaddr *)a[1], (socklen_t *)a[2], (int)a[3]);
        if (number == SYS_accept)
            return accept((int)a[0], (struct sockaddr *)a[1], (socklen_t *)a[2]);
        if (number == SYS_close_range)
            return close_range((unsigned)a[0], (unsigned)a[1], (int)a[2]);
    }
    return real_syscall(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}

/* ------------------------------------------------------------ looking like a TCP listener */

int getsockname(int fd, struct sockaddr *addr, socklen_t *len) {
    if (!real_getsockname)
        resolve_all();
    int k = kind_of(fd);
    if ((k == K_LISTENER || k == K_BOUND) && addr && len) {
        struct listener *l = listener_of(fd);
        if (l) {
            socklen_t n = *len < l->len ? *len : l->len;
            memcpy(addr, &l->addr, n);
            *len = l->len;
            return 0;
        }
    }
    return real_getsockname(fd, addr, len);
}

int getpeername(int fd, struct sockaddr *addr, socklen_t *len) {
    if (!real_getpeername)
        resolve_all();
    if (kind_of(fd) == K_LISTENER) {
        errno = ENOTCONN;
        return -1;
    }
    if (active && answer_peer(fd, addr, len))
        return 0;
    return real_getpeername(fd, addr, len);
}

int setsockopt(int fd, int level, int name, const void *val, socklen_t len) {
    if (!real_setsockopt)
        resolve_all();
    if (kind_of(fd) == K_LISTENER) {
        /* A receive timeout means the same on the channel (timed accept);
           every other option is the master's listener's business. */
        if (level == SOL_SOCKET && name == SO_RCVTIMEO)
            return real_setsockopt(fd, level, name, val, len);
        return 0;
    }
    /* The reuseport group and its program are lb's: a server's own
       SO_REUSEPORT (nginx's `reuseport`) or BPF must not change them. */
    if (kind_of(fd) == K_OWN && level == SOL_SOCKET &&
        (name == SO_REUSEPORT || name == SO_REUSEADDR || name == SO_ATTACH_REUSEPORT_CBPF ||
         name == SO_ATTACH_REUSEPORT_EBPF || name == SO_DETACH_REUSEPORT_BPF))
        return 0;
    int saved = errno;
    int r = real_setsockopt(fd, level, name, val, len);
    /* A connection from one of lb's Unix listeners, which the server takes
       for TCP (its peer is given as loopback): TCP options mean nothing on
       it, and a server that checks them would drop it (nginx closes a
       keep-alive connection whose TCP_NODELAY fails). */
    if (r != 0 && errno == EOPNOTSUPP && level == IPPROTO_TCP && kind_of(fd) == K_CONN &&
        domain_of(fd) == AF_UNIX) {
        errno = saved;
        return 0;
    }
    return r;
}

int getsockopt(int fd, int level, int name, void *val, socklen_t *len) {
    if (!real_getsockopt)
        resolve_all();
    if (kind_of(fd) == K_LISTENER && val && len && *len >= sizeof(int)) {
        int v = 0;
        struct listener *l = listener_of(fd);
        if (level == SOL_SOCKET) {
            switch (name) {
            case SO_TYPE: v = SOCK_STREAM; break;
            case SO_DOMAIN: v = l ? l->addr.ss_family : AF_INET; break;
            case SO_PROTOCOL: v = IPPROTO_TCP; break;
            case SO_ACCEPTCONN: v = 1; break;
            case SO_RCVTIMEO: return real_getsockopt(fd, level, name, val, len);
            default: v = 0;
            }
        }
        memcpy(val, &v, sizeof v);
        *len = sizeof v;
        return 0;
    }
    return real_getsockopt(fd, level, name, val, len);
}

int shutdown(int fd, int how) {
    if (!real_shutdown)
        resolve_all();
    /* Threaded servers shut a listener down to wake their accept threads;
       on the shared channel that would cut every worker off. */
    if (kind_of(fd) == K_LISTENER)
        return 0;
    return real_shutdown(fd, how);
}

/* ------------------------------------------------------------ event loops */

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev) {
    if (!real_epoll_ctl)
        resolve_all();
    int r = real_epoll_ctl(epfd, op, fd, ev);
    if (r == 0 && own_listener && active && kind_of(fd) == K_BOUND)
        note_early(epfd, op, fd, ev);
    if (r != 0 || !active || (op != EPOLL_CTL_ADD && op != EPOLL_CTL_DEL))
        return r;
    int k = kind_of(fd);
    pid_t me = atomic_load(&self_pid);
    if (k == K_LISTENER || k == K_OWN) {
        if (op == EPOLL_CTL_ADD)
            reg_add(epfd, fd, me);
        else
            reg_drop(epfd, fd, me, 0);
    } else if (k == K_CONN) {
        /* A fork child forgot its parent's connections, so this process
           handed `fd` over to itself: `me` is right for it. */
        int mine = epfd + 1;
        if (op == EPOLL_CTL_ADD) {
            int none = 0;
            if (!atomic_compare_exchange_strong(&conn_ep[fd], &none, mine) &&
                reg_add(epfd, fd, me))
                atomic_fetch_add(&conn_extra_regs, 1);
        } else if (!atomic_compare_exchange_strong(&conn_ep[fd], &mine, 0) &&
                   atomic_load(&conn_extra_regs)) {
            atomic_fetch_sub(&conn_extra_regs, reg_drop(epfd, fd, me, 0));
        }
    }
    return r;
}

/* Close reports go out before the server sleeps, so they never wait for
   the next connection. */
#define BEFORE_BLOCKING() \
    do {                                              \
        if (atomic_load_explicit(&closes_pending, memory_order_relaxed) || \
            atomic_load_explicit(&own_pending, memory_order_relaxed))       \
            flush_closes();                           \
    } while (0)

int epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout) {
    if (!real_epoll_wait)
        resolve_all();
    BEFORE_BLOCKING();
    return real_epoll_wait(epfd, evs, max, timeout);
}

int epoll_pwait(int epfd, struct epoll_event *evs, int max, int timeout, const sigset_t *mask) {
    if (!real_epoll_pwait)
        resolve_all();
    BEFORE_BLOCKING();
    return real_epoll_pwait(epfd, evs, max, timeout, mask);
}

int epoll_pwait2(int epfd, struct epoll_event *evs, int max, const struct timespec *timeout,
                 const sigset_t *mask) {
    if (!real_epoll_pwait2)
        resolve_all();
    BEFORE_BLOCKING();
    return real_epoll_pwait2(epfd, evs, max, timeout, mask);
}

int poll(struct pollfd *fds, nfds_t n, int timeout) {
    if (!real_poll)
        resolve_all();
    BEFORE_BLOCKING();
    return real_poll(fds, n, timeout);
}

int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t len) {
    (void)len;
    return poll(fds, n, timeout);
}

int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *timeout, const sigset_t *mask) {
    if (!real_ppoll)
        resolve_all();
    BEFORE_BLOCKING();
    return real_ppoll(fds, n, timeout, mask);
}

int select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *timeout) {
    if (!real_select)
        resolve_all();
    BEFORE_BLOCKING();
    return real_select(n, r, w, e, timeout);
}

int pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *timeout,
            const sigset_t *mask) {
    if (!real_pselect)
        resolve_all();
    BEFORE_BLOCKING();
    return real_pselect(n, r, w, e, timeout, mask);
}
