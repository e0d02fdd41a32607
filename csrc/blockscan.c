/* pack's zero check: which blocks of a chunk just read hold data. A zero block is read whole
 * (70% of a typical guest's pages), a data block to the 256 bytes holding its first non-zero
 * byte. Built with -O3, the OR of each 256 bytes is vectorised. Loads go through memcpy: the
 * chunk's buffer need not be aligned. */

#include <string.h>

enum { STRIDE = 256 };

int64_t bs_nonzero(const uint8_t *buf, int64_t n, int64_t block_size, int64_t *out)
{
    int64_t found = 0;
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *p = buf + b * block_size;
        const uint8_t *end = p + block_size;
        uint64_t any = 0;
        for (; p < end && !any; p += STRIDE) {
            uint64_t w[STRIDE / 8];
            memcpy(w, p, sizeof w);
            for (int i = 0; i < STRIDE / 8; i++)
                any |= w[i];
        }
        if (any)
            out[found++] = b;
    }
    return found;
}
