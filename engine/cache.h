/*
 * The expert cache: which routed experts are resident, in which tier, and
 * getting the missing ones there.
 *
 * Key: (model, layer, expert).  Tiers form a list, nearest to the compute
 * first: tier 0 is where the backend reads weights (host memory for the CPU
 * backend; the CUDA backend puts a GPU tier per device in front of the host
 * tier), and the files on NVMe are the last tier, behind the list.  Each
 * tier has a byte capacity and its own instance of the replacement policy;
 * tiers are reached only through struct moe_tier_ops (tier.h), so a GPU tier
 * slots in without touching the policy code.
 *
 * A batch acquires the experts it needs, all in one call.  Each reference
 * pins its expert (eviction never touches a pinned expert, nor an
 * operator-pinned one) until the batch releases it.  The call first pins the
 * batch's resident experts, then makes room for the missing ones: eviction,
 * in any tier, never picks an expert of a batch being acquired, so a batch
 * never pages in an expert it had resident.  Resident experts are ready at
 * once; missing ones start a page-in (one per expert: concurrent acquirers
 * of an expert being paged in wait on that same page-in) and the batch can
 * compute on what is ready while the rest loads (moe_cache_wait on each
 * reference in turn).
 *
 * Page-ins read the expert from the model's files with the pager (pager.h):
 * a packed store's blob in one aligned read, straight into the tier's
 * memory, checked against its xxh3; a checkpoint's three tensors by their
 * aligned spans through a bounce buffer, read twice at the expert's first
 * page-in (its checksum, against which later page-ins are checked, is
 * taken only when both reads agree; -EIO when they do not), and read again
 * when a later page-in does not match (whole the second time: served;
 * the same other bytes twice: the file changed, -EBADMSG).  A page-in that fails (EIO, file
 * truncated since load, checksum mismatch) fails every reference waiting on
 * it with the same message and marks the expert bad: later acquires fail at
 * once, without I/O, until moe_cache_retry clears the mark, or until the
 * cache retries it by itself: on its next use after a back-off
 * (moe_cache_config.retry_ms, doubled at each failure up to 64 times), or
 * at once when it failed on a file modified since load and that file has
 * its loaded identity again (put back).  A retry keeps the checksums taken
 * at first page-ins, so a file put back is checked against the bytes
 * first read.
 *
 * Policies (moe_cache_config.policy):
 *   lru      least recently used (the baseline);
 *   freq     least frequently used, counts halved every half_life uses of
 *            the expert's layer;
 *   routing  routing-aware: evicts the expert whose next use is expected
 *            farthest away, from the layer order (the layers just run are
 *            needed last), the expert's decayed popularity in its layer,
 *            and the prefetch predictor's forecast for the next layer;
 *   adaptive lru or routing, whichever would have hit more lately: both
 *            are simulated on shadow copies of the cache's bookkeeping
 *            (policy.h), so it does not lose to lru where recency wins and
 *            keeps routing's gains elsewhere (moed's default).
 *
 * Prefetch (moe_cache_config.prefetch): moe_cache_observe() gives the cache
 * the routing of a batch at a layer; it learns, online, how often expert e
 * at layer l is followed by expert e' at the next MoE layer for the same
 * token, and starts page-ins of the next layer's most likely experts.
 * Prefetched bytes not yet used stay within prefetch_bytes, and a prefetch
 * never evicts a pinned expert or one the policy would rather keep.
 * Throttle: per layer, the cache measures how the predictor's forecasts of
 * its prefetches turned out (used before eviction, or wasted) and calibrates
 * them: a forecast p is worth p * (used / forecast sum) of that layer's
 * recent prefetches.  An expert is prefetched when its calibrated forecast
 * reaches prefetch_precision (so prefetches waste no more than they use at
 * the default 0.5) and the disk's headroom: the share of its read that
 * would still hold the disk when the next step starts (`late`: the delay a
 * wasted prefetch puts on that step's demand reads, as a share of what a
 * used one saves).  A prefetch that the disk finishes before the next step
 * costs nothing but its slot; one queued behind a long backlog pays only
 * when it is nearly certain.  The daemon estimates the share from the bytes
 * of page-ins in flight, the disk's measured throughput and the model's
 * measured time between steps; cache-sim from its disk model.  A layer
 * whose prefetches are mostly wasted is prefetched less, down to none.
 *
 * Statistics are counters updated with relaxed atomics (no lock on the hot
 * path); moe_cache_snapshot() copies them all.
 *
 * Simulation (cfg.simulate): no memory and no I/O; page-ins complete at
 * once.  `moectl cache-sim` replays traces through the same code.
 *
 * Thread safety: every call may be made from any thread.  One mutex guards
 * residency and the policies; page-in completions take it briefly.
 */
