/*
 * The shared-memory protocol between moed and libmoe-client, version 1.
 * Both sides include this header; nothing here links the engine or gRPC.
 *
 * Session set-up, over moed's Unix socket (SOCK_SEQPACKET, one message per
 * struct, host byte order: both ends are on one machine):
 *
 *   client                                   daemon
 *   connect(shm_socket)
 *   moe_shm_hello  ------------------------> SO_PEERCRED uid/gid checked
 *                                            against the allow-list; magic
 *                                            and version checked
 *                  <------------------------ moe_shm_welcome (+ the memfd by
 *                                            SCM_RIGHTS when status is 0)
 *   mmap(memfd), check the header
 *   moe_shm_msg MODELS -------------------->
 *                  <------------------------ moe_shm_models + n model infos
 *   ... requests through the rings ...
 *   close(socket)                            reclaims the session
 *
 * A hello of another version gets a welcome with status
 * -EPROTONOSUPPORT and a message naming both versions (the welcome's first
 * three fields never change between versions, so that any client can read
 * that answer).
 *
 * The memfd (sealed against shrinking and growing: F_SEAL_SHRINK |
 * F_SEAL_GROW | F_SEAL_SEAL) holds, each part 4 KiB aligned:
 *
 *   struct moe_shm_header   what follows and where (written once by the
 *                           daemon before the fd is passed; read-only for
 *                           the client by convention; the daemon never
 *                           re-reads it except for `state`, which it owns)
 *   submission ring         client -> daemon, sq_entries struct moe_shm_sqe
 *                           of 64 bytes (one cache line each)
 *   completion ring         daemon -> client, cq_entries struct moe_shm_cqe
 *                           of 64 bytes (one cache line each)
 *   message table           cq_entries messages of MOE_SHM_MSG bytes,
 *                           message i belonging to completion slot i
 *   arena                   the client's activations, inputs and outputs
 *
 * The rings are ipc/ring.h rings: the first 4 bytes of each entry are the
 * ring's sequence word, which the producer stores last and the consumer
 * polls, so that one cache line moves each way per request.  The client
 * allocates in the arena as it likes; a submission names offsets into it.
 *
 * Messages: a completion with cqe.msg_len > 0 comes with a message of
 * msg_len bytes (at most MOE_SHM_MSG - 1, then a NUL) in the message table
 * at the index of its completion-ring slot.  The daemon writes it after
 * reserving the slot and before publishing the completion there (the
 * sequence word's release covers it); the client copies it out after
 * seeing the completion and before releasing the slot (moe_ring_peek, copy,
 * moe_ring_release), so the daemon never overwrites a message not yet read.
 * A successful completion normally has none: no bytes are written for it.
 *
 * Trust: the daemon trusts nothing in the mapping: it copies each
 * descriptor out of the ring, then checks it (moe_shm_check_sqe) against
 * the arena and the model it names; a bad one gets an error completion with
 * a message.  The client bounds every message by MOE_SHM_MSG whatever
 * msg_len says.  The daemon keeps at most cq_entries requests of a session
 * outstanding (taken from the submission ring and not yet released by the
 * client from the completion ring), so that posting a completion never
 * waits for the client.
 */
#ifndef MOED_IPC_SHM_H
#define MOED_IPC_SHM_H

#include "ring.h"

#include <stdint.h>
#include <stddef.h>

#define MOE_SHM_MAGIC 0x314d48534d454f4dull /* "MOEMSHM1" little-endian */
#define MOE_SHM_VERSION 1u
#define MOE_SHM_ALIGN 4096u
#define MOE_SHM_MAX_ARENA (1ull << 48) /* whatever the daemon's cap */

/* Limits a session may ask for. */
#define MOE_SHM_MIN_ENTRIES 2u
#define MOE_SHM_MAX_ENTRIES 4096u
#define MOE_SHM_DEFAULT_ENTRIES 256u
#define MOE_SHM_DEFAULT_ARENA (64ull << 20)
#define MOE_SHM_MAX_TOKENS (1u << 20)
#define MOE_SHM_MAX_TOP_K 64u
#define MOE_SHM_MSG 104 /* bytes of a message of the table (the NUL included) */

/* ---- socket messages ---------------------------------------------------------------- */

enum moe_shm_op {
    MOE_SHM_OP_HELLO = 1,
    MOE_SHM_OP_WELCOME = 2,
    MOE_SHM_OP_MODELS = 3, /* client asks; daemon answers moe_shm_models */
};

struct moe_shm_hello {
    uint64_t magic;
    uint32_t version;
    uint32_t op;          /* MOE_SHM_OP_HELLO */
    uint32_t sq_entries;  /* power of two in [MIN, MAX]; 0: default */
    uint32_t cq_entries;  /* power of two >= sq_entries; 0: 2 * sq_entries */
    uint64_t arena_bytes; /* 0: MOE_SHM_DEFAULT_ARENA; capped by the daemon */
    char name[32];        /* the client's name, for logs (NUL-padded) */
};

