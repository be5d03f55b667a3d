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
 * Memory (membudget.h): each request is charged what it is estimated to
 * use (moe_sched_request_bytes) while its batch runs, against
 * cfg.mem_limit.  A batch whose first request does not fit waits until
 * running batches give enough back (requests behind it wait too: first
 * come, first served); later requests join a batch only while they fit.
 * Submit refuses with -ENOSPC a request larger than the whole limit, and
 * one that would make the requests waiting hold more than the limit again
 * (they hold their input and output buffers while they wait).  When the
 * scheduler has been idle for cfg.trim_idle_ns after a burst, it gives
 * memory back: the backend's scratch (its trim slot), the buffer pool and
 * the heap's free pages (moe_membudget_trim); and again at 2, 4, 8 and 16
 * times that, for what the transports free once slow clients have read
 * their answers.
 *
 * Completion: req->done is called once per request, on a worker thread,
 * with 0 or -errno and a message; req->st, queue_ns, batch_requests and
 * batch_tokens describe the batch that served it.
 */
#ifndef MOED_ENGINE_SCHEDULER_H
#define MOED_ENGINE_SCHEDULER_H

#include "common.h"
#include "layer.h"

struct moe_backend;
struct moe_model;
struct moe_sched;

struct moe_sched_config {
    int n_workers;               /* 0: 2 */
    uint64_t window_ns;          /* 0: 200 us */
    int max_batch_tokens;        /* 0: 4096 */
    uint64_t mem_limit;          /* bytes requests in flight may use; 0: no limit */
    uint64_t trim_idle_ns;       /* idle this long after a burst, give memory back; 0: 1 s */
    uint64_t trim_bytes;         /* a burst: this many bytes charged since the last
                                  * time memory was given back; 0: 64 MiB */
    struct moe_backend *backend; /* whose scratch is given back too; may be NULL */
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
    bool idle_;     /* submitted with nothing pending or running */
    uint64_t mem_;  /* charged to the budget while its batch runs */
    uint64_t held_; /* what it holds while pending (the queue's bound) */
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
    /* the memory budget (membudget.h) */
    uint64_t mem_limit;   /* 0: none */
    uint64_t mem_used;    /* charged by batches running now */
    uint64_t mem_peak;    /* most charged at once */
    uint64_t mem_pending; /* held by requests waiting (estimated) */
    uint64_t mem_waits;   /* times a batch waited for memory */
    uint64_t mem_refused; /* requests refused for memory (-ENOSPC) */
    uint64_t mem_trims;   /* times memory was given back after a burst */
};

int moe_sched_create(const struct moe_sched_config *cfg, struct moe_sched **ret,
                     struct moe_error *err);
/* Finishes every pending and running request, then stops the workers. */
void moe_sched_free(struct moe_sched *s);

/* Queues r.  0, or -ESHUTDOWN once stopping (done is then not called),
 * -EINVAL for a malformed request, or -ENOSPC when its memory does not fit
 * (err says how much it needs, the limit, and what to do). */
int moe_sched_submit(struct moe_sched *s, struct moe_sched_req *r, struct moe_error *err);

/* Waits until nothing is pending or running, at most timeout_ms (0:
 * forever).  Returns the requests completed meanwhile, or -ETIMEDOUT. */
int moe_sched_drain(struct moe_sched *s, uint64_t timeout_ms);
/* Stops accepting (submit answers -ESHUTDOWN); pending requests still run. */
void moe_sched_stop(struct moe_sched *s);

void moe_sched_get_stats(struct moe_sched *s, struct moe_sched_stats *ret);

/*
 * The bytes a request of n_tokens rows for model m is charged: its own
 * buffers as the transports hold them (input and output, the message in
 * and out), the batch's copies, and the forward's scratch (scaled inputs
 * and outputs per routed slot, the backend's prepared inputs and SwiGLU
 * rows, routing).  An estimate from the model's shape, a little above what
 * the CPU backend uses.
 */
uint64_t moe_sched_request_bytes(const struct moe_model *m, int n_tokens);

#endif