#ifndef MOED_ENGINE_CACHE_H
#define MOED_ENGINE_CACHE_H

#include "backend.h"
#include "common.h"
#include "pager.h"

struct moe_cache;
struct moe_model;
struct moe_tier;

#define MOE_CACHE_MAX_TIERS 8

enum moe_cache_policy {
    MOE_POLICY_LRU = 0,
    MOE_POLICY_FREQ,
    MOE_POLICY_ROUTING,
    MOE_POLICY_ADAPTIVE,
    MOE_POLICY_COUNT,
};

/* "lru", "freq", "routing", "adaptive" -> 0 and *ret, or -EINVAL. */
int moe_cache_policy_parse(const char *s, enum moe_cache_policy *ret);
const char *moe_cache_policy_name(enum moe_cache_policy p);

/*
 * Simulation: a model of the disk the cache's reads go to (cache-sim's
 * replay keeps the clock).  Both called with the cache's lock held.
 * read: a read of the expert from the files starts now (a prefetch or a
 * demand page-in).  late: the share, in [0, 1], of a read of bytes queued
 * now that would still hold the disk when the next step starts (0: done
 * before it; 1: not even started by then), which is the delay a wasted
 * prefetch puts on that step's demand reads, over what a used one saves;
 * NULL: 0.
 */
struct moe_cache_disk {
    void *arg;
    void (*read)(void *arg, int model, int layer, int expert, bool prefetch);
    double (*late)(void *arg, uint64_t bytes);
};

struct moe_cache_config {
    uint64_t host_bytes; /* capacity of the host tier */
    enum moe_cache_policy policy;
    bool prefetch;
    uint64_t prefetch_bytes; /* prefetched-but-unused budget; 0: host_bytes / 4 */
    int prefetch_max;        /* experts prefetched per observed batch; 0: 2 * top_k */
    double prefetch_precision; /* least expected precision of a prefetch (used / issued),
                                * by the predictor's forecast calibrated per layer on the
                                * prefetches used and wasted so far (and at least the
                                * disk's `late` share); 0: 0.5; < 0: no throttle */
    double half_life;        /* freq and routing decay, in uses of a layer; 0: 8 */
    uint32_t retry_ms;       /* back-off before a bad expert is retried on its
                              * next use, doubled at each failure up to 64
                              * times; 0: 10 s */
    bool simulate;           /* no memory, no I/O (cache-sim) */
    const struct moe_cache_disk *disk; /* simulation: the disk model, NULL: none;
                                        * must outlive the cache */
    bool register_buffers;   /* register the host tier with io_uring as fixed
                              * buffers: faster reads, but the whole capacity
                              * is locked in memory at start */
    struct moe_pager_config pager;
};

/*
 * The throttle's rule (exposed for tests): whether a prefetch on the
 * predictor's forecast p is worth its read, with cal its layer's
 * calibration (q = p * cal: the chance it is used), want the least
 * precision (moe_cache_config.prefetch_precision), late the share of its
 * read that would still hold the disk when the next step starts
 * (moe_cache_disk) and miss the share of recent steps with a demand miss.
 * True when p is at least the predictor's floor, q >= want and
 * q * (1 - late) > (1 - q) * late * miss: a used prefetch saves the next
 * step 1 - late of a read, a wasted one delays its demand reads by late.
 */
