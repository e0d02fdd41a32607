/* Shared by the cffi declarations (cdef) and the C source of pack's block scan
 * (fcsnap/store/operations/blockscan.py). */

/* The positions of the blocks holding a non-zero byte among the n blocks of block_size bytes
 * (a multiple of 256) at buf, written to out in ascending order; returns how many. */
int64_t bs_nonzero(const uint8_t *buf, int64_t n, int64_t block_size, int64_t *out);
