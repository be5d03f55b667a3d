/*
 * Single-producer single-consumer rings in shared memory, shared by moed and
 * libmoe-client (the submission and completion rings of a session's memfd).
 *
 * Layout (all in the shared mapping, so both processes see one ring):
 *   struct moe_ring_ctl   head and tail on their own cache lines, plus the
 *                         futex words each side sleeps on;
 *   entries               capacity entries of entry_size bytes, capacity a
 *                         power of two.
 * head is written by the consumer only, tail by the producer only, each
 * with a release store after the entry's bytes are written (producer) or
 * read (consumer), and read by the other side with an acquire load: the
 * io_uring SQ/CQ discipline.
 *
 * Waiting: a side that finds the ring empty (consumer) or full (producer)
 * spins briefly (MOE_RING_SPIN_NS), then announces itself in its
 * `sleeping` word and sleeps on a futex (FUTEX_WAIT on the shared word, not
 * FUTEX_PRIVATE) until the other side wakes it, so that an idle daemon and
 * an idle client burn no CPU.
 *
 * Trust: the daemon must never trust what a client wrote: moe_ring_pop
 * copies the entry out before the caller looks at it, and head/tail values
 * read from the other side are checked (tail - head must not exceed the
 * capacity; a ring that breaks this is reported as -EPROTO, never read out
 * of bounds).
 */
#ifndef MOED_IPC_RING_H
#define MOED_IPC_RING_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MOE_RING_CACHELINE 64
/* How long a waiter spins before it sleeps on the futex: longer than a
 * futex wake-up takes (10-20 us on the VMs we measured), so that two sides
 * that answer each other quickly never fall into sleeping on every round
 * trip; short enough that an idle side soon stops burning CPU. */
#define MOE_RING_SPIN_NS 50000

struct moe_ring_ctl {
    _Alignas(MOE_RING_CACHELINE) _Atomic uint32_t head; /* next entry to consume */
    _Atomic uint32_t consumer_sleeping;                 /* futex word: consumer waits */
    _Alignas(MOE_RING_CACHELINE) _Atomic uint32_t tail; /* next entry to produce */
    _Atomic uint32_t producer_sleeping;                 /* futex word: producer waits */
    _Alignas(MOE_RING_CACHELINE) uint32_t capacity;     /* power of two; set once */
    uint32_t entry_size;
};

/* A process's view of a ring: where it lives in its own mapping. */
struct moe_ring {
    struct moe_ring_ctl *ctl;
    uint8_t *entries;
    uint32_t capacity; /* copied at attach: never re-read from shared memory */
    uint32_t entry_size;
};

/* Bytes a ring of capacity entries of entry_size bytes needs (control block
 * and entries, cache-line aligned). */
size_t moe_ring_bytes(uint32_t capacity, uint32_t entry_size);

/* Lays out a new ring at mem (moe_ring_bytes of them, zeroed or not).
 * capacity must be a power of two.  0 or -EINVAL. */
int moe_ring_init(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *ret);

/* Attaches to a ring that another process laid out, checking its control
 * block against what the protocol header promised.  0 or -EPROTO. */
int moe_ring_attach(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *ret);

/*
 * Producer: copies entry in.  0; -EAGAIN when full and timeout_ms is 0;
 * -ETIMEDOUT after waiting timeout_ms (< 0: forever); -EPROTO when the
 * consumer's head is out of range.
 */
int moe_ring_push(struct moe_ring *r, const void *entry, int timeout_ms);
/* Consumer: copies the oldest entry out.  Same returns (-EAGAIN when empty). */
int moe_ring_pop(struct moe_ring *r, void *entry, int timeout_ms);

/* Entries waiting, as seen now (may be stale by the time it returns). */
uint32_t moe_ring_count(const struct moe_ring *r);

/* Wakes both sides' sleepers (e.g. at shutdown, so that they see a flag). */
void moe_ring_wake_all(struct moe_ring *r);

#endif
