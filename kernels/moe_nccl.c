/*
 * NCCL point-to-point transport (moe_nccl.h says what it promises): a
 * non-blocking communicator whose every operation is polled against a
 * deadline, and host buffers staged through one pinned and one device
 * buffer per communicator.
 */
#include "moe_nccl.h"

#include <cuda_runtime.h>
#include <errno.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

_Static_assert(sizeof(ncclUniqueId) == MOE_NCCL_ID_BYTES, "ncclUniqueId is 128 bytes");

#define ALIGN 256

struct moe_nccl {
    ncclComm_t comm;
    cudaStream_t stream;
    int device, rank, nranks;
    bool broken, pending;
    bool dev_plain; /* dev from cudaMalloc, not cudaMallocAsync */
    bool joined;    /* initialised: revoke applies (before, close aborts) */
    uint8_t *dev;   /* device staging: the sends, then the receives */
    uint8_t *host;  /* pinned host staging, same layout */
    size_t cap;
    /* The receives of the pending post and their offsets in the staging. */
    struct moe_nccl_xfer *recv;
    size_t *recv_off;
    int n_recv, cap_recv;
};

const char *moe_nccl_version(void)
{
    static char s[32];
    int v = 0;

    if (ncclGetVersion(&v) != ncclSuccess)
        return "unknown";
    /* 2.9 and later: major * 10000 + minor * 100 + patch. */
    snprintf(s, sizeof(s), "%d.%d.%d", v / 10000, v / 100 % 100, v % 100);
    return s;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Selects the communicator's device for one call and gives the caller's
 * back after (scheduler and health threads compute on their own). */
static int device_enter(int device)
{
    int prev = -1;

    if (cudaGetDevice(&prev) != cudaSuccess)
        prev = -1;
    if (prev != device)
        cudaSetDevice(device);
    return prev;
}

static void device_leave(int prev, int device)
{
    if (prev >= 0 && prev != device)
        cudaSetDevice(prev);
}

static void pause_us(unsigned us)
{
    struct timespec ts = {0, (long)us * 1000};

    nanosleep(&ts, NULL);
}

int moe_nccl_usable(int device, struct moe_error *err)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);

    if (e != cudaSuccess)
        return moe_error_set(err, -ENODEV, "no CUDA device (%s)", cudaGetErrorString(e));
    if (device < 0 || device >= n)
        return moe_error_set(err, -ENODEV, "no CUDA device %d (%d found)", device, n);
    return 0;
}

int moe_nccl_unique_id(uint8_t id[MOE_NCCL_ID_BYTES], struct moe_error *err)
{
    ncclUniqueId u;
    ncclResult_t r = ncclGetUniqueId(&u);

    if (r != ncclSuccess)
        return moe_error_set(err, -EIO, "ncclGetUniqueId: %s", ncclGetErrorString(r));
    memcpy(id, u.internal, MOE_NCCL_ID_BYTES);
    return 0;
}

/* Marks c broken and stops its operations (its kernels exit).  Revoke,
 * where NCCL has it, only sets the flags; the abort, which frees and so
 * may wait for every kernel on the device, is left to moe_nccl_close,
 * which the caller can run on a thread of its own. */
static int fail(struct moe_nccl *c, struct moe_error *err, int code, const char *what,
                const char *why)
{
    c->broken = true;
    c->pending = false;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 28, 7)
    if (c->comm && c->joined)
        ncclCommRevoke(c->comm, NCCL_REVOKE_DEFAULT);
#else
    if (c->comm)
        ncclCommAbort(c->comm);
    c->comm = NULL;
#endif
    return moe_error_set(err, code, "NCCL rank %d of %d: %s: %s", c->rank, c->nranks, what, why);
}

/* Polls the communicator until it has no operation in progress. */
static int settle(struct moe_nccl *c, uint64_t deadline, const char *what, struct moe_error *err)
{
    unsigned us = 10;

    for (;;) {
        ncclResult_t r = ncclInProgress;

        ncclResult_t q = ncclCommGetAsyncError(c->comm, &r);

        if (q != ncclSuccess)
            return fail(c, err, -EIO, what, ncclGetErrorString(q));
        if (r == ncclSuccess)
            return 0;
        if (r != ncclInProgress)
            return fail(c, err, -EIO, what, ncclGetErrorString(r));
        if (now_ns() >= deadline)
            return fail(c, err, -ETIMEDOUT, what, "timed out (the peer did not take part)");
        pause_us(us);
        us = us < 500 ? us * 2 : us;
    }
}

