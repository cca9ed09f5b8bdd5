/*
 * alloccount.c - LD_PRELOAD allocation counter for checking that the real
 * `lb` binary allocates nothing per connection (scripts/bench.sh).
 *
 * Counts malloc/calloc/realloc/memalign-family calls in the process it is
 * loaded into (all threads). On SIGWINCH (which lb leaves alone: it handles USR1 and USR2 itself) it writes the count, as decimal, to
 * the file named by ALLOC_COUNT_FILE. It removes LD_PRELOAD from the
 * environment at load, so lb's workers do not inherit it.
 *
 * gcc -O2 -shared -fPIC -o alloccount.so scripts/bench/alloccount.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static atomic_ulong count;
static char path[256];

void *malloc(size_t n) { atomic_fetch_add_explicit(&count, 1, memory_order_relaxed); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { atomic_fetch_add_explicit(&count, 1, memory_order_relaxed); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { atomic_fetch_add_explicit(&count, 1, memory_order_relaxed); return __libc_realloc(p, n); }
void free(void *p) { __libc_free(p); }
void *memalign(size_t a, size_t n) { atomic_fetch_add_explicit(&count, 1, memory_order_relaxed); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { return memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    void *p = memalign(a, n);
    if (!p) return 12; /* ENOMEM */
    *out = p;
    return 0;
}

/* Async-signal-safe: open, write, close and integer formatting only. */
static void dump(int sig) {
    (void)sig;
    char buf[32];
    int i = sizeof buf;
    unsigned long v = atomic_load(&count);
    buf[--i] = '\n';
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
        if (write(fd, buf + i, sizeof buf - (size_t)i) < 0) {}
        close(fd);
    }
}

__attribute__((constructor)) static void init(void) {
    const char *p = getenv("ALLOC_COUNT_FILE");
    if (!p) return;
    strncpy(path, p, sizeof path - 1);
    unsetenv("LD_PRELOAD");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = dump;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGWINCH, &sa, NULL);
}
