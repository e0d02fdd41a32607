/* Shared by the cffi declarations (cdef) and the C source: the state the Python side builds
 * (fcsnap/uffd/fastpath.py) and the hot loop reads and updates. Arrays point into numpy arrays
 * that the Python installer uses too, so both paths see one state. */

enum { FP_DONE = 0, FP_RETRY = 1, FP_GONE = 2, FP_DEFER = 3, FP_ERROR = 4, FP_EVENTS = 5,
       FP_IDLE = 6 };
/* adaptive fault-around: (end page, window pages) pairs per region, then the next slot */
enum { FP_STREAMS = 8 };
enum { FP_FAULTS = 0, FP_PAGES = 1, FP_ZERO_PAGES = 2, FP_INSTALLS = 3, FP_ALREADY = 4,
       FP_WP_FAULTS = 5 };
/* a fault's flags ride in its address's low bits (retry, defer, fp_fault): page-aligned */
enum { FP_FLAG_WRITE = 1, FP_FLAG_WP = 2, FP_FLAGS = 3 };
/* the written array's flags (writes.py) */
enum { FP_WRITTEN = 1, FP_REMOVED = 2 };
/* fault latency buckets: <= 2**k us for k < FP_LATENCY_BUCKETS - 1, then the rest (latency.py) */
enum { FP_LATENCY_BUCKETS = 22 };

struct fp_region {
    uint64_t base;
    uint64_t size;
    uint64_t offset;
    uint64_t page_size;
    uint64_t pages;
    uint8_t *present;
    uint8_t *removed;
    uint8_t *wanted;
    int64_t *streams;     /* FP_STREAMS (end, window) pairs and a cursor (faultaround.py) */
    int64_t wp;           /* registered for write-protect: installs the guest did not write
                             go in with UFFDIO_COPY_MODE_WP */
    uint8_t *written;     /* FP_WRITTEN per page the guest wrote; NULL: writes not recorded */
    uint8_t *pending;     /* 1 per page a background checkpoint has yet to copy: its WP
                             fault goes to Python, which keeps the page's pre-image first
                             (preimage.py); NULL: no such checkpoint possible */
};

struct fp_diff {
    uint64_t base;        /* the raw diff's mapping */
    uint64_t size;        /* its size when opened: a change means truncated */
    int fd;
    int fits;             /* the whole diff may stay mapped */
    int recent;           /* entries in ends */
    int64_t limit;        /* chunks that may be mapped at once */
    int64_t nchunks;
    uint8_t *chunks;      /* chunks copied from since the last drop */
    int64_t *counters;    /* [chunks in use, next slot in ends] */
    int64_t *ends;        /* where recent reads ended */
    uint64_t read_buffer; /* for scattered copies, read_below bytes */
    uint64_t read_below;
    /* A diff read through the host chunk cache (chunk_cache.py) instead of one mapping:
     * the address of each chunk's mapping, 0 while not mapped in this process (the fault
     * goes back to Python, which fetches, checks and maps it). Entries only ever go from
     * 0 to an address that stays valid while the diff is open. NULL: a local raw diff. */
    uint64_t *chunk_maps;
    int64_t chunk_shift;  /* log2 of the chunk size */
};

struct fp_ctx {
    int uffd;
    int nregions;
    struct fp_region *regions;
    int64_t nmappings;
    int64_t *starts;
    int64_t *storage;
    int64_t *owner;
    uint64_t memory_size;
    struct fp_diff *diffs;
    int64_t *per_owner;
    int64_t stats[8];
    uint64_t fault_around; /* fixed window, bytes; unused when adaptive_max > 0 */
    int64_t adaptive_max;  /* the largest adaptive window, pages; 0: fixed windows */
    int64_t first_fault_ns;
    void *messages;       /* struct uffd_msg[capacity] */
    int64_t capacity;
    int64_t nmessages;
    uint64_t *retry;
    int64_t nretry;
    uint64_t *defer;
    int64_t ndefer;
    uint64_t *record;      /* guest offsets of the pages faulted (restore --record-ws) */
    int64_t nrecord;
    int64_t record_capacity; /* 0: not recording */
    uint64_t error_dst;
    int64_t error_owner;
    int error_errno;
    uint64_t zeros;        /* zero bytes to copy from where zeros go in write-protected */
    uint64_t zeros_len;
    int64_t *latency;      /* FP_LATENCY_BUCKETS counts of the faults served, then their sum
                              in ns: the session's histogram (latency.py), shared with Python */
    int status;            /* fp_wait: the outcome of this uffd's last pump */
    int pumped;            /* fp_wait: pumped since Python last looked (its stats changed) */
    /* A background checkpoint's copy (preimage.py): where pre-images go, by memory-file
     * offset (0: none, pending pages' WP faults go to Python), the VM's pid to read them
     * from, and FP_KEPT pages kept / FP_KEEP_ERRNO the first read refused (Python's array) */
    uint64_t preimages;
    int64_t vm_pid;
    int64_t *preimage_counts;
};
enum { FP_KEPT = 0, FP_KEEP_ERRNO = 1 };

/* serve one fault: its page-aligned address with its FP_FLAG_* in the low bits */
int fp_fault(struct fp_ctx *c, uint64_t address);
/* n installs with DONTWAKE, in order: run k is len[k] bytes at dst[k], copied from src[k]
 * (UFFDIO_COPY), or zeros (UFFDIO_ZEROPAGE) where src[k] is 0. With wp, every install is
 * write-protected (UFFDIO_COPY_MODE_WP), zeros copied from zeros_len bytes at zeros. Returns
 * the runs done whole; at the first that fails, its errno in *err and the bytes of it
 * installed in *part */
int64_t fp_copy_runs(int uffd, const uint64_t *dst, const uint64_t *src, const uint64_t *len,
                     int64_t n, int wp, uint64_t zeros, uint64_t zeros_len, int *err,
                     int64_t *part);
/* read and serve what is pending on the uffd */
int fp_pump(struct fp_ctx *c);
/* a timerfd for fp_wait (CLOCK_MONOTONIC, non-blocking), or -errno */
int fp_timer(void);
/* one epoll wait over many sessions, with the GIL released: a ready fd whose entry in ctxs
 * (indexed by fd, nctxs long) is a ctx is that session's uffd and is pumped here, its outcome
 * kept in ctx->status; every other ready fd, and a pumped uffd whose outcome needs Python
 * (events, retries, faults to defer, an error, the VM gone), goes into out (at most
 * capacity). The first pump arms timer_fd (registered in epfd by the caller) to fire
 * budget_ms later, so that Python folds the stats in soon whether serving goes on or stops;
 * a timer in the kernel's epoll_wait at every sleep would cost each fault more. Returns how
 * many fds are in out, 0 on a timeout or a signal, or -errno; timeout_ms < 0 waits without
 * a limit. */
int fp_wait(int epfd, struct fp_ctx **ctxs, int64_t nctxs, int timeout_ms, int budget_ms,
            int timer_fd, int *out, int capacity);
