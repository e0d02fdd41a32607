/* The fault server's hot loop: read every pending uffd message in one read, resolve each
 * fault through the mapping arrays, install with one UFFDIO_COPY or UFFDIO_ZEROPAGE per
 * source run, wake. It mirrors fcsnap/uffd/installer.py (Installer.fault and install_span)
 * and fcsnap/uffd/mapped.py (MappedDiff.source) case for case, on the same state arrays,
 * so either path can serve any fault. What it does not handle (REMOVE and other events,
 * removed pages, huge pages, unexpected errors) it hands back to Python untouched.
 *
 * Called through cffi's API mode, which releases the GIL for the whole call. */

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#define PAGE 4096ULL
#define CHUNK_SHIFT 21

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* latency.py's observe: count a fault served in `ns` into its bucket (<= 2**k us) */
static void note_latency(int64_t *histogram, int64_t ns)
{
    uint64_t micros = ns > 1000 ? (uint64_t)(ns + 999) / 1000 : 1;
    int k = micros > 1 ? 64 - __builtin_clzll(micros - 1) : 0;
    histogram[k < FP_LATENCY_BUCKETS ? k : FP_LATENCY_BUCKETS - 1] += 1;
    histogram[FP_LATENCY_BUCKETS] += ns;
}

static int copy_range(struct fp_ctx *c, uint64_t dst, uint64_t src, uint64_t len, int64_t *done,
                      int wake, int wp)
{
    struct uffdio_copy cp = {.dst = dst, .src = src, .len = len,
                             .mode = (wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE) |
                                     (wp ? UFFDIO_COPY_MODE_WP : 0)};
    int rc = ioctl(c->uffd, UFFDIO_COPY, &cp);
    *done = rc == 0 ? (int64_t)len : (cp.copy > 0 ? cp.copy : 0);
    return rc == 0 ? 0 : errno;
}

static int wake_range(struct fp_ctx *c, uint64_t start, uint64_t len)
{
    struct uffdio_range r = {.start = start, .len = len};
    return ioctl(c->uffd, UFFDIO_WAKE, &r) == 0 ? 0 : errno;
}

/* Zeros write-protected: UFFDIO_ZEROPAGE has no WP mode, and protecting after it would let
 * a write slip in between, so they are copied from a zero buffer, zeros_len at a time. */
static int zero_wp(int uffd, uint64_t zeros, uint64_t zeros_len, uint64_t dst, uint64_t len,
                   int64_t *done, int wake)
{
    uint64_t pos = 0;
    int whole = len <= zeros_len;
    *done = 0;
    while (pos < len) {
        uint64_t take = len - pos < zeros_len ? len - pos : zeros_len;
        struct uffdio_copy cp = {.dst = dst + pos, .src = zeros, .len = take,
                                 .mode = UFFDIO_COPY_MODE_WP |
                                         (wake && whole ? 0 : UFFDIO_COPY_MODE_DONTWAKE)};
        if (ioctl(uffd, UFFDIO_COPY, &cp) != 0) {
            *done += cp.copy > 0 ? cp.copy : 0;
            return errno;
        }
        *done += (int64_t)take;
        pos += take;
    }
    if (wake && !whole) {
        struct uffdio_range r = {.start = dst, .len = len};
        return ioctl(uffd, UFFDIO_WAKE, &r) == 0 ? 0 : errno;
    }
    return 0;
}

/* bytes of zeros: not on hugetlb, which this path leaves to Python */
static int zero_range(struct fp_ctx *c, uint64_t dst, uint64_t len, int64_t *done, int wake,
                      int wp)
{
    if (wp)
        return zero_wp(c->uffd, c->zeros, c->zeros_len, dst, len, done, wake);
    struct uffdio_zeropage z = {.range = {.start = dst, .len = len},
                                .mode = wake ? 0 : UFFDIO_ZEROPAGE_MODE_DONTWAKE};
    int rc = ioctl(c->uffd, UFFDIO_ZEROPAGE, &z);
    *done = rc == 0 ? (int64_t)len : (z.zeropage > 0 ? z.zeropage : 0);
    return rc == 0 ? 0 : errno;
}

/* MappedDiff.source: an address holding diff bytes [storage, storage+len), or 0 when the
 * file changed size (Python then raises the error naming it) or a read failed. */
