/*
 * NCCL point-to-point transport between moed nodes (moe_nccl.c): a
 * communicator made from a unique id that the nodes exchange over their own
 * channel (moed: the moe.v1.Peer service), and grouped ncclSend/ncclRecv of
 * host buffers staged through the device.
 *
 * Everything here waits with a deadline: a peer that dies or stops
 * answering makes the call fail with -ETIMEDOUT (or -EIO for an NCCL
 * error), the communicator is aborted and marked broken, and every later
 * call on it fails at once; the caller makes a new one.  Nothing blocks
 * forever, so a dead node never hangs the daemon.
 *
 * Threads: one communicator is used by one thread at a time (the caller
 * serialises); different communicators may be used from different threads.
 * Every call selects the communicator's device first.
 *
 * Built only where the CUDA Toolkit's NCCL is found (MOED_HAVE_NCCL);
 * moe_nccl_unique_id works without a GPU, the rest needs one.
 */
#ifndef MOED_KERNELS_MOE_NCCL_H
#define MOED_KERNELS_MOE_NCCL_H

#include "common.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_NCCL_ID_BYTES 128
/* Staging made at join, each way: a post of up to this many bytes to send
 * and as many to receive never grows it. */
#define MOE_NCCL_STAGING_BYTES (16u << 20)

struct moe_nccl;

/* The NCCL library's version as "2.28.9". */
const char *moe_nccl_version(void);

/*
 * Whether this process can use NCCL on `device`: the library and a CUDA
 * device (ncclCommInitRank needs one).  0, or -ENODEV with why.
 */
int moe_nccl_usable(int device, struct moe_error *err);

/* A fresh unique id for a new communicator (no GPU needed).  0 or -errno. */
int moe_nccl_unique_id(uint8_t id[MOE_NCCL_ID_BYTES], struct moe_error *err);

/*
 * Joins the communicator of `id` as `rank` of `nranks` on `device`; every
 * rank must call it with the same id within timeout_ms.  Non-blocking
 * initialisation, polled: past the deadline it is aborted, -ETIMEDOUT.
 * Before it returns, every pair of ranks is connected both ways (a byte
 * each), so that later transfers never wait for a peer to connect, and
 * 16 MiB of staging is made.
 */
int moe_nccl_open(const uint8_t id[MOE_NCCL_ID_BYTES], int nranks, int rank, int device,
                  uint64_t timeout_ms, struct moe_nccl **ret, struct moe_error *err);

/* Aborts the communicator and frees it; NULL is fine.  May wait for every
 * kernel on the device: a caller holding locks runs it on another thread. */
void moe_nccl_close(struct moe_nccl *c);

int moe_nccl_rank(const struct moe_nccl *c);
int moe_nccl_nranks(const struct moe_nccl *c);
/* True once an operation failed or timed out: only moe_nccl_close is left. */
bool moe_nccl_broken(const struct moe_nccl *c);
/* True between a post and the wait that ends it. */
bool moe_nccl_pending(const struct moe_nccl *c);
/* Bytes one post can send, and receive, without growing its staging
 * (growing frees and pins memory, which may wait for the whole device). */
size_t moe_nccl_capacity(const struct moe_nccl *c);

struct moe_nccl_xfer {
    int peer;  /* rank */
    void *buf; /* host memory: read for a send, written for a receive */
    size_t bytes;
};

/*
 * Posts one group of sends and receives (any ranks, this one included) and
 * returns without waiting for them: the sends' bytes are copied out before
 * it returns (the caller may reuse them), the receives land in their
 * buffers only in moe_nccl_wait, which the caller must call before its next
 * post.  A post while an earlier one is still running first waits for it
 * (up to timeout_ms).  0, or -errno with err (the communicator is then
 * broken, except for -EINVAL and -ENOMEM, which post nothing).
 */
int moe_nccl_post(struct moe_nccl *c, const struct moe_nccl_xfer *sends, int n_sends,
                  const struct moe_nccl_xfer *recvs, int n_recvs, uint64_t timeout_ms,
                  struct moe_error *err);

/*
 * Waits up to timeout_ms for what was posted; then copies the received
 * bytes into the receive buffers.  0 (also when nothing was posted), or
 * -ETIMEDOUT / -EIO with err (the communicator is then broken and aborted).
 */
int moe_nccl_wait(struct moe_nccl *c, uint64_t timeout_ms, struct moe_error *err);

/* post then wait: one exchange. */
int moe_nccl_exchange(struct moe_nccl *c, const struct moe_nccl_xfer *sends, int n_sends,
                      const struct moe_nccl_xfer *recvs, int n_recvs, uint64_t timeout_ms,
                      struct moe_error *err);

#ifdef __cplusplus
}
#endif

#endif
