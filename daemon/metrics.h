/*
 * moed's Prometheus endpoint: GET /metrics on the [server] metrics address,
 * in the text exposition format 0.0.4, served by libmicrohttpd from its own
 * polling thread.
 *
 * Two parts:
 *   - the request series, one per (model, transport), counted where a
 *     Forward is answered (service.c, later the shared-memory transport):
 *     requests, tokens, errors per gRPC status and a latency histogram, all
 *     relaxed atomics, no lock on the hot path;
 *   - the scrape, which reads everything else when asked: one cache
 *     snapshot, the scheduler's batch histograms, the model table, the gRPC
 *     server's calls in flight.
 *
 * Requests that name no loaded model, and models beyond
 * MOED_METRICS_MAX_SERIES series, count under model="" (a client can pick
 * any model name: the label set stays bounded).
 *
 * Threads: moed_metrics_request may be called from any thread; create,
 * listen and free from the main thread only.
 */
#ifndef MOED_DAEMON_METRICS_H
#define MOED_DAEMON_METRICS_H

#include "common.h"

struct moed;
struct moed_metrics;

enum moed_transport {
    MOED_TRANSPORT_GRPC = 0,
    MOED_TRANSPORT_SHM,
    MOED_TRANSPORT_COUNT,
};

#define MOED_METRICS_MAX_SERIES 256 /* (model, transport) pairs, model="" included */

/*
 * Creates the request series of d (nothing listens yet).  d must outlive
 * it.  0 or -ENOMEM.  Free with moed_metrics_free.
 */
int moed_metrics_create(struct moed *d, struct moed_metrics **ret);

/*
 * Serves GET /metrics on addr, "HOST:PORT" ("[::1]:9100" for IPv6; port 0
 * picks one, see moed_metrics_port).  Call once d->rpc is set: the scrape
 * reads it.  0 or -errno with err (bad address, address in use).
 */
int moed_metrics_listen(struct moed_metrics *m, const char *addr, struct moe_error *err);

/* The port bound by moed_metrics_listen, 0 when not listening. */
int moed_metrics_port(const struct moed_metrics *m);

/*
 * Counts one answered request: model is the loaded model's name, or NULL
 * when the request named none; layer the one asked for (-1: not known);
 * code is its gRPC status (0: OK); tokens are counted for OK answers only;
 * duration_ns from receipt to answer.  At debug level it is also logged,
 * one line per request (logging.h).  m NULL counts nothing.
 */
void moed_metrics_request(struct moed_metrics *m, const char *model, int layer,
                          enum moed_transport t, int code, int tokens, uint64_t duration_ns);

/* Stops the endpoint, waiting for a scrape in progress: after it nothing
 * reads d.  Requests may still be counted.  NULL is a no-op. */
void moed_metrics_stop(struct moed_metrics *m);

/* Stops the endpoint if not done and frees.  No request may be counted any
 * more.  NULL is a no-op. */
void moed_metrics_free(struct moed_metrics *m);

#endif
