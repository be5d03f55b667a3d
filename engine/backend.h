/*
 * The backend interface: where expert FFNs are computed.  A small table of
 * function pointers, implemented on the CPU in engine/cpu/ and with CUDA in
 * kernels/.  The engine calls only through this table.
 *
 * Memory handed to compute slots (weights, activations) comes from the
 * backend's own alloc slot: host memory for the CPU backend, device memory
 * for CUDA.  Activations and accumulation are fp32; weights are F32, F16 or
 * BF16, row-major [rows, cols] as nn.Linear stores them (y = W x), or, for
 * expert FFNs, quantized (FP8, INT8, INT4, MXFP4 with their scales, see
 * quant.h), which a backend dequantizes inside its kernels or refuses with
 * -ENOTSUP.  A work
 * item's precision may round the activations to bf16 on the way (below).
 *
 * A lost device.  A backend whose device can no longer compute (CUDA: an
 * error that leaves the context unusable, such as an illegal address or an
 * uncorrectable ECC error) returns -ENOTRECOVERABLE from the call that met
 * it and from every later copy and compute call, and alloc returns NULL;
 * its lost slot then says why.  Nothing but freeing the backend is left:
 * the daemon stops serving and exits, to be restarted (moed(8)).
 */
#ifndef MOED_ENGINE_BACKEND_H
#define MOED_ENGINE_BACKEND_H

#include "common.h"

struct moe_backend;

/*
 * An expert's activation of its gate and up values g and u (after their
 * biases, when it has any):
 *   silu:         h = silu(g) * u = g / (1 + exp(-g)) * u
 *   swiglu_clamp: gpt-oss's clamped SwiGLU (transformers' GptOssExperts):
 *                 g' = min(g, limit), u' = clamp(u, -limit, limit),
 *                 h = (u' + 1) * g' * sigmoid(alpha * g')
 */
enum moe_activation {
    MOE_ACT_SILU = 0,
    MOE_ACT_SWIGLU_CLAMP,
};

/*
 * One expert's weights, in backend memory.  Quantized (quant.q != NONE):
 * gate, up and down hold the values and gate_s, up_s, down_s the scales of
 * each matrix as quant.h lays them out, H and F multiples of 32; dtype is
 * then moe_quant_value_dtype(quant.q).
 */
struct moe_expert_weights {
    enum moe_dtype dtype; /* F32, F16 or BF16 (plain) */
    int64_t hidden;       /* H */
    int64_t ffn;          /* F */
    const void *gate;     /* [F, H] */
    const void *up;       /* [F, H] */
    const void *down;     /* [H, F] */
    /* Biases (gpt-oss), fp32 in backend memory, or NULL for none: g = gate x
     * + gate_bias, u = up x + up_bias, y = down h + down_bias. */
    const float *gate_bias;     /* [F] */
    const float *up_bias;       /* [F] */
    const float *down_bias;     /* [H] */
    enum moe_activation act;    /* 0 (silu) when not set */
    float alpha;                /* swiglu_clamp: sigmoid gain (> 0, finite) */
    float limit;                /* swiglu_clamp: clamp (> 0, finite) */
    struct moe_quant_fmt quant; /* .q == MOE_QUANT_NONE (0) for plain weights */
    const void *gate_s;         /* scales of gate, up, down; NULL when plain */
    const void *up_s;
    const void *down_s;
};

/*
 * How an expert FFN treats its activations (a model's compute_precision).
 * Sums are fp32 in both; they differ in what is multiplied with the weights.
 */
enum moe_compute_precision {
    MOE_PRECISION_EXACT = 0, /* x and the SwiGLU intermediate to fp32 accuracy */
    MOE_PRECISION_BF16,      /* x, gate x, up x, silu(gate x) and the SwiGLU
                              * intermediate rounded to bf16, as torch computes
                              * a bf16 model; faster where the CPU multiplies
                              * bf16 natively (AVX-512 BF16, AMX) */
};

/* The tokens one expert computes in a grouped FFN call. */
struct moe_ffn_work {
    const struct moe_expert_weights *w;
    int n_tokens;
    const int32_t *tokens; /* [n_tokens] rows of x, each at most once per work item */
    const float *scales;   /* [n_tokens] routing weight of each token */
    enum moe_compute_precision precision; /* 0 (exact) when not set; backends
                                           * without bf16 compute exactly */
};

struct moe_backend_ops {
    const char *name; /* "cpu", "cuda" */
    bool host_memory; /* alloc returns host memory the CPU may read and write
                       * directly (so callers can skip staging copies) */

    /* Destroys the backend; frees everything it allocated. */
    void (*free)(struct moe_backend *b);

    /* Allocates bytes of backend memory, 64-byte aligned at least; NULL on failure. */
    void *(*alloc)(struct moe_backend *b, size_t bytes);
    /* Frees memory from alloc; NULL is a no-op. */
    void (*mem_free)(struct moe_backend *b, void *p);
    /* Copies host -> backend memory and back.  0 or -errno. */
    int (*copy_in)(struct moe_backend *b, void *dst, const void *src, size_t bytes);
    int (*copy_out)(struct moe_backend *b, void *dst, const void *src, size_t bytes);

    /*
     * y[t, r] = sum_c W[r, c] * x[t, c] for t < n_tokens, r < rows.
     * W [rows, cols] of dtype; x [n_tokens, cols] fp32; y [n_tokens, rows]
     * fp32 (overwritten).  Used for routers and gates.  0 or -errno.
     */
    int (*matmul)(struct moe_backend *b, const void *w, enum moe_dtype dtype, int64_t rows,
                  int64_t cols, const float *x, int n_tokens, float *y);

