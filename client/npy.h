/*
 * NumPy .npy arrays and .npz archives, the exchange format of moectl's
 * offline commands.  Readers treat the files as untrusted input: magic,
 * version, header dictionary, dtype, shape and data length are all checked,
 * and errors name the file and what is wrong.
 *
 * Supported: .npy versions 1.0, 2.0 and 3.0, little-endian '<f4' (float32) and
 * '<i4' (int32) arrays in C order; .npz archives written by numpy.savez (zip,
 * stored entries, no compression).
 */
#ifndef MOED_ENGINE_NPY_H
#define MOED_ENGINE_NPY_H

#include "common.h"

enum moe_npy_type {
    MOE_NPY_F32 = 0, /* '<f4' */
    MOE_NPY_I32,     /* '<i4' */
};

struct moe_npy {
    enum moe_npy_type type;
    int ndim; /* 0..MOE_MAX_DIMS */
    int64_t shape[MOE_MAX_DIMS];
    size_t count; /* product of shape */
    void *data;   /* count elements, owned (free with moe_npy_clear) */
};

/* Parses a .npy image of len bytes.  name names it in messages. */
int moe_npy_parse(const void *buf, size_t len, const char *name, struct moe_npy *ret,
                  struct moe_error *err);
/* Reads and parses a .npy file. */
int moe_npy_read(const char *path, struct moe_npy *ret, struct moe_error *err);
void moe_npy_clear(struct moe_npy *a);

/* Writes data (count = product of shape elements of type) as a .npy file. */
int moe_npy_write(const char *path, enum moe_npy_type type, int ndim, const int64_t *shape,
                  const void *data, struct moe_error *err);

/* One array of an archive. */
struct moe_npz_entry {
    const char *name; /* array name, without ".npy" */
    enum moe_npy_type type;
    int ndim;
    const int64_t *shape;
    const void *data;
};

/* Writes an .npz archive (stored zip, as numpy.savez) of n arrays. */
int moe_npz_write(const char *path, const struct moe_npz_entry *entries, int n,
                  struct moe_error *err);

/* Parses an .npz image and returns the array called name (without ".npy"):
 * -ENOENT with a message listing what the archive holds when it is absent. */
int moe_npz_parse_array(const void *buf, size_t len, const char *fname, const char *name,
                        struct moe_npy *ret, struct moe_error *err);
/* Reads the .npz file at path and returns its array called name. */
int moe_npz_read_array(const char *path, const char *name, struct moe_npy *ret,
                       struct moe_error *err);

#endif
