/* The kernel's part of an install on a range registered MISSING|WP, without a fault and
 * without Python: ns per 4 KiB page of each way bench/write_tracking.py compares, installs
 * of RUN pages at a time (1: one page per fault; more: a fault-around window), PAGES pages
 * per round, best of ROUNDS. Prints one JSON object, {"<way>": ns, ...}.
 *
 *   wp_installs PAGES RUN ROUNDS
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static char *zeros, *data;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void copy(int fd, uint64_t at, const char *src, uint64_t len, uint64_t mode)
{
    struct uffdio_copy c = {.dst = at, .src = (uint64_t)src, .len = len, .mode = mode};
    if (ioctl(fd, UFFDIO_COPY, &c) != 0)
        die("UFFDIO_COPY");
}

static void zeropage(int fd, uint64_t at, uint64_t len)
{
    struct uffdio_zeropage z = {.range = {.start = at, .len = len}};
    if (ioctl(fd, UFFDIO_ZEROPAGE, &z) != 0)
        die("UFFDIO_ZEROPAGE");
}

static void protect(int fd, uint64_t at, uint64_t len, uint64_t mode)
{
    struct uffdio_writeprotect w = {.range = {.start = at, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_WRITEPROTECT, &w) != 0)
        die("UFFDIO_WRITEPROTECT");
}

enum { DATA, DATA_WP, ZERO, ZERO_COPY_WP, ZERO_THEN_WP, UNPROTECT, WAYS };
static const char *names[WAYS] = {
    "data: copy", "data: copy, MODE_WP", "zeros: zeropage (not protected)",
    "zeros: copy of zeros, MODE_WP", "zeros: zeropage then writeprotect",
    "resolve a WP fault: writeprotect mode 0",
};

static void install(int way, int fd, uint64_t at, uint64_t len)
{
    switch (way) {
    case DATA: copy(fd, at, data, len, 0); break;
    case DATA_WP: copy(fd, at, data, len, UFFDIO_COPY_MODE_WP); break;
    case ZERO: zeropage(fd, at, len); break;
    case ZERO_COPY_WP: copy(fd, at, zeros, len, UFFDIO_COPY_MODE_WP); break;
    case ZERO_THEN_WP:
        zeropage(fd, at, len);
        protect(fd, at, len, UFFDIO_WRITEPROTECT_MODE_WP);
        break;
    case UNPROTECT: protect(fd, at, len, 0); break;
    }
}

/* one round of `way` over `pages` fresh pages, `run` at a time: ns per page */
static double one_round(int way, uint64_t pages, uint64_t run)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(fd, UFFDIO_API, &api) != 0)
        die("UFFDIO_API");
    uint64_t size = pages * PAGE;
    char *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        die("mmap");
    struct uffdio_register reg = {.range = {.start = (uint64_t)base, .len = size},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING |
                                          UFFDIO_REGISTER_MODE_WP};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0)
        die("UFFDIO_REGISTER");
    if (way == UNPROTECT)  /* every page in, protected: what a WP fault finds */
        for (uint64_t k = 0; k < pages; k++)
            copy(fd, (uint64_t)base + k * PAGE, data, PAGE, UFFDIO_COPY_MODE_WP);
    int64_t began = now_ns();
    for (uint64_t k = 0; k < pages; k += run)
        install(way, fd, (uint64_t)base + k * PAGE, (pages - k < run ? pages - k : run) * PAGE);
    double ns = (double)(now_ns() - began) / (double)pages;
    munmap(base, size);
    close(fd);
    return ns;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: wp_installs PAGES RUN ROUNDS\n");
        return 2;
    }
    uint64_t pages = strtoull(argv[1], NULL, 10), run = strtoull(argv[2], NULL, 10);
    int rounds = atoi(argv[3]);
    if (pages == 0 || run == 0 || rounds <= 0) {
        fprintf(stderr, "wp_installs: PAGES, RUN and ROUNDS must be positive\n");
        return 2;
    }
    zeros = mmap(NULL, run * PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    data = mmap(NULL, run * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (zeros == MAP_FAILED || data == MAP_FAILED)
        die("mmap");
    for (uint64_t k = 0; k < run * PAGE; k++)
        data[k] = (char)(k * 131 + 7);
    double best[WAYS];
    for (int w = 0; w < WAYS; w++)
        best[w] = 1e18;
    for (int r = 0; r < rounds; r++)  /* the ways in rotation: the load hits each alike */
        for (int w = 0; w < WAYS; w++) {
            double ns = one_round(w, pages, run);
            best[w] = ns < best[w] ? ns : best[w];
        }
    printf("{");
    for (int w = 0; w < WAYS; w++)
        printf("%s\"%s\": %.0f", w ? ", " : "", names[w], best[w]);
    printf("}\n");
    return 0;
}
