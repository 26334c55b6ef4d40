/* The torture harness's fault layer: an LD_PRELOAD library in the children it starts, so that real
 * faults hit the real code's system calls (no mock of the file system).
 *
 * Only calls on paths under $TORTURE_PREFIX are touched:
 *   - write, pwrite, pwritev, fsync, fdatasync fail with EIO (probability $TORTURE_EIO per million calls)
 *     or ENOSPC ($TORTURE_ENOSPC per million);
 *   - write and pwrite write only part of their bytes ($TORTURE_SHORT per million): a short write is
 *     legal, callers must loop;
 *   - flock, unlink, rename and link first sleep up to $TORTURE_DELAY_US microseconds, which widens
 *     the windows between a check and an action that races between processes need (FoundationDB's
 *     "buggify").
 * Every injected fault is appended, one line, to $TORTURE_LOG. The random stream is seeded from
 * $TORTURE_SEED and the pid.
 *
 * Scripted, for what a short run (CI's slice) must meet every time, counted in operations under the
 * prefix (write, pwrite, pwritev, fsync, fdatasync, unlink, rename, link) from the process's first
 * write to a lock file (a ``.lock`` file in ``locks/``: from then on it holds its writer lock):
 *   - $TORTURE_FAIL_AT=k: the k-th such operation, if a write or fsync, fails with EIO (else the next
 *     write or fsync does);
 *   - $TORTURE_HOLD=n: the n-th such operation, or the unlink of a lock file (the release) if that
 *     comes first, creates $TORTURE_HOLD_FILE and waits there (at most $TORTURE_HOLD_S seconds, 60 by
 *     default) for the harness's kill -9: the process is sure to be alive, holding its lock, mid-job.
 * Build: cc -shared -fPIC -O2 -o faultshim.so faultshim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static const char *prefix;
static size_t prefix_len;
static long eio_ppm, enospc_ppm, short_ppm, delay_us;
static long fail_at, hold_at, hold_s, ops; /* scripted: operations counted once armed */
static const char *hold_file;
static int armed, failed, holding;
static uint64_t rng;
static int ready;

static void init(void) {
    if (ready) return;
    ready = 1;
    prefix = getenv("TORTURE_PREFIX");
    prefix_len = prefix ? strlen(prefix) : 0;
    const char *v;
    eio_ppm = (v = getenv("TORTURE_EIO")) ? atol(v) : 0;
    enospc_ppm = (v = getenv("TORTURE_ENOSPC")) ? atol(v) : 0;
    short_ppm = (v = getenv("TORTURE_SHORT")) ? atol(v) : 0;
    delay_us = (v = getenv("TORTURE_DELAY_US")) ? atol(v) : 0;
    fail_at = (v = getenv("TORTURE_FAIL_AT")) ? atol(v) : 0;
    hold_at = (v = getenv("TORTURE_HOLD")) ? atol(v) : 0;
    hold_s = (v = getenv("TORTURE_HOLD_S")) ? atol(v) : 60;
    hold_file = getenv("TORTURE_HOLD_FILE");
    rng = ((v = getenv("TORTURE_SEED")) ? strtoull(v, NULL, 10) : 1) * 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
}

static uint64_t next(void) { /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1DULL;
}

static int under(const char *path) { return prefix_len && path && strncmp(path, prefix, prefix_len) == 0; }

static int fd_under(int fd, char *buf, size_t n) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t k = readlink(link, buf, n - 1);
    if (k <= 0) return 0;
    buf[k] = 0;
    return under(buf);
}

