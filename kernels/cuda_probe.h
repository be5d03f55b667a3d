/*
 * Device discovery for the CUDA backend.  Callable from C; safe on machines
 * with the toolkit but no GPU or no driver (reports zero devices).
 */
#ifndef MOED_KERNELS_CUDA_PROBE_H
#define MOED_KERNELS_CUDA_PROBE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Returns the number of usable CUDA devices (0 when there is no driver or no
 * device) and writes a one-line reason or description to msg.
 */
int moe_cuda_probe(char *msg, size_t msg_len);

/* Runs a small kernel on device 0 and checks its result; 0 on success,
 * -1 with msg set otherwise. */
int moe_cuda_selftest(char *msg, size_t msg_len);

#ifdef __cplusplus
}
#endif

#endif