static int post_group(struct moe_nccl *c, const struct moe_nccl_xfer *sends, int n_sends,
                      const struct moe_nccl_xfer *recvs, int n_recvs, uint64_t timeout_ms,
                      struct moe_error *err);
static int wait_pending(struct moe_nccl *c, uint64_t timeout_ms, struct moe_error *err);
static int reserve(struct moe_nccl *c, size_t bytes, struct moe_error *err);
static void free_dev(struct moe_nccl *c);

/* Connects every pair of ranks now, both ways, with one byte each: NCCL
 * connects a peer at its first send or receive, inside ncclGroupEnd, and
 * that waits for the peer to connect too.  In moed's protocol the two
 * sides of a transfer post at different times (the receiver after a gRPC
 * call), so a first transfer would wait for a peer that is waiting for it;
 * here every rank posts at once, as they all join at once. */
static int connect_all(struct moe_nccl *c, uint64_t timeout_ms, struct moe_error *err)
{
    struct moe_nccl_xfer *x = calloc(2 * (size_t)c->nranks, sizeof(*x));
    uint8_t *b = calloc(2 * (size_t)c->nranks, 1);
    int n = 0, rc;

    if (!x || !b) {
        free(x);
        free(b);
        return moe_error_set(err, -ENOMEM, "out of memory");
    }
    for (int r = 0; r < c->nranks; r++) {
        x[n] = (struct moe_nccl_xfer){r, &b[n], 1};
        x[c->nranks + n] = (struct moe_nccl_xfer){r, &b[c->nranks + n], 1};
        n++;
    }
    rc = post_group(c, x, n, x + c->nranks, n, timeout_ms, err);
    if (rc == 0)
        rc = wait_pending(c, timeout_ms, err);
    free(x);
    free(b);
    return rc;
}

int moe_nccl_open(const uint8_t id[MOE_NCCL_ID_BYTES], int nranks, int rank, int device,
                  uint64_t timeout_ms, struct moe_nccl **ret, struct moe_error *err)
{
    struct moe_nccl *c;
    ncclUniqueId u;
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    uint64_t deadline = now_ns() + timeout_ms * 1000000ull;
    ncclResult_t r;
    cudaError_t e;
    int rc, prev;

    *ret = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return moe_error_set(err, -EINVAL, "NCCL: rank %d of %d", rank, nranks);
    rc = moe_nccl_usable(device, err);
    if (rc < 0)
        return rc;
    c = calloc(1, sizeof(*c));
    if (!c)
        return moe_error_set(err, -ENOMEM, "out of memory");
    c->device = device;
    c->rank = rank;
    c->nranks = nranks;
    prev = device_enter(device);
    e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        rc = moe_error_set(err, -EIO, "NCCL: CUDA device %d: %s", device, cudaGetErrorString(e));
        free(c);
        device_leave(prev, device);
        return rc;
    }
    memcpy(u.internal, id, MOE_NCCL_ID_BYTES);
    cfg.blocking = 0; /* every wait below is ours, with a deadline */
    r = ncclCommInitRankConfig(&c->comm, nranks, u, rank, &cfg);
    if (r != ncclSuccess && r != ncclInProgress)
        rc = fail(c, err, -EIO, "ncclCommInitRank", ncclGetErrorString(r));
    else
        rc = settle(c, deadline, "joining the communicator", err);
    c->joined = rc == 0;
    /* Staging now, while no transfer runs: growing it later frees and
     * pins memory, which may wait for every kernel on the device. */
    if (rc == 0)
        rc = reserve(c, 2 * (size_t)MOE_NCCL_STAGING_BYTES, err);
    if (rc == 0) {
        uint64_t t = now_ns();

        rc = connect_all(c, t < deadline ? (deadline - t) / 1000000ull + 1 : 1, err);
    }
    device_leave(prev, device);
    if (rc < 0) {
        moe_nccl_close(c);
        return rc;
    }
    *ret = c;
    return 0;
}

void moe_nccl_close(struct moe_nccl *c)
{
    int prev;

    if (!c)
        return;
    prev = device_enter(c->device);
    /* Abort, not destroy: destroying waits for the peers, which may be
     * gone; abort is local and makes any kernel still running exit. */
    if (c->comm)
        ncclCommAbort(c->comm);
    cudaStreamSynchronize(c->stream);
    free_dev(c);
    cudaStreamSynchronize(c->stream);
    cudaStreamDestroy(c->stream);
    cudaFreeHost(c->host);
    free(c->recv);
    free(c->recv_off);
    device_leave(prev, c->device);
    free(c);
}