bool moe_cache_prefetch_worth(double p, double cal, double want, double late, double miss);
/*
 * The daemon's estimate of `late` (exposed for tests): a read of bytes
 * queued behind backlog bytes on a disk reading s_per_byte seconds a byte,
 * with step_s seconds until the next step starts: the share of the read
 * after that, in [0, 1]; 0 while s_per_byte or step_s is unknown (<= 0).
 */
double moe_cache_read_late(uint64_t backlog, uint64_t bytes, double s_per_byte, double step_s);

/*
 * Creates the cache with its host tier (memory mapped as needed, not up
 * front) and its pager.  0 or -errno with err.
 */
int moe_cache_create(const struct moe_cache_config *cfg, struct moe_cache **ret,
                     struct moe_error *err);
/* Waits for page-ins in flight, then frees everything.  No reference may be
 * held.  NULL is a no-op. */
void moe_cache_free(struct moe_cache *c);

/* Adds a tier in front of the others (nearest to compute), e.g. a GPU. */
int moe_cache_push_tier(struct moe_cache *c, struct moe_tier *t, struct moe_error *err);

/*
 * Registers a model: its files with the pager, a table of its experts.  The
 * model must outlive its registration.  *ret: the model's id in this cache.
 */
int moe_cache_add_model(struct moe_cache *c, const struct moe_model *m, const char *name, int *ret,
                        struct moe_error *err);
/* For simulation: a model known by its shape only (no files). */
int moe_cache_add_shape(struct moe_cache *c, const char *name, int n_layers, int n_experts,
                        int top_k, uint64_t expert_bytes, int *ret, struct moe_error *err);
/* Drops a model's experts from every tier and closes its files (after its
 * page-ins in flight finish).  -EBUSY while any expert is in use. */
int moe_cache_remove_model(struct moe_cache *c, int model, struct moe_error *err);

/* A batch's hold on one expert. */
struct moe_cache_ref {
    int32_t expert;
    int status;                  /* 0 ready; -EINPROGRESS paging in; -ENOSPC no room now
                                  * (not pinned: use the refs before it, release, then
                                  * acquire again from it); other -errno: failed
                                  * (moe_cache_wait says why) */
    bool hit;                    /* resident when acquired */
    struct moe_expert_weights w; /* valid once status is 0 */
    void *entry_;                /* private */
    bool pinned_;                /* private: holds a pin */
};

/*
 * Acquires the n experts (distinct, in [0, n_experts)) of model's layer, a
 * batch: those resident in tier 0 are pinned first (hits), then room is
 * made for the missing ones, in the order given, never by evicting another
 * expert of the batch from any tier.  refs[i].expert = experts[i].
 *
 * When they cannot all fit at once (the room is pinned by this batch and
 * others), the batch keeps the longest prefix experts[0, p) that fits and
 * the refs from p on get -ENOSPC, unpinned: compute on the prefix, release
 * it, and acquire experts[p, n) again.  Its resident experts after p stay
 * resident for that next call, unless nothing before p could be pinned: then
 * the batch gives up its last experts, one at a time, until experts[0] fits
 * (a batch that holds nothing cannot make progress otherwise).  With nothing
 * of the batch to give up either, -ENOSPC from p = 0 means other batches
 * hold the room (moe_cache_wait_release).
 *
 * Returns 0 with each ref's status set (count hits and misses from ref.hit;
 * the cache counts the refs it pinned, not the deferred ones), or -errno
 * with err for a bad call (no such model or layer, a dense layer, an expert
 * out of range or twice, an expert that can never fit in a tier).  Every ref
 * whose status is 0 or -EINPROGRESS holds a pin: release them all with
 * moe_cache_release.
 */
int moe_cache_acquire(struct moe_cache *c, int model, int layer, const int32_t *experts, int n,
                      struct moe_cache_ref *refs, struct moe_error *err);
/* Waits until ref is ready or failed; 0, or the page-in's -errno with err
 * saying what failed (file, offset, checksum ...). */
int moe_cache_wait(struct moe_cache *c, struct moe_cache_ref *ref, struct moe_error *err);
/* Non-blocking: true when ref is no longer -EINPROGRESS (its status and
 * weights are then set). */
