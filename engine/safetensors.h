/*
 * Safetensors files and the sharded-checkpoint index, read as Hugging Face
 * writes them.
 *
 * A safetensors file is an 8-byte little-endian header length N, N bytes of
 * JSON mapping tensor names to {"dtype", "shape", "data_offsets": [begin,
 * end]} (offsets relative to the byte after the header), an optional
 * "__metadata__" object of strings, then the data.  The parser checks every
 * field, that each byte range matches dtype x shape, that ranges neither run
 * past the end of the file nor overlap, and that they cover the data with no
 * hole (as the reference implementation does).  Nothing but the header is
 * read: tensors are read later by byte range.
 *
 * The index, model.safetensors.index.json, maps tensor names to shard file
 * names: {"metadata": {"total_size": N}, "weight_map": {name: file}}.
 * Shard names must be plain file names in the checkpoint directory.
 */
#ifndef MOED_ENGINE_SAFETENSORS_H
#define MOED_ENGINE_SAFETENSORS_H

#include "common.h"

/* Largest header accepted, as in the reference implementation. */
#define MOE_ST_MAX_HEADER (100u << 20)

struct moe_st_tensor {
    char *name; /* owned */
    enum moe_dtype dtype;
    int ndim; /* 0..MOE_MAX_DIMS */
    int64_t shape[MOE_MAX_DIMS];
    uint64_t offset; /* absolute offset in the file of the first byte */
    uint64_t nbytes; /* product(shape) * dtype size */
};

struct moe_st_header {
    uint64_t header_len; /* N of the 8-byte prefix */
    uint64_t data_start; /* 8 + N: absolute offset of the data */
    uint64_t file_size;  /* size of the file the header was checked against */
    size_t n_tensors;
    struct moe_st_tensor *tensors; /* sorted by name (strcmp) */
};

/*
 * Parses the JSON of a header (json_len bytes, not NUL-terminated) of a file
 * of file_size bytes whose header length prefix is json_len.  fname names the
 * file in error messages.  Returns 0 and sets *ret (free with
 * moe_st_header_free), or -EINVAL (bad input) / -ENOMEM with *err set.
 */
int moe_st_header_parse(const char *json, size_t json_len, uint64_t file_size, const char *fname,
                        struct moe_st_header **ret, struct moe_error *err);

/*
 * Opens path, reads the length prefix and the header and parses them.
 * fname names the file in error messages (NULL: path).  -ENOENT, -EACCES,
 * -EIO... for files that cannot be read, -EINVAL for bad contents.
 */
int moe_st_header_read(const char *path, const char *fname, struct moe_st_header **ret,
                       struct moe_error *err);

/*
 * As moe_st_header_read, from a file already open for reading (fd is neither
 * closed nor moved): the model keeps the fd whose header it checked.
 */
int moe_st_header_read_fd(int fd, const char *fname, struct moe_st_header **ret,
                          struct moe_error *err);

void moe_st_header_free(struct moe_st_header *h);

/* Binary search by name; NULL when absent. */
const struct moe_st_tensor *moe_st_header_find(const struct moe_st_header *h, const char *name);

struct moe_st_index_entry {
    char *tensor; /* owned */
    int file;     /* index into moe_st_index.files */
};

struct moe_st_index {
    size_t n_entries;
    struct moe_st_index_entry *entries; /* sorted by tensor name */
    size_t n_files;
    char **files;        /* distinct shard names, sorted, owned */
    uint64_t total_size; /* metadata.total_size, 0 when absent */
};

/* Parses an index (json_len bytes).  fname names it in messages. */
int moe_st_index_parse(const char *json, size_t json_len, const char *fname,
                       struct moe_st_index **ret, struct moe_error *err);

/* Reads and parses the index file at path. */
int moe_st_index_read(const char *path, const char *fname, struct moe_st_index **ret,
                      struct moe_error *err);

void moe_st_index_free(struct moe_st_index *idx);

/* Binary search; -1 when absent, else the shard's index in idx->files. */
int moe_st_index_find(const struct moe_st_index *idx, const char *tensor);

/*
 * Reads a whole small file (config.json, an index) into a NUL-terminated
 * buffer of at most max_bytes.  Returns 0 and sets *ret and *ret_len, or -errno
 * with *err naming the file.
 */
int moe_read_file(const char *path, size_t max_bytes, char **ret, size_t *ret_len,
                  struct moe_error *err);

#endif
