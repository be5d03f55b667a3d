/*
 * Several moed nodes as one expert pool (cluster.c).
 *
 * Membership: this node plus the peers of its configuration ([cluster] peer
 * = NAME HOST:PORT) and of AddPeer/RemovePeer calls.  A health thread pings
 * every peer (moe.v1.Peer/Ping) and marks it up, down or refused (token or
 * TLS); a peer that answers again is up again, nothing else to do.
 *
 * Placement: every node computes the same map from the sorted member names
 * and the model's shape, so that no agreement protocol is needed: the
 * experts of each layer go round-robin over the members, offset by the
 * layer, which balances expert bytes within one expert per layer.  Hot
 * experts (at most the hot_fraction with the most token rows routed through
 * a node, and only those above twice the mean load, measured and decayed
 * every rebalance_interval_ms) get `replicas` extra holders, the next
 * members in order; each node tells its peers its hot set in its answers to
 * their pings, and every node replicates the union of the hot sets of the
 * nodes that are up, so that they agree.  Requests spread over the holders
 * that are up.  Correctness never depends on two nodes agreeing:
 * ForwardExperts computes whatever it is sent, paging experts in as needed.
 *
 * When the map changes (a peer added or removed, new replicas), a node pages
 * in the experts it newly holds at once and evicts the ones it no longer
 * holds one interval later, so that the new holder is warm before the old
 * one lets go; no request fails meanwhile (a holder without the expert
 * pages it in).
 *
 * A forward at any node: route (or take the caller's routing), split the
 * (token, slot) pairs by holder, send each remote holder one ForwardExperts
 * with the rows it needs (slots of other holders set to -1), compute the
 * local share and the shared experts here through the scheduler (so they
 * batch with other callers), and sum the partial outputs in the caller's
 * row order.  A holder that fails or misses peer_timeout_ms is failed over:
 * to another holder that is up, else computed here (paged in locally); the
 * request succeeds and the statistics count it.
 *
 * NCCL: where moed is built with NCCL, nccl is on and a CUDA device is
 * there, a node says so in its ping answers; for each peer that says so
 * too, it makes a two-rank communicator for the forwards it sends there
 * (the unique id travels in Peer/NcclConnect), and from then on the token
 * rows and the partial outputs of those forwards go over NCCL; the
 * ForwardExperts call only carries the routing.  gRPC stays the fallback:
 * no communicator yet, or any failure on it (then aborted, made again
 * after a pause).  struct nccl_link in cluster.c has the protocol.
 */
#ifndef MOED_DAEMON_CLUSTER_H
#define MOED_DAEMON_CLUSTER_H

#include "common.h"
#include "rpc.h"
#include "scheduler.h"

struct moed;
struct moed_model;
struct moed_cluster;
struct Moe__V1__PeerInfo;
struct Moe__V1__ClusterCounters;

/* Starts the health thread and the peers of the configuration.  0 or -errno. */
int moed_cluster_start(struct moed *d, struct moe_error *err);
/*
 * Stops the health thread; requests in flight finish first, and NCCL joins
 * and closes (on threads of their own) are waited for, each for at most
 * MOED_NCCL_STOP_WAIT_MS: a join gives up after its own timeout, but an
 * NCCL abort or a CUDA free may wait for every kernel on the device, one
 * spinning on a peer that is gone among them.  0 when everything stopped;
 * -ETIMEDOUT when NCCL work was left running (logged): the cluster and its
 * peers are then left allocated for those threads, and the caller should
 * exit without freeing GPU memory (a free would wait for that kernel too).
 */
int moed_cluster_stop(struct moed *d);

/*
 * Submits a forward of model mm: through the cluster when it has peers (then
 * r->done is called later from a cluster thread, with r->st and the batch
 * fields filled from the local share), else straight to the scheduler.
 * 0, or -errno with err (r->done is then not called).
 */
int moed_submit(struct moed *d, struct moed_model *mm, struct moe_sched_req *r,
                struct moe_error *err);

/* Waits until no split forward is running (they still submit their local
 * share to the scheduler): 0, or -ETIMEDOUT after timeout_ms. */
int moed_cluster_drain(struct moed *d, uint64_t timeout_ms);

/* This node's name. */
const char *moed_cluster_node(struct moed *d);

/* Peers as PeerInfo messages (malloc'd, free with moed_cluster_free_peers). */
int moed_cluster_peers(struct moed *d, struct Moe__V1__PeerInfo ***ret, size_t *n);
void moed_cluster_free_peers(struct Moe__V1__PeerInfo **p, size_t n);
void moed_cluster_counters(struct moed *d, struct Moe__V1__ClusterCounters *c);

/* The gRPC handlers of moe.v1.Peer and of the cluster's Control calls. */
void moed_on_forward_experts(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg);
void moed_on_ping(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg);
void moed_on_placement(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg);
void moed_on_add_peer(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg);
void moed_on_remove_peer(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg);
void moed_on_nccl_connect(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg);

#endif
