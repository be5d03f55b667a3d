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
 *     28  u32      flags      (bit 0: lookahead; readers refuse unknown bits)
 *     32  u64      expert_bytes (bytes of one routed expert: cache sizes
 *                               in bytes convert to experts with it)
 *     40  u64      n_records  (0 when the writer did not close the file:
 *                              readers then take every whole record)
 *     48  char[64] model name, NUL-padded (e.g. "mixtral" or a directory name)
 *     112 u8[16]   zero
 *   records, 8 + 2 * top_k bytes each (8 + 4 * top_k with lookahead), in
 *   the order the layers were run:
 *     u32 token   (position in the stream, from 0)
 *     u16 layer   (a MoE layer of the model)
 *     u16 zero
 *     u16 expert[top_k]  (distinct, < n_experts)
 *     u16 next[top_k]    (lookahead only: the experts the next MoE layer's
 *                         router picks on this layer's input, what the
 *                         engine's prefetcher sees; all 0xffff at the last
 *                         MoE layer or when not computed)
 *
 * Replay: a step is a maximal run of consecutive records of one layer (one
 * forward call of a batch of tokens); its accesses are the distinct experts
 * of those records.
 */
#ifndef MOED_ENGINE_TRACE_H
#define MOED_ENGINE_TRACE_H

#include "cache.h"
#include "common.h"

#define MOE_TRACE_MAGIC "MOETRACE"
#define MOE_TRACE_VERSION 1
#define MOE_TRACE_HEADER_BYTES 128
#define MOE_TRACE_MAX_TOPK 64
#define MOE_TRACE_F_LOOKAHEAD 1u
#define MOE_TRACE_NO_EXPERT 0xffffu
#define MOE_TRACE_MAX_LAYERS 1024
#define MOE_TRACE_MAX_EXPERTS 65535
/* moe_trace_read refuses larger files (the whole file is read into memory). */
#define MOE_TRACE_MAX_FILE_BYTES (8ull << 30)
/* Tokens routed together by moe_trace_generate. */
#define MOE_TRACE_MAX_BATCH 4096

struct moe_trace_info {
    char model[64];
    int n_layers;
    int n_experts;
    int top_k;
    uint64_t expert_bytes;
    bool lookahead; /* records carry the next layer's lookahead routing */
};

struct moe_trace_writer;
struct moe_model;
struct moe_engine;

/* info for m's traces: its shape and expert bytes; name (cut to 63 bytes,
 * may be NULL) names the model in the header. */
void moe_trace_info_from_model(const struct moe_model *m, const char *name,
                               struct moe_trace_info *ret);

/* Creates (truncates) path and writes the header (the model name is cut to
 * 63 bytes).  0 or -errno with err: -EINVAL for a shape out of the limits
 * above. */
int moe_trace_writer_open(const char *path, const struct moe_trace_info *info,
                          struct moe_trace_writer **ret, struct moe_error *err);
/* Appends n_tokens records of one layer: ids [n_tokens, top_k], token
 * numbers first_token, first_token + 1, ...  Thread-safe.  0 or -errno
 * (the first write error sticks and is returned by close too).  A bad call
 * (layer out of range, an id out of range or twice for one token, tokens past
 * 2^32) writes nothing and fails with -EINVAL or -EOVERFLOW, sticky too: the
 * trace would be incomplete. */
int moe_trace_write(struct moe_trace_writer *w, uint32_t first_token, int layer, const int32_t *ids,
                    int n_tokens);
/* The same with the lookahead routing of each token, next [n_tokens,
 * top_k] (NULL: none), kept when the trace has lookahead. */
int moe_trace_write_ahead(struct moe_trace_writer *w, uint32_t first_token, int layer,
                          const int32_t *ids, const int32_t *next, int n_tokens);
/* At most max_records records (0: no limit): a call that would pass it is
 * dropped whole (not an error) and the writer counts as full. */
void moe_trace_writer_set_limit(struct moe_trace_writer *w, uint64_t max_records);
/* Records appended so far; *ret_full (may be NULL): a call was dropped at
 * the limit; *ret_error (may be NULL): the sticky error, 0 none. */
