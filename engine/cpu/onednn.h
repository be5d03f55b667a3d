/*
 * The CPU backend's oneDNN GEMMs (internal to engine/cpu/; onednn.c, built
 * only where CMake found oneDNN: MOE_HAVE_ONEDNN).  backend_cpu.c uses them
 * for the multi-token GEMMs of bf16 experts in compute_precision bf16.
 *
 * One GEMM: y[m, n] = x[m, k] times W^T, W the n bf16 rows of k elements of
 * a weight matrix as moed stores it (row-major, rows k apart), y fp32 with
 * rows n apart, fp32 accumulation.  x holds bf16 values: as bf16 where the
 * CPU has a oneDNN bf16 matmul (AVX-512 BF16 or AMX, or oneDNN's emulation
 * on plain AVX-512), else as fp32 (an fp32 matmul after the weight block is
 * widened to fp32: exact, so the contract is the same, only slower).
 *
 * Threads: every GEMM runs single-threaded in the moed pool thread that
 * calls it (the OpenMP thread count of that thread is set to 1 for the
 * call and restored after), and its primitive was created for one thread,
 * so its arithmetic does not depend on moed's thread count.
 */
#ifndef MOED_ENGINE_CPU_ONEDNN_H
#define MOED_ENGINE_CPU_ONEDNN_H

#include <stdbool.h>
#include <stdint.h>

#include "common.h"

struct moe_onednn;

/* Creates the state for a pool of n_threads threads.  0 or -errno (err
 * says why). */
int moe_onednn_init(int n_threads, struct moe_onednn **ret, struct moe_error *err);
void moe_onednn_free(struct moe_onednn *d);

/* True when x is bf16 (2 bytes per element), false when fp32. */
bool moe_onednn_bf16(const struct moe_onednn *d);

/* True when oneDNN runs bf16 natively here (AVX-512 BF16 or AMX): the
 * backend's "auto" then uses it for prefill. */
bool moe_onednn_fast(const struct moe_onednn *d);
/* Whether its bf16 matmul runs on AMX tiles. */
bool moe_onednn_amx(const struct moe_onednn *d);

/* oneDNN's version and the instruction set it uses here, for messages. */
const char *moe_onednn_describe(const struct moe_onednn *d);

/* Call before a pool loop's GEMMs, on the calling thread, not during one:
 * forgets primitives when many have accumulated. */
void moe_onednn_begin(struct moe_onednn *d);

/* Makes GEMMs of shape (m, n, k) ready: their primitive, every thread's
 * scratch.  Calling thread, between loops.  0 or -errno. */
int moe_onednn_prepare(struct moe_onednn *d, int64_t m, int64_t n, int64_t k);

/* y = x W^T as above, in a pool task on thread `thread`; the shape must
 * have been prepared.  0 or -errno. */
int moe_onednn_gemm(struct moe_onednn *d, int thread, int64_t m, int64_t n, int64_t k,
                    const void *x, const uint16_t *w, float *y);

/* Frees the primitives and scratch (the backend's trim slot). */
void moe_onednn_trim(struct moe_onednn *d);

#endif
