/*
 * Streaming safetensors writer.
 *
 * Writes a file exactly as the reference implementation lays it out: an
 * 8-byte little-endian header length N, N bytes of compact JSON
 * {"__metadata__":{"format":"pt"},"NAME":{"dtype":"BF16","shape":[..],
 * "data_offsets":[begin,end]},...} padded with spaces to a multiple of 8, then
 * the tensors' bytes back to back with no hole.
 *
 * Use: moe_st_writer_init(), moe_st_writer_add() for every tensor (name,
 * dtype, shape), moe_st_writer_begin() (writes the header), then the bytes of
 * every tensor in declaration order with moe_st_writer_write() in chunks of
 * any size, and moe_st_writer_finish().  The data never has to be in memory
 * all at once: writes go through a buffer of a few MiB, larger chunks go to
 * the file directly.  Not thread-safe: one writer, one thread.
 */
#ifndef MOED_ENGINE_ST_WRITER_H
#define MOED_ENGINE_ST_WRITER_H

#include "common.h"

struct moe_st_writer;

/*
 * Creates (or truncates) the file at path, mode 0644.  Returns 0 and sets
 * *ret (free with moe_st_writer_free), or -errno with *err naming the file.
 */
int moe_st_writer_init(const char *path, struct moe_st_writer **ret, struct moe_error *err);

/*
 * Declares the next tensor: name (valid UTF-8, unique, copied), dtype and
 * shape (ndim 0..MOE_MAX_DIMS, every dimension >= 0).  Only before
 * moe_st_writer_begin().  -EINVAL for bad arguments, -EOVERFLOW when the
 * size does not fit in 64 bits.
 */
int moe_st_writer_add(struct moe_st_writer *w, const char *name, enum moe_dtype dtype, int ndim,
                      const int64_t *shape, struct moe_error *err);

/*
 * Writes the length prefix and the JSON header.  -EINVAL for a duplicate
 * name, -E2BIG for a header over MOE_ST_MAX_HEADER, -errno for I/O errors.
 */
int moe_st_writer_begin(struct moe_st_writer *w, struct moe_error *err);

/*
 * Appends len bytes of tensor data (a chunk may span tensors).  -EINVAL when
 * more bytes are written than the declared tensors hold.
 */
int moe_st_writer_write(struct moe_st_writer *w, const void *data, size_t len,
                        struct moe_error *err);

/*
 * Flushes and closes the file.  -EINVAL (naming the first incomplete tensor)
 * when fewer bytes were written than declared; -errno for I/O errors.
 */
int moe_st_writer_finish(struct moe_st_writer *w, struct moe_error *err);

/* Bytes of tensor data declared so far. */
uint64_t moe_st_writer_data_size(const struct moe_st_writer *w);

/* Frees the writer; a file that was not finished successfully is removed.
 * NULL does nothing. */
void moe_st_writer_free(struct moe_st_writer *w);

#endif