uint64_t moe_trace_writer_records(struct moe_trace_writer *w, bool *ret_full, int *ret_error);
/* What w was opened with. */
const struct moe_trace_info *moe_trace_writer_info(const struct moe_trace_writer *w);
/* Flushes, patches n_records, closes, frees (always; NULL is a no-op).
 * 0 or -errno with err saying what failed first; the file then keeps the
 * records written before the failure and n_records = 0. */
int moe_trace_writer_close(struct moe_trace_writer *w, struct moe_error *err);

/* A trace in memory. */
struct moe_trace {
    struct moe_trace_info info;
    uint64_t n_records;
    uint32_t *token;  /* [n_records] */
    uint16_t *layer;  /* [n_records] */
    uint16_t *expert; /* [n_records * top_k] */
    uint16_t *next;   /* [n_records * top_k] lookahead, or NULL without */
};

/*
 * Parses a whole trace file image (len bytes); fname names it in messages.
 * Refuses, with the record number, its byte offset and what is wrong: bad
 * magic, version, header bytes, n_layers outside 1..1024, n_experts outside
 * 1..65535, top_k outside 1..min(64, n_experts), unknown flags, a model name
 * without a NUL, non-zero reserved bytes (header 112..127, a record's zero
 * field), a layer >= n_layers, an expert >= n_experts, an expert twice in
 * one record; when n_records != 0 a file holding fewer records (truncated)
 * or more bytes than those records; when n_records = 0 (a writer that did
 * not close) a partial trailing record.  expert_bytes is not checked (0:
 * unknown).  0 and *ret (free with moe_trace_free), or -EINVAL/-ENOMEM.
 */
int moe_trace_parse(const void *buf, size_t len, const char *fname, struct moe_trace **ret,
                    struct moe_error *err);
/* Reads path (at most MOE_TRACE_MAX_FILE_BYTES) and parses it. */
int moe_trace_read(const char *path, struct moe_trace **ret, struct moe_error *err);
/* NULL is a no-op. */
void moe_trace_free(struct moe_trace *t);

/* One replay step: records [first, first + n) of one layer. */
struct moe_trace_step {
    uint64_t first;
    uint32_t n;
    uint16_t layer;
};

/* Splits t into steps; *ret is malloc'd (free it).  0 or -ENOMEM.  A run
 * of more than UINT32_MAX records is split into steps of at most that. */
int moe_trace_steps(const struct moe_trace *t, struct moe_trace_step **ret, uint64_t *n_steps);

/* Belady's MIN (the optimal offline policy) on t's steps for a cache of
 * capacity experts: on a miss with a full cache it evicts the resident
 * expert used farthest in the future, never one of the current step.
 * Counts accesses as cache-sim does (distinct experts per step), experts
 * keyed by (layer, expert); the cache starts empty.  O(accesses log
 * capacity) time, O(accesses) memory.  -EINVAL with err when a step has
 * more distinct experts than capacity, -ENOMEM. */
struct moe_belady_result {
    uint64_t accesses;
    uint64_t hits;
};
int moe_trace_belady(const struct moe_trace *t, uint64_t capacity, struct moe_belady_result *ret,
                     struct moe_error *err);

/* What a replay of t involves (cache-sim's accounting). */
struct moe_trace_summary {
    uint64_t n_steps;
    uint64_t accesses;    /* distinct experts per step, summed */
    int n_moe_layers;     /* distinct layers in the records */
    uint32_t max_step;    /* most distinct experts of one step: the least capacity */
    uint64_t max_step_at; /* the first step with that many */
    uint64_t distinct;    /* distinct (layer, expert) pairs */
};
/* 0 or -ENOMEM. */
int moe_trace_summarize(const struct moe_trace *t, struct moe_trace_summary *ret);

/*
 * The replay's model of time.  One disk serves reads in the order they are
 * queued (FIFO, a demand read waits behind the prefetches queued before it):
 * a read of b bytes queued at time q starts at s = max(q, when the disk is
 * free), holds the disk for b / disk_bw and is ready at s + b / disk_bw +
 * disk_latency (the latency overlaps the next read's transfer, as with many
 * reads in flight).  A step starts when the one before it ends; its demand
 * reads are queued at its start, then the prefetches its routing starts; it
 * computes once every expert it uses is ready (a hit on a prefetch still in
 * flight waits for it), for compute_step + its experts' bytes / compute_bw.
 * Stall: the time from a step's start until its experts are ready.
 */