int moe_nccl_rank(const struct moe_nccl *c)
{
    return c->rank;
}

int moe_nccl_nranks(const struct moe_nccl *c)
{
    return c->nranks;
}

bool moe_nccl_broken(const struct moe_nccl *c)
{
    return c->broken;
}

bool moe_nccl_pending(const struct moe_nccl *c)
{
    return c->pending;
}

size_t moe_nccl_capacity(const struct moe_nccl *c)
{
    return c->cap;
}

static void free_dev(struct moe_nccl *c)
{
    if (c->dev && c->dev_plain)
        cudaFree(c->dev);
    else if (c->dev)
        cudaFreeAsync(c->dev, c->stream);
    c->dev = NULL;
    c->dev_plain = false;
}

static size_t up(size_t n)
{
    return (n + ALIGN - 1) / ALIGN * ALIGN;
}

/* Room for `bytes` of staging on both sides (nothing pending).  The device
 * side is stream-ordered (no device-wide sync); the pinned host side is
 * made at join and grows only for a transfer larger than any before. */
static int reserve(struct moe_nccl *c, size_t bytes, struct moe_error *err)
{
    cudaError_t e;

    if (bytes <= c->cap)
        return 0;
    bytes = MOE_MAX(bytes, 2 * c->cap);
    free_dev(c);
    cudaFreeHost(c->host);
    c->host = NULL;
    c->cap = 0;
    e = cudaMallocAsync((void **)&c->dev, bytes, c->stream);
    if (e != cudaSuccess) {
        /* No stream-ordered pools on this device: a plain allocation (at
         * join, or a transfer larger than any before). */
        c->dev = NULL;
        c->dev_plain = true;
        e = cudaMalloc((void **)&c->dev, bytes);
    }
    if (e == cudaSuccess)
        e = cudaMallocHost((void **)&c->host, bytes);
    if (e != cudaSuccess) {
        free_dev(c);
        return moe_error_set(err, -ENOMEM, "NCCL staging of %zu bytes: %s", bytes,
                             cudaGetErrorString(e));
    }
    c->cap = bytes;
    return 0;
}

static int post_group(struct moe_nccl *c, const struct moe_nccl_xfer *sends, int n_sends,
                      const struct moe_nccl_xfer *recvs, int n_recvs, uint64_t timeout_ms,
                      struct moe_error *err)
{
    uint64_t deadline;
    size_t total = 0, sent = 0, off;
    ncclResult_t r = ncclSuccess, g;
    cudaError_t e;
    int rc;

    if (c->broken)
        return moe_error_set(err, -EIO, "NCCL rank %d of %d: broken by an earlier failure", c->rank,
                             c->nranks);
    for (int i = 0; i < n_sends + n_recvs; i++) {
        const struct moe_nccl_xfer *x = i < n_sends ? &sends[i] : &recvs[i - n_sends];

        if (x->peer < 0 || x->peer >= c->nranks || (x->bytes && !x->buf))
            return moe_error_set(err, -EINVAL, "NCCL: %s %d to rank %d of %d",
                                 i < n_sends ? "send" : "receive", i, x->peer, c->nranks);
        total += up(x->bytes);
        if (i < n_sends)
            sent += up(x->bytes);
    }
    rc = wait_pending(c, timeout_ms, err);
    if (rc < 0)
        return rc;
    deadline = now_ns() + timeout_ms * 1000000ull;
    if (n_recvs > c->cap_recv) {
        struct moe_nccl_xfer *nr = realloc(c->recv, (size_t)n_recvs * sizeof(*nr));
        size_t *no = nr ? realloc(c->recv_off, (size_t)n_recvs * sizeof(*no)) : NULL;

        if (nr)
            c->recv = nr;
        if (no)
            c->recv_off = no;
        if (!nr || !no)
            return moe_error_set(err, -ENOMEM, "out of memory");
        c->cap_recv = n_recvs;
    }
    rc = reserve(c, total, err);
    if (rc < 0)
        return rc;
    off = 0;
    for (int i = 0; i < n_sends; i++) {
        if (sends[i].bytes)
            memcpy(c->host + off, sends[i].buf, sends[i].bytes);
        off += up(sends[i].bytes);
    }
    if (sent) {
        e = cudaMemcpyAsync(c->dev, c->host, sent, cudaMemcpyHostToDevice, c->stream);
        if (e != cudaSuccess)
            return fail(c, err, -EIO, "staging the sends", cudaGetErrorString(e));
    }
    /* Non-blocking communicator: a call may answer ncclInProgress, which
     * is not an error; settle() below waits for the group. */
    ncclGroupStart();
    off = 0;
    for (int i = 0; i < n_sends && (r == ncclSuccess || r == ncclInProgress); i++) {
        if (sends[i].bytes)
            r = ncclSend(c->dev + off, sends[i].bytes, ncclUint8, sends[i].peer, c->comm,
                         c->stream);
        off += up(sends[i].bytes);
    }
    for (int i = 0; i < n_recvs && (r == ncclSuccess || r == ncclInProgress); i++) {
        c->recv[i] = recvs[i];
        c->recv_off[i] = off;
        if (recvs[i].bytes)
            r = ncclRecv(c->dev + off, recvs[i].bytes, ncclUint8, recvs[i].peer, c->comm,
                         c->stream);
        off += up(recvs[i].bytes);
    }
    g = ncclGroupEnd();
    if (r == ncclSuccess || r == ncclInProgress)
        r = g;
    if (r != ncclSuccess && r != ncclInProgress)
        return fail(c, err, -EIO, "posting the group", ncclGetErrorString(r));
    rc = settle(c, deadline, "posting the group", err);
    if (rc < 0)
        return rc;
    if (total > sent) {
        e = cudaMemcpyAsync(c->host + sent, c->dev + sent, total - sent, cudaMemcpyDeviceToHost,
                            c->stream);
        if (e != cudaSuccess)
            return fail(c, err, -EIO, "staging the receives", cudaGetErrorString(e));
    }
    c->n_recv = n_recvs;
    c->pending = true;
    return 0;
}