struct moe_shm_welcome {
    uint64_t magic;
    uint32_t version; /* the daemon's */
    int32_t status;   /* 0, or -errno: then msg says why and no fd comes */
    uint64_t mapping_bytes;
    uint32_t session;
    uint32_t pad;
    char msg[200];
};

/* The client's request on the socket (op MOE_SHM_OP_MODELS). */
struct moe_shm_msg {
    uint32_t op;
    uint32_t pad;
};

#define MOE_SHM_NAME 64
#define MOE_SHM_MAX_LAYERS 256

/* One model as a client sees it.  dtype: the weights', as MOE_SHM_DTYPE_*
 * (or MOE_SHM_DTYPE_OTHER). */
struct moe_shm_model_info {
    uint32_t id; /* what a submission names; stable while the model is loaded */
    uint32_t dtype;
    uint32_t n_layers;
    uint32_t hidden;
    uint32_t n_experts;
    uint32_t top_k;
    uint32_t ffn;
    uint32_t n_shared; /* shared experts */
    char name[MOE_SHM_NAME];
    char arch[32];
    uint8_t moe_layer[MOE_SHM_MAX_LAYERS / 8]; /* bit l set: layer l is a MoE layer */
};

/* Answer to MODELS: this header, then n moe_shm_model_info. */
struct moe_shm_models {
    uint32_t op; /* MOE_SHM_OP_MODELS */
    uint32_t n;
};

#define MOE_SHM_MAX_MODELS 64

/* ---- the mapping -------------------------------------------------------------------- */

enum moe_shm_state {
    MOE_SHM_RUNNING = 0,
    MOE_SHM_CLOSED = 1, /* the daemon has ended the session (stopping, or a
                         * protocol violation: reason says which) */
};

/* 256 bytes. */
struct moe_shm_header {
    uint64_t magic;        /* MOE_SHM_MAGIC */
    uint32_t version;      /* MOE_SHM_VERSION */
    uint32_t header_bytes; /* sizeof(struct moe_shm_header) */
    uint64_t mapping_bytes;
    uint32_t session;
    uint32_t sq_entries, sq_entry_size; /* entries of the submission ring; 64 */
    uint32_t cq_entries, cq_entry_size; /* entries of the completion ring; 64 */
    uint32_t msg_size;                  /* MOE_SHM_MSG: bytes of one message */
    uint64_t sq_offset, cq_offset;      /* the rings' control blocks (ring.h) */
    uint64_t arena_offset, arena_bytes;
    uint64_t msg_offset;                 /* the message table: cq_entries * msg_size bytes */
    _Alignas(64) _Atomic uint32_t state; /* enum moe_shm_state; written by the daemon */
    char reason[124];                    /* why, once state is CLOSED */
};

/* Activation dtypes of a request. */
enum moe_shm_dtype {
    MOE_SHM_DTYPE_F32 = 0,
    MOE_SHM_DTYPE_F16 = 1,
    MOE_SHM_DTYPE_BF16 = 2,
    MOE_SHM_DTYPE_OTHER = 255,
};

enum moe_shm_opcode {
    MOE_SHM_NOP = 0,     /* answered at once: the ring round trip alone */
    MOE_SHM_FORWARD = 1, /* one MoE layer for n_tokens rows */
};

#define MOE_SHM_F_ROUTING 1u /* ids_off/weights_off hold the caller's routing */

/* A submission: 64 bytes, one cache line. */
struct moe_shm_sqe {
    uint32_t seq;    /* the ring's sequence word (ring.h): the client need not set it */
    uint16_t opcode; /* enum moe_shm_opcode */
    uint16_t flags;  /* MOE_SHM_F_* */
    uint64_t tag;    /* the client's; echoed in the completion */
    uint32_t model;  /* moe_shm_model_info.id */
    int32_t layer;
    uint32_t dtype;       /* enum moe_shm_dtype: of input and output */
    uint32_t n_tokens;    /* 1 .. MOE_SHM_MAX_TOKENS */
    uint64_t in_off;      /* [n_tokens, hidden] in the arena */
    uint64_t out_off;     /* [n_tokens, hidden] in the arena: the MoE output */
    uint64_t ids_off;     /* F_ROUTING: int32 [n_tokens, top_k] */
    uint64_t weights_off; /* F_ROUTING: f32 [n_tokens, top_k] */
};

/* A completion: 64 bytes, one cache line; its message, if any, is in the
 * message table (see the top of this file). */
