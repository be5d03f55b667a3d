/*
 * The scheduler: batches pending forward requests for the same (engine,
 * layer) from every caller, so that an expert several callers need is paged
 * in and multiplied once, and runs the batches on a pool of workers, so that
 * different layers and models proceed concurrently.
 *
 * A request waits at most window_ns for others to join it (or less, when
 * the pending requests of its key reach max_batch_tokens).  A lone caller
 * does not wait: once a request that found the scheduler idle has waited
 * its whole window with nobody joining, a request that finds it idle runs
 * at once, until a request arrives while another is pending or running
 * (then windows apply again).  A batch is the
 * requests of one key in arrival order, concatenated into one call of
 * moe_layer_forward; requests with caller routing batch only with others
 * with caller routing.  The output rows of each request are its own: the
 * CPU backend's arithmetic per token does not depend on what else is in the
 * batch, so a batched request gets the same bits as alone.
 *
 * Completion: req->done is called once per request, on a worker thread,
 * with 0 or -errno and a message; req->st, queue_ns, batch_requests and
 * batch_tokens describe the batch that served it.
 */
#ifndef MOED_ENGINE_SCHEDULER_H
#define MOED_ENGINE_SCHEDULER_H

#include "common.h"
#include "layer.h"

struct moe_sched;

struct moe_sched_config {
    int n_workers;        /* 0: 2 */
    uint64_t window_ns;   /* 0: 200 us */
    int max_batch_tokens; /* 0: 4096 */
};

struct moe_sched_req;
typedef void (*moe_sched_done_fn)(struct moe_sched_req *r, int status, const char *msg);

struct moe_sched_req {
    struct moe_engine *engine;
    /* The forward (layer.h); batched only with the same layer, flags and
     * kind of routing (caller's or the router's). */
    struct moe_layer_args a;
    moe_sched_done_fn done;
    void *arg;

    /* results */
    struct moe_forward_stats st; /* of the batch */
    uint64_t queue_ns;           /* submitted to batch start */
    int batch_requests;
    int batch_tokens;

    /* private */
    struct moe_sched_req *next_;
    uint64_t t_submit_;
    bool idle_; /* submitted with nothing pending or running */
};

/* Batch histograms: bucket i counts the batches of (2^(i-1), 2^i] requests
 * or tokens (bucket 0: exactly 1); 2^20 is MOE_MAX_TOKENS, so none is larger. */
#define MOE_SCHED_HIST_BUCKETS 21

struct moe_sched_stats {
    uint64_t requests;
    uint64_t tokens;
    uint64_t batches;
    uint64_t failed;
    uint64_t batch_requests[MOE_SCHED_HIST_BUCKETS]; /* batches by requests in them */
    uint64_t batch_tokens[MOE_SCHED_HIST_BUCKETS];   /* batches by tokens in them */
    uint64_t batch_requests_sum, batch_tokens_sum;   /* over every batch run */
    int pending;
    int running;        /* requests in batches being computed */
    uint64_t completed; /* requests whose batch has finished (ok or failed) */
    /* moe_now_ns() of the last batch finished, or of the submit that ended
     * an idle spell: with requests pending or running, now minus this is how
     * long the scheduler has gone without finishing anything. */
    uint64_t last_progress_ns;
};

int moe_sched_create(const struct moe_sched_config *cfg, struct moe_sched **ret,
                     struct moe_error *err);
/* Finishes every pending and running request, then stops the workers. */
void moe_sched_free(struct moe_sched *s);

/* Queues r.  0, or -ESHUTDOWN once stopping (done is then not called) or
 * -EINVAL for a malformed request. */
int moe_sched_submit(struct moe_sched *s, struct moe_sched_req *r, struct moe_error *err);

/* Waits until nothing is pending or running, at most timeout_ms (0:
 * forever).  Returns the requests completed meanwhile, or -ETIMEDOUT. */
int moe_sched_drain(struct moe_sched *s, uint64_t timeout_ms);
/* Stops accepting (submit answers -ESHUTDOWN); pending requests still run. */
void moe_sched_stop(struct moe_sched *s);

void moe_sched_get_stats(struct moe_sched *s, struct moe_sched_stats *ret);

#endif