bool moe_cache_ready(struct moe_cache *c, struct moe_cache_ref *ref);
/* Unpins every ref that holds a pin (status 0 or -EINPROGRESS); a ref still
 * paging in keeps its page-in going. */
void moe_cache_release(struct moe_cache *c, struct moe_cache_ref *refs, int n);

/* Waits until some batch releases its pins (or a page-in is in flight, or
 * timeout_ms passes: -ETIMEDOUT).  For a batch that found no room. */
int moe_cache_wait_release(struct moe_cache *c, int timeout_ms);

/*
 * The routing a batch used at a MoE layer: ids [n_tokens, top_k].  Updates
 * the popularity counts and the next-layer predictor (pairing this batch with
 * the previous observed batch of the same model when that was at the
 * previous MoE layer with the same token count) and, with prefetch on,
 * starts page-ins for the next MoE layer's predicted experts.
 */
void moe_cache_observe(struct moe_cache *c, int model, int layer, const int32_t *ids, int n_tokens,
                       int top_k);
/*
 * The same, with lookahead routing: next [n_tokens, top_k], the experts the
 * next MoE layer's router picks on this layer's input (NULL: none).  The
 * predictor trusts it as far as it has been right so far (it measures how
 * many of the experts it named the next layer then used).
 */
void moe_cache_observe_ahead(struct moe_cache *c, int model, int layer, const int32_t *ids,
                             const int32_t *next, int n_tokens, int top_k);
/*
 * Limits prefetch to the experts where mask[layer * n_experts + expert] is
 * non-zero: a cluster node prefetches only what it holds, since the others
 * are computed elsewhere.  The mask is copied; NULL lifts it.  0 or -errno.
 */
int moe_cache_set_prefetch_mask(struct moe_cache *c, int model, const uint8_t *mask,
                                struct moe_error *err);
/* Whether observe uses lookahead routing (prefetch on or routing policy):
 * callers compute it only then. */
bool moe_cache_wants_lookahead(struct moe_cache *c);

#define MOE_CACHE_MAX_OBSERVE 65536 /* tokens per observed batch */

/* Operator calls.  pin: keep resident (paged in now if missing; waits for
 * it); unpin; evict: drop from every tier (-EBUSY if in use or
 * operator-pinned); retry: clear the bad mark (layer or expert -1: all). */
int moe_cache_pin(struct moe_cache *c, int model, int layer, int expert, struct moe_error *err);
int moe_cache_unpin(struct moe_cache *c, int model, int layer, int expert, struct moe_error *err);
int moe_cache_evict(struct moe_cache *c, int model, int layer, int expert, struct moe_error *err);
/* Whether the expert is resident in some tier now (false for a bad one). */
bool moe_cache_resident(struct moe_cache *c, int model, int layer, int expert);
/* retry returns the number of marks cleared; it first takes the current
 * identity of every file of the model as the loaded one
 * (moe_pager_refresh_file: the operator says they are whole again), and
 * keeps the checksums of experts already paged in, against which the next
 * page-ins are checked. */
int moe_cache_retry(struct moe_cache *c, int model, int layer, int expert, struct moe_error *err);

/* Changes capacities and policy at run time (the daemon's SIGHUP): evicts
 * down to a smaller capacity as pins allow. */
int moe_cache_set_capacity(struct moe_cache *c, int tier, uint64_t bytes, struct moe_error *err);

/* Switches every tier to another policy (and prefetch on or off) at run
 * time: resident experts stay, in the new policy's order. */
int moe_cache_set_policy(struct moe_cache *c, enum moe_cache_policy policy, bool prefetch,
                         struct moe_error *err);

/* Tiers in the cache (the host tier is the last). */
int moe_cache_tier_count(struct moe_cache *c);
/* True when tier 0, where acquired weights live, is host memory; false when
 * a backend's tier (a GPU) is in front, whose blocks that backend reads in
 * place. */
bool moe_cache_tier0_host(struct moe_cache *c);

