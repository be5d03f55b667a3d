/*
 * Opening the files of a checkpoint without being held up by them.
 *
 * moed opens files that a caller named (LoadModel's directory).  A FIFO, a
 * character device or a socket in its place would block open() or read()
 * for as long as no one writes: every file the loader reads is opened with
 * O_NONBLOCK (open of a FIFO or a device then returns at once), checked with
 * fstat to be a regular file, and only then read, O_NONBLOCK cleared
 * (io_uring would answer EAGAIN for a file left non-blocking).  The error
 * names the file and what it is.
 *
 * Also: JSON parse errors without the bytes of the file.  jansson's
 * error.text quotes the text it stopped at ("invalid token near 'root'"),
 * which would echo any file a checkpoint's name points to into an error
 * sent to a remote caller; moe_json_loadb keeps the reason, line and column
 * and drops the quote.
 */
#ifndef MOED_ENGINE_FILEIO_H
#define MOED_ENGINE_FILEIO_H

#include "common.h"

#include <jansson.h>
#include <sys/stat.h>

/* "a FIFO", "a character device", ... for the mode's file type. */
const char *moe_file_kind(mode_t mode);

/*
 * Opens path (flags: O_RDONLY plus O_DIRECT or others; O_CLOEXEC is added)
 * only if it is a regular file, never blocking in open().  Returns the fd
 * (the caller closes it) and fills *ret_st when not NULL, or -errno with err
 * naming path: -EINVAL for anything but a regular file ("is a FIFO, not a
 * regular file"), -EISDIR for a directory, open's errno otherwise.
 */
int moe_open_regular(const char *path, int flags, struct stat *ret_st, struct moe_error *err);

/*
 * moe_read_file (safetensors.h) for regular files only: a whole small file
 * (config.json, an index) into a NUL-terminated buffer of at most
 * max_bytes, opened with moe_open_regular.  0 and *ret (the caller frees
 * it), *ret_len; or -errno with err (-ENOENT when missing).
 */
int moe_read_regular_file(const char *path, size_t max_bytes, char **ret, size_t *ret_len,
                          struct moe_error *err);

/* Appends " (named in NAMED_IN)" to err's message (NULL err: no-op). */
void moe_error_named_in(struct moe_error *err, const char *named_in);

/* json_loadb whose error text, on failure, is the reason only: no fragment
 * of the input. */
json_t *moe_json_loadb(const char *buf, size_t len, size_t flags, json_error_t *error);

#endif
