/*
 * Routing traces: which experts each token used at each layer, recorded by
 * the engine or made by `moectl gen-trace`, replayed by `moectl cache-sim`
 * and the cache benchmarks.
 *
 * File format (all integers little-endian):
 *   header, 128 bytes:
 *     0   char[8]  magic "MOETRACE"
 *     8   u32      version (1)
 *     12  u32      header bytes (128)
 *     16  u32      n_layers   (the model's layers, dense ones included)
 *     20  u32      n_experts  (routed experts per MoE layer, <= 65535)
 *     24  u32      top_k      (experts per token, <= 64)
 *     28  u32      flags      (0; readers refuse unknown bits)
 *     32  u64      expert_bytes (bytes of one routed expert: cache sizes
 *                               in bytes convert to experts with it)
 *     40  u64      n_records  (0 when the writer did not close the file:
 *                              readers then take every whole record)
 *     48  char[64] model name, NUL-padded (e.g. "mixtral" or a directory name)
 *     112 u8[16]   zero
 *   records, 8 + 2 * top_k bytes each, in the order the layers were run:
 *     u32 token   (position in the stream, from 0)
 *     u16 layer   (a MoE layer of the model)
 *     u16 zero
 *     u16 expert[top_k]  (distinct, < n_experts)
 *
 * Replay: a step is a maximal run of consecutive records of one layer (one
 * forward call of a batch of tokens); its accesses are the distinct experts
 * of those records.
 */
#ifndef MOED_ENGINE_TRACE_H
#define MOED_ENGINE_TRACE_H

#include "common.h"

#define MOE_TRACE_MAGIC "MOETRACE"
#define MOE_TRACE_VERSION 1
#define MOE_TRACE_HEADER_BYTES 128
#define MOE_TRACE_MAX_TOPK 64

struct moe_trace_info {
    char model[64];
    int n_layers;
    int n_experts;
    int top_k;
    uint64_t expert_bytes;
};

struct moe_trace_writer;

/* Creates (truncates) path and writes the header.  0 or -errno with err. */
int moe_trace_writer_open(const char *path, const struct moe_trace_info *info,
                          struct moe_trace_writer **ret, struct moe_error *err);
/* Appends n_tokens records of one layer: ids [n_tokens, top_k], token
 * numbers first_token, first_token + 1, ...  Thread-safe.  0 or -errno
 * (the first write error sticks and is returned by close too). */
int moe_trace_write(struct moe_trace_writer *w, uint32_t first_token, int layer,
                    const int32_t *ids, int n_tokens);
/* Flushes, patches n_records, closes, frees.  0 or -errno with err. */
int moe_trace_writer_close(struct moe_trace_writer *w, struct moe_error *err);

/* A trace in memory. */
struct moe_trace {
    struct moe_trace_info info;
    uint64_t n_records;
    uint32_t *token;  /* [n_records] */
    uint16_t *layer;  /* [n_records] */
    uint16_t *expert; /* [n_records * top_k] */
};

/*
 * Parses a whole trace file image (len bytes); fname names it in messages.
 * Refuses, with the record number and what is wrong: bad magic, version,
 * sizes, unknown flags, a layer >= n_layers, an expert >= n_experts, an
 * expert twice in one record, a truncated record when n_records says more.
 */
int moe_trace_parse(const void *buf, size_t len, const char *fname, struct moe_trace **ret,
                    struct moe_error *err);
int moe_trace_read(const char *path, struct moe_trace **ret, struct moe_error *err);
void moe_trace_free(struct moe_trace *t);

/* One replay step: records [first, first + n) of one layer. */
struct moe_trace_step {
    uint64_t first;
    uint32_t n;
    uint16_t layer;
};

/* Splits t into steps; *ret is malloc'd (free it).  0 or -ENOMEM. */
int moe_trace_steps(const struct moe_trace *t, struct moe_trace_step **ret, uint64_t *n_steps);

/* Belady's MIN (the optimal offline policy) on t's steps for a cache of
 * capacity experts: on a miss with a full cache it evicts the resident
 * expert used farthest in the future, never one of the current step.
 * Counts accesses as cache-sim does (distinct experts per step). */
struct moe_belady_result {
    uint64_t accesses;
    uint64_t hits;
};
int moe_trace_belady(const struct moe_trace *t, uint64_t capacity, struct moe_belady_result *ret,
                     struct moe_error *err);

#endif