static void log_fault(const char *what, const char *path) {
    const char *log = getenv("TORTURE_LOG");
    if (!log) return;
    char line[4200];
    int n = snprintf(line, sizeof line, "%d %s %s\n", (int)getpid(), what, path);
    int fd = (int)syscall(SYS_openat, AT_FDCWD, log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    syscall(SYS_write, fd, line, n > 0 && n < (int)sizeof line ? n : 0);
    syscall(SYS_close, fd);
}

/* 0: go on; else the errno to fail with. */
static int fault(int fd, const char *what) {
    init();
    if (!eio_ppm && !enospc_ppm) return 0;
    char path[4096];
    if (!fd_under(fd, path, sizeof path)) return 0;
    long r = (long)(next() % 1000000);
    if (r < eio_ppm) {
        log_fault(what, path);
        return EIO;
    }
    if (r < eio_ppm + enospc_ppm) {
        log_fault(what, path);
        return ENOSPC;
    }
    return 0;
}

static size_t shorten(int fd, size_t count) {
    if (!short_ppm || count < 2) return count;
    char path[4096];
    if (!fd_under(fd, path, sizeof path)) return count;
    if ((long)(next() % 1000000) >= short_ppm) return count;
    log_fault("short-write", path);
    return 1 + next() % (count - 1);
}

static void pause_at(const char *path) {
    init();
    if (delay_us > 0 && under(path)) {
        long us = (long)(next() % (uint64_t)delay_us);
        struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
        nanosleep(&ts, NULL);
    }
}

static void pause_fd(int fd) {
    init();
    char path[4096];
    if (delay_us > 0 && fd_under(fd, path, sizeof path)) pause_at(path);
}

static int scripted_on(void) {
    init();
    return fail_at || hold_at;
}

static int is_lock(const char *path) {
    size_t n = strlen(path);
    return under(path) && strstr(path + prefix_len, "/locks/") && n > 5 && strcmp(path + n - 5, ".lock") == 0;
}

/* A write to a lock file (tried: it may fail) arms the scripted count: the process holds its
 * writer lock (flock) from then on. */
static void arm(const char *path) {
    if (!armed && is_lock(path)) armed = 1;
}

/* Wait for the harness's kill -9 (see the top), after saying so in $TORTURE_HOLD_FILE. */
static void hold(const char *what, const char *path) {
    if (!holding) {
        holding = 1;
        if (hold_file) {
            char line[4200];
            int n = snprintf(line, sizeof line, "%d %s %s\n", (int)getpid(), what, path);
            int fd = (int)syscall(SYS_openat, AT_FDCWD, hold_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
            if (fd >= 0) {
                syscall(SYS_write, fd, line, n > 0 && n < (int)sizeof line ? n : 0);
                syscall(SYS_close, fd);
            }
        }
    }
    for (long i = 0; i < hold_s * 10; i++) { /* every thread that gets here waits */
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    hold_at = 0; /* not killed in time: go on (the step then ends with no kill, and the next forces one) */
    holding = 0;
}

/* One operation under the prefix, once armed: hold, or fail (EIO) a write or fsync, when scripted. */
static int scripted(const char *what, const char *path, int writes) {
    if (!armed || !under(path)) return 0;
    ops++;
    if (holding || (hold_at && (ops >= hold_at || (!writes && is_lock(path))))) hold(what, path);
    if (fail_at && !failed && writes && ops >= fail_at) {
        failed = 1;
        log_fault(what, path);
        return EIO;
    }
    return 0;
}

static int scripted_fd(int fd, const char *what, int writes) {
    char path[4096];
    if (!scripted_on() || !fd_under(fd, path, sizeof path)) return 0;
    return scripted(what, path, writes);
}

static void arm_fd(int fd) {
    char path[4096];
    if (scripted_on() && !armed && fd_under(fd, path, sizeof path)) arm(path);
}

static void scripted_path(const char *what, const char *path) {
    if (scripted_on()) scripted(what, path, 0);
}

#define REAL(name, ret, ...)                                                      \
    static ret (*real_##name)(__VA_ARGS__);                                       \
    if (!real_##name) real_##name = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name);

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write, ssize_t, int, const void *, size_t)
    int e = scripted_fd(fd, "write", 1);
    arm_fd(fd); /* after its count: the lock line's write is the count's start, not its first */
    if (!e) e = fault(fd, "write");
    if (e) {
        errno = e;
        return -1;
    }
    return real_write(fd, buf, shorten(fd, count));
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off) {
    REAL(pwrite64, ssize_t, int, const void *, size_t, off_t)
    int e = scripted_fd(fd, "pwrite", 1);
    arm_fd(fd); /* after its count: the lock line's write is the count's start, not its first */
    if (!e) e = fault(fd, "pwrite");
    if (e) {
        errno = e;
        return -1;
    }
    return real_pwrite64(fd, buf, shorten(fd, count), off);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t off) { return pwrite64(fd, buf, count, off); }

ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t off) {
    REAL(pwritev, ssize_t, int, const struct iovec *, int, off_t)
    int e = scripted_fd(fd, "pwritev", 1);
    arm_fd(fd); /* after its count: the lock line's write is the count's start, not its first */
    if (!e) e = fault(fd, "pwritev");
    if (e) {
        errno = e;
        return -1;
    }
    return real_pwritev(fd, iov, n, off);
}

int fsync(int fd) {
    REAL(fsync, int, int)
    int e = scripted_fd(fd, "fsync", 1);
    if (!e) e = fault(fd, "fsync");
    if (e) {
        errno = e;
        return -1;
    }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync, int, int)
    int e = scripted_fd(fd, "fdatasync", 1);
    if (!e) e = fault(fd, "fdatasync");
    if (e) {
        errno = e;
        return -1;
    }
    return real_fdatasync(fd);
}

int flock(int fd, int op) {
    REAL(flock, int, int, int)
    pause_fd(fd);
    return real_flock(fd, op);
}

int unlink(const char *path) {
    REAL(unlink, int, const char *)
    scripted_path("unlink", path);
    pause_at(path);
    return real_unlink(path);
}

int unlinkat(int dirfd, const char *path, int flags) {
    REAL(unlinkat, int, int, const char *, int)
    scripted_path("unlinkat", path);
    pause_at(path);
    return real_unlinkat(dirfd, path, flags);
}

int rename(const char *a, const char *b) {
    REAL(rename, int, const char *, const char *)
    scripted_path("rename", a);
    pause_at(a);
    return real_rename(a, b);
}

int renameat(int da, const char *a, int db, const char *b) {
    REAL(renameat, int, int, const char *, int, const char *)
    scripted_path("renameat", a);
    pause_at(a);
    return real_renameat(da, a, db, b);
}

int linkat(int da, const char *a, int db, const char *b, int flags) {
    REAL(linkat, int, int, const char *, int, const char *, int)
    scripted_path("linkat", a);
    pause_at(a);
    return real_linkat(da, a, db, b, flags);
}

int link(const char *a, const char *b) {
    REAL(link, int, const char *, const char *)
    scripted_path("link", a);
    pause_at(a);
    return real_link(a, b);
}
