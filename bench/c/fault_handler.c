/* A minimal userfaultfd page server, the yardstick of bench/restore.py's per-fault table.
 *
 * It speaks Firecracker's UFFD handshake (listen, accept, one message with the JSON regions
 * and the uffd), keeps the whole memory file in memory and answers each fault with one
 * UFFDIO_COPY of the faulting page, or of the WINDOW-byte aligned window around it, from a
 * poll loop. With "floor" it copies from one fixed buffer instead (no lookup at all: what the
 * kernel's side of a fault costs). It exits when the VM does, printing {"faults": N}.
 *
 *   fault_handler SOCKET MEMFILE WINDOW [floor]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_REGIONS 64
#define PAYLOAD 65536

struct region { uint64_t base, size, offset, page; };

static struct region regions[MAX_REGIONS];
static int nregions;

static void die(const char *what) { perror(what); exit(1); }

static uint64_t field(const char *obj, const char *key, uint64_t otherwise)
{
    const char *at = strstr(obj, key);
    const char *end = strchr(obj, '}');
    if (!at || (end && at > end))
        return otherwise;
    return strtoull(strchr(at, ':') + 1, NULL, 10);
}

static void parse_regions(const char *json)
{
    const char *obj = json;
    while ((obj = strchr(obj, '{')) && nregions < MAX_REGIONS) {
        struct region *r = &regions[nregions++];
        r->base = field(obj, "\"base_host_virt_addr\"", 0);
        r->size = field(obj, "\"size\"", 0);
        r->offset = field(obj, "\"offset\"", 0);
        r->page = field(obj, "\"page_size\"", field(obj, "\"page_size_kib\"", 4096));
        obj++;
    }
}

static int accept_vm(const char *path, int *uffd, pid_t *pid)
{
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    unlink(path);
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof(addr)) || listen(ls, 1))
        die("listen");
    int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    if (s < 0)
        die("accept");
    static char json[PAYLOAD];
    size_t got = 0;
    *uffd = -1;
    while (got < sizeof(json) - 1) {
        char control[CMSG_SPACE(4 * sizeof(int))];
        struct iovec iov = {.iov_base = json + got, .iov_len = sizeof(json) - 1 - got};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof(control)};
        ssize_t n = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
        if (n <= 0)
            break;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_type == SCM_RIGHTS && *uffd < 0)
                memcpy(uffd, CMSG_DATA(c), sizeof(int));
        got += (size_t)n;
        json[got] = 0;
        if (*uffd >= 0 && strrchr(json, ']'))
            break;
    }
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (*uffd < 0 || getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cred, &len))
        die("handshake");
    *pid = cred.pid;
    parse_regions(json);
    close(ls);
    return s;
}

static const struct region *find(uint64_t address)
{
    for (int i = 0; i < nregions; i++)
        if (address >= regions[i].base && address < regions[i].base + regions[i].size)
            return &regions[i];
    return NULL;
}

static int copy(int uffd, uint64_t dst, uint64_t src, uint64_t len)
{
    struct uffdio_copy c = {.dst = dst, .src = src, .len = len};
    return ioctl(uffd, UFFDIO_COPY, &c) == 0 ? 0 : errno;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    uint64_t window = strtoull(argv[3], NULL, 10);
    int floor = argc > 4 && strcmp(argv[4], "floor") == 0;
    int fd = open(argv[2], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st))
        die("memfile");
    uint8_t *data = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    for (off_t at = 0; at < st.st_size;) {  /* in memory, not in the page cache */
        ssize_t n = pread(fd, data + at, st.st_size - at, at);
        if (n <= 0)
            die("read memfile");
        at += n;
    }
    static uint8_t fixed[2 << 20];
    memset(fixed, 1, sizeof(fixed));
    int uffd;
    pid_t pid;
    accept_vm(argv[1], &uffd, &pid);
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0)
        die("pidfd_open");
    struct pollfd fds[2] = {{.fd = uffd, .events = POLLIN}, {.fd = pidfd, .events = POLLIN}};
    struct uffd_msg msgs[64];
    uint64_t faults = 0;
    for (;;) {
        if (poll(fds, 2, -1) < 0 && errno != EINTR)
            die("poll");
        if (fds[1].revents)
            break;
        ssize_t n = read(uffd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno == EAGAIN)
                continue;
            die("read uffd");
        }
        for (ssize_t k = 0; k < n / (ssize_t)sizeof(msgs[0]); k++) {
            if (msgs[k].event != UFFD_EVENT_PAGEFAULT)
                continue;
            faults++;
            uint64_t address = msgs[k].arg.pagefault.address;
            const struct region *r = find(address);
            if (!r)
                continue;
            uint64_t page = address & ~(r->page - 1), dst = page, len = r->page;
            if (window > r->page) {
                dst = r->base + ((page - r->base) & ~(window - 1));
                len = window < r->base + r->size - dst ? window : r->base + r->size - dst;
            }
            uint64_t src = floor ? (uint64_t)fixed : (uint64_t)data + r->offset + (dst - r->base);
            int err = copy(uffd, dst, src, len);
            if (err && len > r->page) {  /* part of the window was there: the page alone */
                src = floor ? (uint64_t)fixed : (uint64_t)data + r->offset + (page - r->base);
                err = copy(uffd, page, src, r->page);
            }
            while (err == EAGAIN)
                err = copy(uffd, page, floor ? (uint64_t)fixed
                           : (uint64_t)data + r->offset + (page - r->base), r->page);
            if (err == EEXIST) {
                struct uffdio_range wake = {.start = page, .len = r->page};
                ioctl(uffd, UFFDIO_WAKE, &wake);
            }
        }
    }
    printf("{\"faults\": %llu}\n", (unsigned long long)faults);
    return 0;
}
