/*
 * libmoe-client: the local fast path to moed, in the spirit of liburing.
 *
 * A session is one Unix-socket connection to moed plus one shared mapping
 * that holds a submission ring, a completion ring and a data arena.  Buffers
 * allocated in the arena (moe_alloc) are read and written by moed in place:
 * a request names them, nothing is copied through the socket.
 *
 *   struct moe_session *s;
 *   struct moe_model_info m;
 *   struct moe_completion c;
 *   if (moe_connect("/run/moed/moed.sock", NULL, &s) < 0)
 *       errx(1, "%s", moe_connect_error());
 *   moe_model_find(s, NULL, &m);
 *   uint16_t *in = moe_alloc(s, n * m.hidden * 2), *out = moe_alloc(s, n * m.hidden * 2);
 *   struct moe_request r = {.op = MOE_OP_FORWARD, .model = m.id, .layer = 1,
 *                           .dtype = MOE_BF16, .n_tokens = n, .input = in, .output = out};
 *   if (moe_forward(s, &r, &c) < 0)
 *       errx(1, "%s", moe_last_error(s));
 *   moe_close(s);
 *
 * Errors: every function that can fail returns 0 (or a count) or a negative
 * errno; moe_strerror(rc) names the code, moe_last_error(s) (or, before a
 * session exists, moe_connect_error()) says in detail what went wrong.
 * Codes with a protocol meaning:
 *   -ECONNRESET       moed ended the session (stopped, restarted, or
 *                     dropped this client); every later call on the session
 *                     returns it: moe_close it and moe_connect again
 *   -EPROTONOSUPPORT  moed speaks another protocol version
 *   -EACCES           moed refused this client (uid/gid not allowed)
 *   -EPROTO           moed sent something this library cannot make sense of
 *   -EAGAIN           nothing ready (moe_poll), or too many requests in
 *                     flight / the submission ring is full (moe_submit)
 *   -ETIMEDOUT        moe_wait's timeout passed
 *   -ENOENT           no such model, or the layer is not a MoE layer
 *   -ERANGE, -EINVAL  a malformed request (moed's check, in c->status)
 *
 * Thread safety: a session is NOT thread-safe.  Use one session per thread,
 * or serialise every call on a session with your own lock (like an io_uring
 * instance).  Different sessions are independent and may be used from
 * different threads at once.  moe_strerror and moe_model_is_moe_layer are
 * thread-safe; moe_connect_error is per thread.
 *
 * Ownership: moe_connect returns a session the caller frees with
 * moe_close (which also unmaps the arena: every moe_alloc buffer becomes
 * invalid).  Buffers from moe_alloc belong to the caller until moe_free or
 * moe_close; while a request naming a buffer is in flight, moed reads its
 * input and writes its output: do not free or reuse them until its
 * completion has been returned.  Strings returned by moe_last_error,
 * moe_connect_error and moe_strerror are owned by the library; they stay
 * valid until the next call on the same session (same thread for the other
 * two).
 *
 * Forking: a child inherits the mapping but must not use the parent's
 * session; it connects its own.
 */
#ifndef MOE_CLIENT_H
#define MOE_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define MOE_API __attribute__((visibility("default")))
#else
#define MOE_API
#endif

#define MOE_CLIENT_VERSION 1 /* the shared-memory protocol version spoken */

/* Activation (and weight) dtypes; the values are the protocol's. */
enum moe_act_dtype {
    MOE_DTYPE_OTHER = -1, /* only in moe_model_info.weight_dtype: not one of these */
    MOE_F32 = 0,
    MOE_F16 = 1,
    MOE_BF16 = 2,
};

/* Opcodes of a request. */
enum moe_op {
    MOE_OP_NOP = 0,     /* answered at once: measures the rings' round trip */
    MOE_OP_FORWARD = 1, /* one MoE layer for n_tokens rows of hidden states */
};

#define MOE_SESSION_POLL 1u /* moe_wait/moe_forward spin instead of sleeping on the futex */

/* Options of moe_connect; a NULL pointer or zeroed fields mean defaults. */
struct moe_session_opts {
    uint32_t sq_entries;  /* submission ring: power of two in [2, 4096]; 0: 256 (the
                           * completion ring is twice as large) */
    uint64_t arena_bytes; /* shared arena; 0: 64 MiB (moed may cap it) */
    unsigned flags;       /* MOE_SESSION_* */
    const char *name;     /* for moed's logs (31 bytes kept); NULL: the program's name */
};

#define MOE_MAX_MODELS 64 /* the most models moe_models can report */

/* A model loaded in moed. */
struct moe_model_info {
    uint32_t id;                     /* what a request names (moe_request.model) */
    char name[64];                   /* NUL-terminated */
    char arch[32];                   /* e.g. "mixtral", NUL-terminated */
    enum moe_act_dtype weight_dtype; /* or MOE_DTYPE_OTHER (-1) */
    int n_layers, hidden, n_experts, top_k, ffn;
    int n_shared;                /* shared experts per MoE layer */
    unsigned char moe_layer[32]; /* bit l (moe_layer[l / 8] & 1 << l % 8): layer l is MoE */
};

/* Non-zero when layer is a MoE layer of m (one a FORWARD may name). */
static inline int moe_model_is_moe_layer(const struct moe_model_info *m, int layer)
{
    return layer >= 0 && layer < m->n_layers && layer < 256 &&
           ((m->moe_layer[layer / 8] >> (layer % 8)) & 1);
}