static uint64_t diff_source(struct fp_diff *d, uint64_t storage, uint64_t len)
{
    struct stat st;
    int64_t first = storage >> CHUNK_SHIFT, last = (storage + len - 1) >> CHUNK_SHIFT;
    int mapped = d->fits || (d->chunks[first] && d->chunks[last] && last - first <= 1);
    if (!mapped && len <= d->read_below) {
        int streaming = 0;
        for (int i = 0; i < d->recent; i++)
            streaming |= d->ends[i] == (int64_t)storage;
        if (!streaming) {
            d->ends[d->counters[1]] = (int64_t)(storage + len);
            d->counters[1] = (d->counters[1] + 1) % d->recent;
            if (pread(d->fd, (void *)d->read_buffer, len, (off_t)storage) != (ssize_t)len)
                return 0;
            return d->read_buffer;
        }
    }
    if (fstat(d->fd, &st) != 0 || (uint64_t)st.st_size != d->size)
        return 0;
    if (!mapped) {
        int64_t fresh = 0;
        for (int64_t k = first; k <= last; k++)
            fresh += !d->chunks[k];
        if (d->counters[0] + fresh > d->limit) {
            madvise((void *)d->base, d->size, MADV_DONTNEED);
            memset(d->chunks, 0, d->nchunks);
            d->counters[0] = 0;
        }
        for (int64_t k = first; k <= last; k++) {
            d->counters[0] += !d->chunks[k];
            d->chunks[k] = 1;
        }
    }
    return d->base + storage;
}

static struct fp_region *find_region(struct fp_ctx *c, uint64_t address)
{
    int lo = 0, hi = c->nregions;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (c->regions[mid].base <= address)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || address >= c->regions[lo - 1].base + c->regions[lo - 1].size)
        return NULL;
    return &c->regions[lo - 1];
}