struct moe_trace_timing {
    double disk_bw;        /* bytes per second, > 0 */
    double disk_latency;   /* seconds per read on top of its transfer, >= 0 */
    double compute_step;   /* seconds per step (a layer's forward of a batch), >= 0 */
    double compute_bw;     /* expert bytes the compute reads per second; 0: no such part */
    uint64_t expert_bytes; /* bytes read per page-in; 0: the trace's */
};
/* The pager's measured page-in throughput (4.5 GB/s with several experts in
 * flight) and the fixed part of its one-expert page-ins (1.7 ms: 352 MB in
 * 67.3 ms, 88 MB in 18.1 ms), README Performance; the CPU kernel reads expert
 * weights at about 40 GB/s in decode. */
#define MOE_TRACE_DISK_BW 4.5e9
#define MOE_TRACE_DISK_LATENCY 1.7e-3
#define MOE_TRACE_COMPUTE_BW 40e9
/* Fills tm with the defaults above (compute_step 0, expert_bytes 0). */
void moe_trace_timing_default(struct moe_trace_timing *tm);

/* Result of moe_trace_replay. */
struct moe_trace_replay_result {
    uint64_t accesses;           /* as moe_trace_belady counts them */
    uint64_t hits;               /* of them, resident when acquired (ref.hit) */
    uint64_t tokens;             /* records / MoE layers of the trace */
    uint64_t bytes_read;         /* page-ins times the timing's expert bytes */
    uint64_t late_hits;          /* hits that waited for a prefetch still in flight */
    double stall;                /* seconds the steps waited for their experts */
    double compute;              /* seconds they computed */
    struct moe_cache_counters c; /* the cache's totals at the end (prefetches, evictions...) */
};

/*
 * Replays t through the real cache in simulation (cfg->simulate forced on,
 * host_bytes set to capacity slots of the trace's expert_bytes rounded up to
 * MOE_PAGER_ALIGN, as the cache lays a shape's experts out; 0 expert_bytes
 * counts as 1): the cache is given the MoE layers seen in t only,
 * renumbered in order (dense layers would count in its layer distances and
 * next-layer pairs); for each step, its distinct experts are acquired as one
 * batch (held together: none is evicted to make room for another; every one
 * is ready at once; hits counted from ref.hit), the step's routing
 * [records, top_k] goes to moe_cache_observe, then the experts are released
 * (the order of a forward).  Time as tm says (NULL: the defaults); the
 * cache's prefetcher sees the disk model's backlog.  0, or -errno with err
 * (a cache call failed, capacity below a step's experts).
 */
int moe_trace_replay(const struct moe_trace *t, uint64_t capacity,
                     const struct moe_cache_config *cfg, const struct moe_trace_timing *tm,
                     struct moe_trace_replay_result *ret, struct moe_error *err);

/*
 * A synthetic token stream with temporal locality, routed by m's real
 * routers (moe_layer_route on e), written to w in decode order: for each
 * batch of `batch` tokens, every MoE layer in order (dense layers are
 * skipped), the batch's records with their token numbers.
 *
 * Input states: eight random directions ("topics"); the current topic
 * changes on average every few dozen tokens and the topic mixture moves
 * towards it a little every token (a smooth transition); each token is the
 * normalised mixture + a per-token component that is AR(1) over tokens +
 * noise, about unit variance per element.  Through the layers a residual
 * stream: h_{l+1} = h_l + a small perturbation of layer l (a fixed
 * layer-specific direction plus a token-dependent part, itself AR(1) over
 * tokens), so that consecutive layers see correlated states; each router
 * sees h_l scaled to unit root mean square, as after the RMSNorm before a
 * real router.  All values come from counter-based generators seeded by
 * (seed, what, token, layer), with IEEE arithmetic and sqrt only (no libm
 * transcendentals): a seed gives the same states on every machine and the
 * same trace on one machine (another CPU kernel may round a logit
 * differently); a token's states do not depend on the batch size.
 *
 * w must be open for m's shape (moe_trace_info_from_model).  0, or -errno
 * with err (routing or writing failed: the trace is incomplete).
 */
int moe_trace_generate(struct moe_engine *e, const struct moe_model *m, int n_tokens, uint64_t seed,
                       int batch, struct moe_trace_writer *w, struct moe_error *err);

#endif