static int wait_pending(struct moe_nccl *c, uint64_t timeout_ms, struct moe_error *err)
{
    uint64_t deadline = now_ns() + timeout_ms * 1000000ull;
    unsigned us = 5;

    if (c->broken)
        return moe_error_set(err, -EIO, "NCCL rank %d of %d: broken by an earlier failure", c->rank,
                             c->nranks);
    if (!c->pending)
        return 0;
    for (;;) {
        cudaError_t e = cudaStreamQuery(c->stream);
        ncclResult_t r = ncclSuccess, q;

        if (e == cudaSuccess)
            break;
        if (e != cudaErrorNotReady)
            return fail(c, err, -EIO, "waiting", cudaGetErrorString(e));
        q = ncclCommGetAsyncError(c->comm, &r);
        if (q != ncclSuccess || (r != ncclSuccess && r != ncclInProgress))
            return fail(c, err, -EIO, "waiting", ncclGetErrorString(q != ncclSuccess ? q : r));
        if (now_ns() >= deadline)
            return fail(c, err, -ETIMEDOUT, "waiting",
                        "timed out (the peer did not post its side)");
        pause_us(us);
        us = us < 200 ? us * 2 : us;
    }
    for (int i = 0; i < c->n_recv; i++)
        if (c->recv[i].bytes)
            memcpy(c->recv[i].buf, c->host + c->recv_off[i], c->recv[i].bytes);
    c->n_recv = 0;
    c->pending = false;
    return 0;
}

int moe_nccl_post(struct moe_nccl *c, const struct moe_nccl_xfer *sends, int n_sends,
                  const struct moe_nccl_xfer *recvs, int n_recvs, uint64_t timeout_ms,
                  struct moe_error *err)
{
    int prev = device_enter(c->device),
        rc = post_group(c, sends, n_sends, recvs, n_recvs, timeout_ms, err);

    device_leave(prev, c->device);
    return rc;
}

int moe_nccl_wait(struct moe_nccl *c, uint64_t timeout_ms, struct moe_error *err)
{
    int prev = device_enter(c->device), rc = wait_pending(c, timeout_ms, err);

    device_leave(prev, c->device);
    return rc;
}

int moe_nccl_exchange(struct moe_nccl *c, const struct moe_nccl_xfer *sends, int n_sends,
                      const struct moe_nccl_xfer *recvs, int n_recvs, uint64_t timeout_ms,
                      struct moe_error *err)
{
    int prev = device_enter(c->device),
        rc = post_group(c, sends, n_sends, recvs, n_recvs, timeout_ms, err);

    if (rc == 0)
        rc = wait_pending(c, timeout_ms, err);
    device_leave(prev, c->device);
    return rc;
}
