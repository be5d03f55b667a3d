/*
 * Files that never block the opener, and JSON errors that quote no input
 * (fileio.h).  No state, no locks.
 */
#include "fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char *moe_file_kind(mode_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFREG:
        return "a regular file";
    case S_IFDIR:
        return "a directory";
    case S_IFIFO:
        return "a FIFO";
    case S_IFCHR:
        return "a character device";
    case S_IFBLK:
        return "a block device";
    case S_IFSOCK:
        return "a socket";
    default:
        return "not a regular file";
    }
}

int moe_open_regular(const char *path, int flags, struct stat *ret_st, struct moe_error *err)
{
    struct stat st;
    int fd, fl, r;

    /* O_NONBLOCK: open() of a FIFO without a writer, or of a device, returns
     * at once instead of waiting; O_NOCTTY: a terminal never becomes ours. */
    fd = open(path, flags | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        return moe_error_set(err, -errno, "%s: cannot open: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0) {
        r = moe_error_set(err, -errno, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (S_ISDIR(st.st_mode)) {
        r = moe_error_set(err, -EISDIR, "%s: is a directory, expected a file", path);
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        r = moe_error_set(err, -EINVAL,
                          "%s: is %s, not a regular file: checkpoints are read from regular "
                          "files only",
                          path, moe_file_kind(st.st_mode));
        goto fail;
    }
    /* Blocking reads again: a regular file never waits for a writer, and
     * io_uring answers EAGAIN instead of queueing for a non-blocking one. */
    fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
        r = moe_error_set(err, -errno, "%s: fcntl: %s", path, strerror(errno));
        goto fail;
    }
    if (ret_st)
        *ret_st = st;
    return fd;
fail:
    close(fd);
    return r;
}

int moe_read_regular_file(const char *path, size_t max_bytes, char **ret, size_t *ret_len,
                          struct moe_error *err)
{
    struct stat st;
    size_t cap, len = 0;
    char *buf;
    int fd, r;

    fd = moe_open_regular(path, O_RDONLY, &st, err);
    if (fd < 0)
        return fd;
    if ((uint64_t)st.st_size > max_bytes) {
        r = moe_error_set(err, -EFBIG, "%s: file is %" PRIu64 " bytes, over the limit of %zu", path,
                          (uint64_t)st.st_size, max_bytes);
        goto out;
    }
    /* One byte past the size shows a file that grew meanwhile; it may also
     * shrink: read until end of file. */
    cap = (size_t)st.st_size + 1;
    buf = malloc(cap + 1);
    if (!buf) {
        r = moe_error_set(err, -ENOMEM, "%s: out of memory reading %zu bytes", path, cap);
        goto out;
    }
    for (;;) {
        ssize_t n = read(fd, buf + len, cap - len);

        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            r = moe_error_set(err, -errno, "%s: read failed: %s", path, strerror(errno));
            free(buf);
            goto out;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len == cap) {
            r = moe_error_set(err, -EAGAIN, "%s: grew while it was read: try again", path);
            free(buf);
            goto out;
        }
    }
    buf[len] = 0;
    *ret = buf;
    *ret_len = len;
    r = 0;
out:
    close(fd);
    return r;
}

void moe_error_named_in(struct moe_error *err, const char *named_in)
{
    size_t n;

    if (!err)
        return;
    n = strlen(err->msg);
    snprintf(err->msg + n, sizeof(err->msg) - n, " (named in %s)", named_in);
}

json_t *moe_json_loadb(const char *buf, size_t len, size_t flags, json_error_t *error)
{
    json_t *root = json_loadb(buf, len, flags, error);
    char *near;

    /* jansson's lexer errors end in " near '<the text>'" (or " near end of
     * file"): the reason is before it. */
    if (!root && (near = strstr(error->text, " near ")))
        *near = 0;
    return root;
}