    /*
     * For every work item and each of its tokens t with scale s:
     *   out[t, :] += s * down(act(gate x[t], up x[t]))
     * with the expert's biases and activation (struct moe_expert_weights);
     * an expert with a bad activation or parameters is -EINVAL.
     * x [n_tokens, hidden] and out [n_tokens, hidden] fp32; out is
     * accumulated into, not overwritten.  Work items may name the same token
     * (that is what top-k does); the backend orders the sums so that the
     * result does not depend on thread timing.  0 or -errno (-ENOMEM when
     * scratch memory cannot be had; out is then unspecified).
     */
    int (*grouped_ffn)(struct moe_backend *b, const float *x, int64_t hidden, int n_tokens,
                       const struct moe_ffn_work *work, int n_work, float *out);

    /*
     * Optional (NULL: nothing kept).  Frees the scratch memory the backend
     * keeps between calls (grown to the largest batch so far), so that a
     * burst of large batches does not hold it for good; later calls
     * allocate again what they need.  May be called from any thread, also
     * while other calls run.
     */
    void (*trim)(struct moe_backend *b);

    /*
     * Optional (NULL: never lost).  NULL while the device works; once a
     * call returned -ENOTRECOVERABLE, one line saying what was lost and
     * why (the CUDA error's name and text), which then never changes and
     * lives as long as the backend.  May be called from any thread.
     */
    const char *(*lost)(struct moe_backend *b);
};

struct moe_backend {
    const struct moe_backend_ops *ops;
    void *priv; /* the implementation's state */
};

struct moe_cpu_config {
    int n_threads;      /* 0: one per online CPU */
    const char *kernel; /* NULL/"auto", or force "generic", "avx2", "avx512", "amx", "onednn" */
    /* int8 activations for int8, int4 and MXFP4 experts (off: exact).  Each 32
     * values of x and of the SwiGLU intermediate are quantized to int8
     * with their own scale (max |x| / 127) and multiplied with the weights
     * in integers (vpmaddubsw): faster where decode runs short of
     * instructions (int4 on AVX2), at int8's error on the activations
     * (about 1% relative on a layer's output in tests/unit/test-quant.c,
     * against about 0.7% for int8 and 12% for int4 weights themselves).
     * Kernels without it (generic) compute
     * exactly; compute_precision bf16 rounds nothing further for these
     * experts. */
    bool act_int8;
};

/* One CPU kernel variant, for listings (moectl --kernel). */
struct moe_cpu_kernel_info {
    const char *name;  /* "onednn", "amx", "avx512", "avx2", "generic" */
    const char *needs; /* the CPU features (or the build) it needs, ", "-separated */
    bool available;    /* this CPU (and build) has them all */
    bool auto_pick;    /* "auto" uses it (onednn: for prefill, beside another) */
    char missing[128]; /* those this CPU lacks ("" when available) */
    char note[160];    /* what it is for, or "" */
};

/* Fills info[0..n) with the CPU kernel variants, best first, and returns
 * how many there are (which may exceed n). */
int moe_backend_cpu_kernels(struct moe_cpu_kernel_info *info, int n);

/* Creates the CPU backend.  -ENOTSUP when a forced kernel is not available
 * on this CPU (err says which features are missing). */
int moe_backend_cpu_init(const struct moe_cpu_config *cfg, struct moe_backend **ret,
                         struct moe_error *err);

/* Name of the kernel the CPU backend picked ("onednn", "amx", "avx512", "avx2",
 * "generic"; "onednn" runs moed's best kernel for everything but prefill). */
const char *moe_backend_cpu_kernel(const struct moe_backend *b);

/* The kernel in words, for benchmarks and logs: the name, and for onednn
 * moed's kernel beside it, oneDNN's version, its instruction set and its
 * matmul implementation here. */
const char *moe_backend_cpu_describe(const struct moe_backend *b);

/* Why b's device is lost, or NULL while it works (or b has no lost slot). */
static inline const char *moe_backend_lost(struct moe_backend *b)
{
    return b && b->ops->lost ? b->ops->lost(b) : NULL;
}

/*
 * Fault injection, for tests (moed's MOED_BACKEND_FAULTS, moed(8)): a
 * backend that passes every call to inner until the Nth grouped_ffn,
 * matmul or copy (copy_in and copy_out counted together) call, counted
 * from 1 over the backend's life, which loses the device as a sticky CUDA
 * error would: that call and every later copy and compute call return
 * -ENOTRECOVERABLE without reaching inner, alloc returns NULL, and lost
 * says which fault it was.  0 disables each.
 */
struct moe_backend_faults {
    uint64_t ffn_nth;    /* the Nth grouped_ffn call loses the device */
    uint64_t matmul_nth; /* the Nth matmul call */
    uint64_t copy_nth;   /* the Nth copy_in or copy_out call */
};

/* Wraps inner (taken: freed with the wrapper, also when this fails) in
 * the fault-injecting backend above, of the same name and memory.  0, or
 * -ENOMEM with err. */
int moe_backend_faults_wrap(struct moe_backend *inner, const struct moe_backend_faults *f,
                            struct moe_backend **ret, struct moe_error *err);

static inline void moe_backend_free(struct moe_backend *b)
{
    if (b)
        b->ops->free(b);
}

#endif