struct moe_shm_cqe {
    uint32_t seq;   /* the ring's sequence word (ring.h): the daemon need not set it */
    int32_t status; /* 0 or -errno; the message says what is wrong */
    uint64_t tag;   /* the submission's */
    uint32_t hits;  /* experts resident when the batch asked */
    uint32_t misses;
    uint32_t batch_requests; /* requests in the batch that served it */
    uint32_t batch_tokens;
    uint32_t msg_len; /* 0, or bytes of this slot's message (< MOE_SHM_MSG) */
    uint32_t pad;
    uint64_t queue_ns;   /* from submission seen to batch start */
    uint64_t compute_ns; /* the batch's forward */
    uint64_t total_ns;   /* from submission seen to completion posted (0: a NOP) */
};

/* The layout both sides rely on. */
_Static_assert(sizeof(struct moe_shm_sqe) == MOE_RING_CACHELINE, "a submission is one line");
_Static_assert(sizeof(struct moe_shm_cqe) == MOE_RING_CACHELINE, "a completion is one line");
_Static_assert(offsetof(struct moe_shm_sqe, seq) == 0 && offsetof(struct moe_shm_cqe, seq) == 0,
               "entries begin with the ring's sequence word");
_Static_assert(offsetof(struct moe_shm_sqe, tag) == 8 &&
                   offsetof(struct moe_shm_sqe, model) == 16 &&
                   offsetof(struct moe_shm_sqe, in_off) == 32,
               "submission layout");
_Static_assert(offsetof(struct moe_shm_cqe, tag) == 8 &&
                   offsetof(struct moe_shm_cqe, msg_len) == 32 &&
                   offsetof(struct moe_shm_cqe, queue_ns) == 40,
               "completion layout");
_Static_assert(sizeof(struct moe_shm_header) == 256 &&
                   offsetof(struct moe_shm_header, msg_offset) == 80 &&
                   offsetof(struct moe_shm_header, state) == 128,
               "header layout");

/* ---- layout and checks (shm.c) ----------------------------------------------------- */

struct moe_shm_layout {
    uint32_t sq_entries, cq_entries;
    uint64_t sq_offset, cq_offset, msg_offset, arena_offset, arena_bytes, mapping_bytes;
};

/* Where everything goes for the sizes asked for (0s: defaults), the arena
 * capped at max_arena.  0, or -EINVAL with msg saying which value is bad. */
int moe_shm_layout(uint32_t sq_entries, uint32_t cq_entries, uint64_t arena_bytes,
                   uint64_t max_arena, struct moe_shm_layout *ret, char *msg, size_t len);

/* Daemon side: checks a hello message of n bytes (its real length, which
 * may exceed the buffer: only the first sizeof(*ret) are read) and lays
 * out the session it asks for (moe_shm_layout, the arena capped at
 * max_arena).  0 with *ret (name NUL-terminated within it, unless all 32
 * bytes are used) and *ret_layout; or -EPROTO (not a hello: bad magic,
 * size or op), -EPROTONOSUPPORT (another version) or -EINVAL (sizes), with
 * msg saying why. */
int moe_shm_hello_check(const void *buf, size_t n, uint64_t max_arena, struct moe_shm_hello *ret,
                        struct moe_shm_layout *ret_layout, char *msg, size_t len);

/* Writes the header and lays out both rings in a mapping (zeroed or not). */
int moe_shm_init(void *map, const struct moe_shm_layout *l, uint32_t session);

/* Client side: checks a header found in a mapping of map_bytes (magic,
 * version, sizes, every part inside the mapping) and attaches the rings.
 * 0, -EPROTONOSUPPORT (another version) or -EPROTO, with msg. */
int moe_shm_attach(void *map, uint64_t map_bytes, struct moe_ring *sq, struct moe_ring *cq,
                   struct moe_shm_header *ret, char *msg, size_t len);

/* The bytes a model's activations of dtype take per token, or 0 for a dtype
 * that is not MOE_SHM_DTYPE_F32/F16/BF16. */
uint64_t moe_shm_row_bytes(uint32_t dtype, uint32_t hidden);

/*
 * The daemon's check of a submission it has copied out of the ring:
 * opcode, dtype, flags, token count, the model (found among models by id),
 * a MoE layer, every range inside the arena of arena_bytes, input and
 * routing not overlapping the output, alignment of each buffer to its
 * element size.  Returns 0, or -errno with msg:
 *   -EINVAL  malformed (bad opcode/dtype/flags/count, overlap, alignment)
 *   -ERANGE  a range outside the arena
 *   -ENOENT  unknown model or no such MoE layer
 * *model_ret: the model's index in models when 0 is returned (FORWARD).
 */
int moe_shm_check_sqe(const struct moe_shm_sqe *q, uint64_t arena_bytes,
                      const struct moe_shm_model_info *models, int n_models, int *model_ret,
                      char *msg, size_t len);

#endif