/* The pager, for fault injection and its counters (NULL when simulating). */
struct moe_pager *moe_cache_pager(struct moe_cache *c);

/* ---- statistics --------------------------------------------------------------------- */

#define MOE_HIST_BUCKETS 64

struct moe_cache_counters {
    uint64_t hits;              /* acquires that found the expert resident */
    uint64_t misses;            /* acquires that had to page it in (or wait) */
    uint64_t prefetch_hits;     /* first use of a prefetched expert */
    uint64_t prefetches;        /* prefetch page-ins started */
    uint64_t wasted_prefetches; /* prefetched, evicted unused */
    uint64_t evictions;
    uint64_t page_ins;       /* page-ins completed */
    uint64_t page_in_errors; /* page-ins failed */
    uint64_t bytes_paged;    /* bytes brought into the tier */
    uint64_t prefetched_bytes; /* bytes of the prefetch page-ins started */
    uint64_t wasted_bytes;     /* bytes of the wasted prefetches */
    uint64_t warm_loads;       /* experts paged in by a warm start (moe_cache_warm) */
    uint64_t warm_hits;        /* first uses of an expert a warm start paged in */
};

/* Prefetch precision: used / (used + wasted) prefetches, or -1 when none
 * has turned out yet (prefetches still unused count in neither). */
double moe_cache_prefetch_precision(const struct moe_cache_counters *c);

/* Page-in latency: counts per power-of-two-microsecond bucket. */
struct moe_latency {
    uint64_t count;
    uint64_t sum_ns;
    uint64_t max_ns;
    uint64_t p50_ns, p99_ns;            /* estimated from the buckets */
    uint64_t buckets[MOE_HIST_BUCKETS]; /* bucket i: [2^i, 2^(i+1)) ns */
};

struct moe_cache_tier_stats {
    char name[32];     /* "host", "cuda:0" */
    uint64_t capacity; /* bytes */
    uint64_t used;     /* bytes resident or being paged in */
    uint64_t resident; /* experts */
    struct moe_cache_counters c;
    struct moe_latency latency;
};

struct moe_cache_expert_stats {
    struct moe_cache_counters c; /* over all tiers */
    int8_t tier;                 /* nearest tier holding it, -1: none */
    bool loading;
    bool bad;
    bool operator_pinned;
    uint32_t refs; /* batches using it now */
};

struct moe_cache_model_stats {
    char name[64];
    int id;
    int n_layers;
    int n_experts;
    uint64_t expert_bytes;
    int bad_experts;
    struct moe_cache_expert_stats *experts; /* [n_layers * n_experts], layer-major */
};

struct moe_cache_stats {
    const char *policy;
    bool prefetch;
    int n_tiers;
    struct moe_cache_tier_stats tiers[MOE_CACHE_MAX_TIERS];
    struct moe_cache_counters total; /* every tier */
    int n_models;
    struct moe_cache_model_stats *models;
};

/* Copies every counter.  0 or -ENOMEM.  Free with moe_cache_stats_clear. */
int moe_cache_snapshot(struct moe_cache *c, struct moe_cache_stats *ret);
void moe_cache_stats_clear(struct moe_cache_stats *s);

/*
 * Warm start.  moe_cache_heat fills heat[layer * n_experts + expert] with
 * each expert's uses since the model was added (hits + misses), plus half
 * the heat a warm start gave it (so old heat fades over restarts); 0 for
 * dense layers.  moe_cache_warm starts page-ins of the model's experts with
 * heat > 0, hottest first, while they fit in the room free in every tier up
 * to share (0 < share <= 1) of its capacity: it evicts nothing and does not
 * wait for the reads.  Their first uses count as warm_hits.  Returns the
 * page-ins started, or -errno with err.
 */
int moe_cache_heat(struct moe_cache *c, int model, double *heat, struct moe_error *err);
int moe_cache_warm(struct moe_cache *c, int model, const double *heat, double share,
                   struct moe_error *err);

/* Hit rate hits / (hits + misses), 0 when nothing was asked. */
double moe_cache_hit_rate(const struct moe_cache_counters *c);

#endif
