/* LD_PRELOAD shim for the tests: every fsync/fdatasync takes SLOW_FSYNC_US microseconds more,
   as on a spinning disk or a slow network share; and, when SLOW_READ_UNDER names a folder,
   every read() of a file under it takes SLOW_READ_US more, as photos read from a slow share
   (SQLite reads with pread, so a ledger is not slowed). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void wait_for_the_disk(void) {
    const char *us = getenv("SLOW_FSYNC_US");
    usleep(us ? (useconds_t)atoi(us) : 20000);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    wait_for_the_disk();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    wait_for_the_disk();
    return real(fd);
}

ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real) real = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    const char *under = getenv("SLOW_READ_UNDER");
    if (under && *under) {
        char link[64], target[4096];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n > 0) {
            target[n] = 0;
            if (strncmp(target, under, strlen(under)) == 0) {
                const char *us = getenv("SLOW_READ_US");
                usleep(us ? (useconds_t)atoi(us) : 20000);
            }
        }
    }
    return real(fd, buf, count);
}