/*
 * A request.  FORWARD: output[t] = MoE layer `layer` of `model` applied to
 * input[t], for n_tokens rows of `hidden` elements of dtype.  input and
 * output must lie in this session's arena (moe_alloc), aligned to the
 * element size, and must not overlap.  ids/weights: optional routing chosen
 * by the caller, int32 and float [n_tokens, top_k] in the arena (both or
 * neither); NULL: moed routes with the model's router.  NOP: only op and tag
 * are used.
 */
struct moe_request {
    int op;         /* enum moe_op */
    uint32_t model; /* moe_model_info.id */
    int layer;
    enum moe_act_dtype dtype; /* of input and output */
    uint32_t n_tokens;        /* 1 .. 2^20 */
    const void *input;        /* [n_tokens, hidden] */
    void *output;             /* [n_tokens, hidden] */
    const int32_t *ids;       /* [n_tokens, top_k] or NULL */
    const float *weights;     /* [n_tokens, top_k] or NULL */
    uint64_t tag;             /* the caller's; returned in the completion */
};

/* What moed answered to one request. */
struct moe_completion {
    uint64_t tag;                          /* the request's */
    int status;                            /* 0, or -errno with msg saying what is wrong */
    uint32_t hits, misses;                 /* experts resident / paged in for this request */
    uint32_t batch_requests, batch_tokens; /* the cross-caller batch that served it */
    uint64_t queue_ns;                     /* submission seen by moed to batch start */
    uint64_t compute_ns;                   /* the batch's forward */
    uint64_t total_ns;                     /* submission seen to completion posted */
    char msg[104];                         /* NUL-terminated; empty on success */
};

struct moe_session;

/*
 * Connects to moed's shared-memory socket and sets up a session.  Returns 0
 * and sets *ret, or -errno with *ret set to NULL and moe_connect_error()
 * saying why (e.g. -ENOENT no socket at the path, -EACCES refused by moed
 * or by the socket's permissions, -EPROTONOSUPPORT another protocol
 * version, -ETIMEDOUT no answer to the handshake within 10 s).
 */
MOE_API int moe_connect(const char *socket_path, const struct moe_session_opts *opts,
                        struct moe_session **ret);

/* The last moe_connect failure on this thread, in words ("" if none). */
MOE_API const char *moe_connect_error(void);

/* Closes the session: the socket (moed then reclaims its requests and
 * memory) and the mapping.  Requests in flight are abandoned.  NULL: no-op. */
MOE_API void moe_close(struct moe_session *s);

/* The last failure on s in words ("" if none); s NULL: moe_connect_error(). */
MOE_API const char *moe_last_error(const struct moe_session *s);

/* A short text for a -errno (or errno) this library returns. */
MOE_API const char *moe_strerror(int code);

/*
 * Asks moed which models are loaded (one socket round trip each call) and
 * writes up to max of them to out.  Returns how many were written, or, when
 * out is NULL, how many are loaded; or -errno.
 */
MOE_API int moe_models(struct moe_session *s, struct moe_model_info *out, int max);

/* Finds a loaded model by name (NULL: the first one).  0, -ENOENT, -errno. */
MOE_API int moe_model_find(struct moe_session *s, const char *name, struct moe_model_info *ret);

/* Allocates bytes (rounded up to 64) in the session's shared arena, 64-byte
 * aligned, uninitialised.  NULL when the arena has no such free range (or
 * the session is dead); moe_last_error says which. */
MOE_API void *moe_alloc(struct moe_session *s, size_t bytes);

/* Frees a moe_alloc buffer.  NULL: no-op; a pointer that moe_alloc did not
 * return is ignored (moe_last_error says so). */
MOE_API void moe_free(struct moe_session *s, void *p);

/* Bytes of the session's arena (0 for NULL). */
MOE_API size_t moe_arena_size(const struct moe_session *s);

/*
 * Queues a request without waiting.  Returns 0; -EAGAIN when as many
 * requests are in flight as the completion ring holds (completions returned
 * by neither moe_wait nor moe_poll count) or the submission ring is full:
 * reap completions and retry; -EINVAL for a malformed request (a buffer
 * outside the arena, a bad op, dtype or count); -ECONNRESET when the
 * session has ended.  *r is copied: it may be reused at once.
 */
MOE_API int moe_submit(struct moe_session *s, const struct moe_request *r);

/*
 * Waits for the next completion (of any request, in moed's order) up to
 * timeout_ms (< 0: forever) and copies it to *c.  Returns 0;
 * -ETIMEDOUT; -EAGAIN at once when no request is in flight; -ECONNRESET
 * when moed has gone (noticed within ~50 ms even while sleeping);
 * -EPROTO when moed corrupted the rings (the session is then dead too).
 */
MOE_API int moe_wait(struct moe_session *s, struct moe_completion *c, int timeout_ms);

/* Returns a completion if one is ready: 0, -EAGAIN when none, or as moe_wait. */
MOE_API int moe_poll(struct moe_session *s, struct moe_completion *c);

/*
 * Submits r and waits for its completion (forever, unless moed goes away).
 * Completions of other requests that arrive meanwhile are kept for later
 * moe_wait/moe_poll.  Returns c->status (0 or moed's -errno, c->msg says
 * why) or a transport -errno (then *c is not written), as moe_submit and
 * moe_wait.
 */
MOE_API int moe_forward(struct moe_session *s, const struct moe_request *r,
                        struct moe_completion *c);

/* The session's socket: poll() it for POLLHUP to notice moed going away. */
MOE_API int moe_session_fd(const struct moe_session *s);

#ifdef __cplusplus
}
#endif

#endif