/* index of the mapping holding guest offset `offset` */
static int64_t find_mapping(struct fp_ctx *c, uint64_t offset)
{
    int64_t lo = 0, hi = c->nmappings;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if ((uint64_t)c->starts[mid] <= offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo - 1;
}

static uint64_t mapping_end(struct fp_ctx *c, int64_t i)
{
    return i + 1 < c->nmappings ? (uint64_t)c->starts[i + 1] : c->memory_size;
}

static uint64_t chunk_at(const struct fp_diff *d, uint64_t k)
{
    return __atomic_load_n(&d->chunk_maps[k], __ATOMIC_ACQUIRE);  /* Python fills it */
}

/* Narrow [lo, hi), one source run holding `page`, to the pages whose bytes lie in chunks of
 * a cached diff mapped in this process; 0 when the page's own chunk is not mapped yet (or
 * its bytes are not page-aligned in the diff): Python serves it. Other sources: 1, as is. */
static int cached_bounds(struct fp_ctx *c, struct fp_region *r, uint64_t page, uint64_t *lo,
                         uint64_t *hi)
{
    uint64_t offset = r->offset + page * PAGE;
    int64_t i = find_mapping(c, offset);
    int64_t owner = c->owner[i];
    if (owner < 0 || c->diffs[owner].chunk_maps == NULL)
        return 1;
    struct fp_diff *d = &c->diffs[owner];
    int64_t shift = d->chunk_shift;
    uint64_t s = (uint64_t)c->storage[i] + (offset - (uint64_t)c->starts[i]);
    uint64_t first = s >> shift, last = first;
    if (s % PAGE || chunk_at(d, first) == 0)
        return 0;
    uint64_t s_lo = s - (page - *lo) * PAGE, s_hi = s + (*hi - page) * PAGE;
    while ((first << shift) > s_lo && chunk_at(d, first - 1))
        first--;
    while (((last + 1) << shift) < s_hi && chunk_at(d, last + 1))
        last++;
    uint64_t from = first << shift > s_lo ? first << shift : s_lo;
    uint64_t to = (last + 1) << shift < s_hi ? (last + 1) << shift : s_hi;
    *lo = page - (s - from) / PAGE;
    *hi = page + (to - s) / PAGE;
    return 1;
}

/* One install from a cached diff's chunk mappings (cached_bounds made sure they are
 * mapped): a UFFDIO_COPY per chunk crossed, waking the range once at the end. */
static int copy_cached(struct fp_ctx *c, struct fp_diff *d, uint64_t dst, uint64_t storage,
                       uint64_t len, int64_t *done, int wake, int wp)
{
    int64_t shift = d->chunk_shift;
    uint64_t pos = 0;
    int split = (storage >> shift) != ((storage + len - 1) >> shift);
    *done = 0;
    while (pos < len) {
        uint64_t s = storage + pos, k = s >> shift;
        uint64_t take = ((k + 1) << shift) - s;
        uint64_t base = chunk_at(d, k);
        int64_t part = 0;
        if (take > len - pos)
            take = len - pos;
        if (base == 0)
            return ENXIO;  /* not reached: cached_bounds checked every chunk */
        int err = copy_range(c, dst + pos, base + (s - (k << shift)), take, &part,
                             wake && !split, wp);
        *done += part;
        if (err != 0)
            return err;
        pos += take;
    }
    return wake && split ? wake_range(c, dst, len) : 0;
}

/* Installer._source_bounds: narrow [lo, hi) around `page` to one mapping */
static void source_bounds(struct fp_ctx *c, struct fp_region *r, uint64_t page, uint64_t *lo,
                          uint64_t *hi)
{
    uint64_t offset = r->offset + page * PAGE;
    int64_t i = find_mapping(c, offset);
    uint64_t m_start = (uint64_t)c->starts[i], m_end = mapping_end(c, i);
    uint64_t first = m_start > r->offset ? (m_start - r->offset + PAGE - 1) / PAGE : 0;
    uint64_t last = (m_end - r->offset) / PAGE;
    if (first > *lo)
        *lo = first;
    if (last < *hi)
        *hi = last;
}

static void note_installed(struct fp_ctx *c, struct fp_region *r, uint64_t lo, int64_t pages,
                           int64_t owner)
{
    if (pages <= 0)
        return;
    memset(r->present + lo, 1, (size_t)pages);
    c->stats[FP_INSTALLS] += 1;
    c->stats[FP_PAGES] += pages;
    if (owner < 0)
        c->stats[FP_ZERO_PAGES] += pages;
    else
        c->per_owner[owner] += pages;
}

/* Installer._install for pages [lo, hi) of one source run; `needed` is the faulting page
 * or -1; wake 0: DONTWAKE; writable: not write-protected in a region registered for it (the
 * page a write fault asked for). Returns an FP_* outcome. */
static int install(struct fp_ctx *c, struct fp_region *r, uint64_t lo, uint64_t hi,
                   int64_t needed, int wake, int writable)
{
    int wp = r->wp && !writable;
    uint64_t offset = r->offset + lo * PAGE, length = (hi - lo) * PAGE;
    uint64_t dst = r->base + lo * PAGE;
    int64_t i = find_mapping(c, offset);
    int64_t owner = c->owner[i];
    int64_t done = 0;
    int err;
    if (owner < 0) {
        err = zero_range(c, dst, length, &done, wake, wp);
    } else if (c->diffs[owner].chunk_maps != NULL) {
        uint64_t storage = (uint64_t)c->storage[i] + (offset - (uint64_t)c->starts[i]);
        err = copy_cached(c, &c->diffs[owner], dst, storage, length, &done, wake, wp);
    } else {
        uint64_t storage = (uint64_t)c->storage[i] + (offset - (uint64_t)c->starts[i]);
        uint64_t src = diff_source(&c->diffs[owner], storage, length);
        if (src == 0) {
            c->error_dst = dst;
            c->error_owner = owner;
            c->error_errno = 0;
            return FP_ERROR;
        }
        err = copy_range(c, dst, src, length, &done, wake, wp);
    }
    int outcome = FP_DONE;
    if (err == EEXIST) {
        c->stats[FP_ALREADY] += 1;
        r->present[lo + done / PAGE] = 1;
        if (needed >= 0 && !r->present[needed])
            outcome = install(c, r, (uint64_t)needed, (uint64_t)needed + 1, -1, 1, writable);
    } else if (err == EAGAIN) {
        outcome = FP_RETRY;
    } else if (err == ESRCH) {
        outcome = FP_GONE;
    } else if (err != 0) {
        c->error_dst = dst;
        c->error_owner = owner;
        c->error_errno = err;
        outcome = FP_ERROR;
    }
    note_installed(c, r, lo, done / (int64_t)PAGE, owner);
    if (outcome == FP_RETRY && needed >= 0 && r->present[needed])
        return FP_DONE;
    return outcome;
}

/* Installer._zeros: whether `page` reads zeros from the build (no mapping owns its bytes) */
static int zero_run(struct fp_ctx *c, struct fp_region *r, uint64_t page)
{
    return c->owner[find_mapping(c, r->offset + page * PAGE)] < 0;
}

/* Installer.install_span without waking: the free pages of [lo, hi), a source run at a time;
 * zero runs left out in a write-protected region (installer.py says why) */
static int install_span(struct fp_ctx *c, struct fp_region *r, uint64_t lo, uint64_t hi)
{
    uint64_t pos = lo;
    while (pos < hi) {
        while (pos < hi && (r->present[pos] || r->removed[pos]))
            pos++;
        if (pos == hi)
            break;
        uint64_t end = pos;
        while (end < hi && !r->present[end] && !r->removed[end])
            end++;
        uint64_t seg_lo = pos, seg_hi = end;
        source_bounds(c, r, pos, &seg_lo, &seg_hi);
        if (r->wp && zero_run(c, r, pos)) {
            pos = seg_hi;
            continue;
        }
        if (!cached_bounds(c, r, pos, &seg_lo, &seg_hi)) {
            pos = seg_hi;  /* its chunk is not mapped yet: left to a later fault */
            continue;
        }
        int outcome = install(c, r, seg_lo, seg_hi, -1, 0, 0);
        if (outcome != FP_DONE)
            return outcome;
        pos = seg_hi;
    }
    return FP_DONE;
}

/* faultaround.py's adaptive_window: continue a stream (growing its window) or start one */
static void adaptive_window(struct fp_ctx *c, struct fp_region *r, uint64_t page,
                            uint64_t *lo, uint64_t *hi)
{
    int64_t *s = r->streams, p = (int64_t)page, most = c->adaptive_max;
    int64_t slot = -1, window = 1;
    for (int64_t k = 0; k < FP_STREAMS; k++)
        if (s[2 * k] <= p && p < s[2 * k] + s[2 * k + 1]) {
            slot = k;
            window = s[2 * k + 1] * (s[2 * k + 1] * 16 < most ? 4 : 2);
            if (window > most)
                window = most;
            break;
        }
    if (slot < 0) {
        slot = s[2 * FP_STREAMS];
        s[2 * FP_STREAMS] = (slot + 1) % FP_STREAMS;
    }
    *lo = page;
    *hi = page + (uint64_t)window < r->pages ? page + (uint64_t)window : r->pages;
    s[2 * slot] = (int64_t)*hi;
    s[2 * slot + 1] = window;
}

/* A write-protect fault: the guest writes a page it had only read. Lift the protection,
 * waking it, and note the page written. */
static int unprotect(struct fp_ctx *c, struct fp_region *r, uint64_t page)
{
    struct uffdio_writeprotect w = {.range = {.start = r->base + page * PAGE, .len = PAGE},
                                    .mode = 0};
    if (ioctl(c->uffd, UFFDIO_WRITEPROTECT, &w) != 0) {
        if (errno == EAGAIN || errno == ESRCH)
            return errno == EAGAIN ? FP_RETRY : FP_GONE;
        c->error_dst = w.range.start;
        c->error_owner = -1;
        c->error_errno = errno;
        return FP_ERROR;
    }
    c->stats[FP_WP_FAULTS] += 1;
    if (r->written != NULL)
        r->written[page] |= FP_WRITTEN;
    return FP_DONE;
}

/* A write-protect fault on a page a background checkpoint has yet to copy: keep its content
 * (as at the pause: it is still protected, its writer waits on this fault), then clear
 * pending, in that order (preimage.py). A read refused is noted for the checkpoint to fail;
 * the page is unprotected all the same, so the VM never waits on a checkpoint. */
static void keep_preimage(struct fp_ctx *c, struct fp_region *r, uint64_t page)
{
    struct iovec local = {.iov_base = (void *)(c->preimages + r->offset + page * PAGE),
                          .iov_len = PAGE};
    struct iovec remote = {.iov_base = (void *)(r->base + page * PAGE), .iov_len = PAGE};
    ssize_t got = process_vm_readv((pid_t)c->vm_pid, &local, 1, &remote, 1, 0);
    if (got == (ssize_t)PAGE)
        c->preimage_counts[FP_KEPT] += 1;
    else if (c->preimage_counts[FP_KEEP_ERRNO] == 0)
        c->preimage_counts[FP_KEEP_ERRNO] = got < 0 ? errno : EIO;
    __atomic_store_n(&r->pending[page], 0, __ATOMIC_RELEASE);
}

int fp_fault(struct fp_ctx *c, uint64_t token)
{
    uint64_t flags = token & FP_FLAGS, address = token & ~(PAGE - 1);
    struct fp_region *r = find_region(c, address);
    if (r == NULL || r->page_size != PAGE)
        return FP_DEFER;
    uint64_t page = (address - r->base) / PAGE;
    if ((flags & FP_FLAG_WP) && r->wp) {
        if (r->pending != NULL && r->pending[page]) {
            if (c->preimages == 0)
                return FP_DEFER;  /* Python's: it knows the copy */
            keep_preimage(c, r, page);
        }
        return unprotect(c, r, page);
    }
    int writable = (flags & FP_FLAG_WRITE) && r->wp;  /* its own page goes in writable */
    if (r->removed[page])
        return FP_DEFER;
    if (c->record_capacity && !r->present[page] && c->nrecord == c->record_capacity)
        return FP_DEFER;  /* the record is full: Python serves and records it */
    if (r->present[page]) {
        c->stats[FP_ALREADY] += 1;
        int err = wake_range(c, r->base + page * PAGE, PAGE);
        if (err == 0 || err == ESRCH)
            return err == 0 ? FP_DONE : FP_GONE;
        c->error_dst = r->base + page * PAGE;
        c->error_owner = -1;
        c->error_errno = err;
        return FP_ERROR;
    }
    uint64_t w_lo = page, w_hi = page + 1;
    if (r->wanted[page]) {
        /* the prefetch brings the rest of the working set: only this page */
    } else if (c->adaptive_max > 0) {
        adaptive_window(c, r, page, &w_lo, &w_hi);
    } else if (c->fault_around / PAGE > 1) {
        uint64_t window = c->fault_around / PAGE;
        w_lo = page - page % window;
        w_hi = w_lo + window < r->pages ? w_lo + window : r->pages;
    }
    uint64_t lo = w_lo, hi = w_hi;
    source_bounds(c, r, page, &lo, &hi);
    if (!cached_bounds(c, r, page, &lo, &hi))
        return FP_DEFER;  /* Python fetches and maps the chunk */
    if (writable || (r->wp && zero_run(c, r, page))) {  /* as Installer._serve_fault */
        lo = page;
        hi = page + 1;
    }
    for (uint64_t p = page; p > lo; p--)
        if (r->present[p - 1] || r->removed[p - 1]) {
            lo = p;
            break;
        }
    for (uint64_t p = page + 1; p < hi; p++)
        if (r->present[p] || r->removed[p]) {
            hi = p;
            break;
        }
    if (w_hi - w_lo > 1) {  /* the rest of the window first, waking no one (installer.py) */
        int side = install_span(c, r, w_lo, lo);
        if (side != FP_ERROR)
            side = install_span(c, r, hi, w_hi);
        if (side == FP_ERROR)
            return side;
    }
    int outcome = install(c, r, lo, hi, (int64_t)page, 1, writable);
    if (outcome == FP_DONE && writable && r->written != NULL)
        r->written[page] |= FP_WRITTEN;
    if (outcome == FP_DONE && c->record_capacity)
        c->record[c->nrecord++] = r->offset + page * PAGE;
    return outcome;
}

int64_t fp_copy_runs(int uffd, const uint64_t *dst, const uint64_t *src, const uint64_t *len,
                     int64_t n, int wp, uint64_t zeros, uint64_t zeros_len, int *err,
                     int64_t *part)
{
    for (int64_t k = 0; k < n; k++) {
        int64_t done = 0;
        int rc;
        if (src[k] == 0 && wp) {
            errno = zero_wp(uffd, zeros, zeros_len, dst[k], len[k], &done, 0);
            rc = errno ? -1 : 0;
        } else if (src[k] == 0) {
            struct uffdio_zeropage z = {.range = {.start = dst[k], .len = len[k]},
                                        .mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE};
            rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
            done = z.zeropage;
        } else {
            struct uffdio_copy cp = {.dst = dst[k], .src = src[k], .len = len[k],
                                     .mode = UFFDIO_COPY_MODE_DONTWAKE |
                                             (wp ? UFFDIO_COPY_MODE_WP : 0)};
            rc = ioctl(uffd, UFFDIO_COPY, &cp);
            done = cp.copy;
        }
        if (rc != 0) {
            *err = errno;
            *part = done > 0 ? done : 0;
            return k;
        }
    }
    *err = 0;
    *part = 0;
    return n;
}

int fp_pump(struct fp_ctx *c)
{
    c->nretry = 0;
    c->ndefer = 0;
    c->nmessages = 0;
    struct uffd_msg *messages = c->messages;
    for (;;) {
        ssize_t n = read(c->uffd, c->messages, (size_t)c->capacity * sizeof(struct uffd_msg));
        if (n < 0)
            return errno == EAGAIN ? FP_DONE : -errno;
        int64_t count = n / (int64_t)sizeof(struct uffd_msg);
        for (int64_t k = 0; k < count; k++)
            if (messages[k].event != UFFD_EVENT_PAGEFAULT) {
                c->nmessages = count;  /* the whole read goes to Python, in order */
                return FP_EVENTS;
            }
        /* Each fault served is timed from the later of its read and the end of the fault
         * before it to its wake: one clock read per fault. */
        int64_t began = now_ns();
        if (count && c->first_fault_ns == 0)
            c->first_fault_ns = began;
        c->stats[FP_FAULTS] += count;
        for (int64_t k = 0; k < count; k++) {
            uint64_t address = (messages[k].arg.pagefault.address & ~(PAGE - 1)) |
                               (messages[k].arg.pagefault.flags & FP_FLAGS);
            int outcome = fp_fault(c, address);
            int64_t ended = now_ns();
            if (outcome == FP_DONE && c->latency != NULL)  /* NULL: a context not timed */
                note_latency(c->latency, ended - began);
            began = ended;
            if (outcome == FP_RETRY)
                c->retry[c->nretry++] = address;
            else if (outcome == FP_DEFER)
                c->defer[c->ndefer++] = address;
            else if (outcome != FP_DONE)
                return outcome;
        }
        if (c->nretry || c->ndefer || count < c->capacity)
            return FP_DONE;
    }
}

int fp_timer(void)
{
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int fp_wait(int epfd, struct fp_ctx **ctxs, int64_t nctxs, int timeout_ms, int budget_ms,
            int timer_fd, int *out, int capacity)
{
    struct epoll_event events[64];
    int64_t deadline = timeout_ms < 0 ? -1 : now_ns() + (int64_t)timeout_ms * 1000000;
    int max = capacity < 64 ? capacity : 64;
    int wait_ms = timeout_ms;
    int armed = 0;
    for (;;) {
        int n = epoll_wait(epfd, events, max, wait_ms);
        if (n < 0)
            return errno == EINTR ? 0 : -errno;
        if (n == 0)
            return 0;
        int nout = 0;
        for (int k = 0; k < n; k++) {
            int fd = events[k].data.fd;
            struct fp_ctx *c = fd >= 0 && fd < nctxs ? ctxs[fd] : NULL;
            if (c == NULL) {
                out[nout++] = fd;
                continue;
            }
            c->status = fp_pump(c);
            c->pumped = 1;
            if (c->status != FP_DONE || c->nretry || c->ndefer)
                out[nout++] = fd;
            if (!armed) {  /* back to Python budget_ms from now, however busy or quiet */
                struct itimerspec t = {.it_value = {.tv_sec = budget_ms / 1000,
                                                    .tv_nsec = budget_ms % 1000 * 1000000L}};
                timerfd_settime(timer_fd, 0, &t, NULL);
                armed = 1;
            }
        }
        if (nout)
            return nout;
        if (deadline >= 0) {
            int64_t now = now_ns();
            if (now >= deadline)
                return 0;
            wait_ms = (int)((deadline - now + 999999) / 1000000);
        }
    }
}
