/*
 * Single-producer single-consumer rings in shared memory, shared by moed and
 * libmoe-client (the submission and completion rings of a session's memfd).
 *
 * Layout (all in the shared mapping, so both processes see one ring):
 *   struct moe_ring_ctl   head, tail and the two futex words, each on a
 *                         cache line of its own, then capacity and
 *                         entry_size;
 *   entries               capacity entries of entry_size bytes (a multiple
 *                         of 4), capacity a power of two, the first entry
 *                         cache-line aligned.
 *
 * Sequence words: the first 4 bytes of every entry belong to the ring.  The
 * producer fills position p (slot p & (capacity - 1)) by copying the rest of
 * the entry, then storing MOE_RING_SEQ(p) there with release; the consumer
 * waiting for position p polls that word with acquire until it reads
 * MOE_RING_SEQ(p).  So the consumer waits on the line the entry lives on, and
 * a round trip moves one cache line each way (an entry of 64 bytes, aligned,
 * is one line).  MOE_RING_SEQ(p) is odd: a slot never written (0) never
 * matches, and neither does the previous lap's value (capacity <= 2^24).
 *
 * head (consumer's progress) and tail (producer's) are still published, with
 * release, after each pop and push: the producer reads head only when the
 * last value it saw leaves no room (moe_ring_reserve), so that a ring that
 * does not fill up costs no reads of the other side's line; tail serves
 * moe_ring_count and the consumer's check before it sleeps.  Each side keeps
 * its own position in struct moe_ring and never re-reads it from shared
 * memory.
 *
 * Waiting: a side that finds the ring empty (consumer) or full (producer)
 * spins (MOE_RING_SPIN_NS by the clock), then announces itself in its
 * `sleeping` word and sleeps on a futex (FUTEX_WAIT on the shared word, not
 * FUTEX_PRIVATE) until the other side wakes it, so that an idle daemon and
 * an idle client burn no CPU.
 *
 * Trust: the daemon must never trust what a client wrote.  Entries are
 * copied out before the caller looks at them; a sequence word is only ever
 * compared, and one that is neither this lap's, the previous lap's nor 0
 * (never written) is -EPROTO; head read by the producer must leave the
 * ring holding at most capacity entries (else -EPROTO), and so must tail
 * when the consumer checks it before sleeping.  Every slot index is masked:
 * nothing the other side writes can make a side access outside the ring.
 */
#ifndef MOED_IPC_RING_H
#define MOED_IPC_RING_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define MOE_RING_CACHELINE 64
/* How long a waiter spins before it sleeps on the futex: longer than a
 * futex wake-up takes (10-20 us on the VMs we measured), so that two sides
 * that answer each other quickly never fall into sleeping on every round
 * trip; short enough that an idle side soon stops burning CPU. */
#define MOE_RING_SPIN_NS 50000
/* The sequence word of position p: odd, so never the 0 of a fresh slot. */
#define MOE_RING_SEQ(p) ((uint32_t)((uint32_t)(p) << 1 | 1u))

/* The two things every spinning side of the protocol needs (the rings, the
 * daemon's server, libmoe-client): a pause inside a spin loop, and the
 * monotonic clock in nanoseconds. */
static inline void moe_ring_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t moe_ring_now_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

struct moe_ring_ctl {
    _Alignas(MOE_RING_CACHELINE) _Atomic uint32_t head; /* next position to consume */
    _Alignas(MOE_RING_CACHELINE) _Atomic uint32_t tail; /* next position to produce */
    /* futex word: 1 while the consumer sleeps (or is about to) */
    _Alignas(MOE_RING_CACHELINE) _Atomic uint32_t consumer_sleeping;
    /* futex word: 1 while the producer sleeps (or is about to) */
    _Alignas(MOE_RING_CACHELINE) _Atomic uint32_t producer_sleeping;
    _Alignas(MOE_RING_CACHELINE) uint32_t capacity; /* power of two; set once */
    uint32_t entry_size;                            /* set once */
};

/* A process's view of a ring: where it lives in its own mapping, and this
 * side's own positions (a view is used by one thread at a time, or under
 * the caller's lock). */
struct moe_ring {
    struct moe_ring_ctl *ctl;
    uint8_t *entries;
    uint32_t capacity; /* copied at attach: never re-read from shared memory */
    uint32_t entry_size;
    uint32_t head;      /* consumer: next position to take */
    uint32_t tail;      /* producer: next position to fill */
    uint32_t head_seen; /* producer: the consumer's head as last read (checked) */
};

/* Bytes a ring of capacity entries of entry_size bytes needs (control block
 * and entries, cache-line aligned). */
size_t moe_ring_bytes(uint32_t capacity, uint32_t entry_size);

/* Lays out a new ring at mem (moe_ring_bytes of them, zeroed or not: the
 * control block and every sequence word are zeroed).  capacity must be a
 * power of two up to 2^24, entry_size a multiple of 4, at least 8.  0 or
 * -EINVAL. */
int moe_ring_init(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *ret);

/* Attaches to a ring that another process laid out, checking its control
 * block against what the protocol header promised; this side's positions
 * start at the published head and tail.  0 or -EPROTO. */
int moe_ring_attach(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *ret);

/*
 * Producer, in two steps, so that the caller can write data of its own
 * that belongs to the slot before the entry is published:
 * moe_ring_reserve waits for room and returns the index (0 .. capacity - 1)
 * of the slot the next moe_ring_commit fills; -EAGAIN when full and
 * timeout_ms is 0; -ETIMEDOUT after waiting timeout_ms (< 0: forever);
 * -EPROTO when the consumer's head is out of range.  Reserving again before
 * the commit returns the same slot.
 */
int moe_ring_reserve(struct moe_ring *r, int timeout_ms);
/* Copies entry (all but its first 4 bytes, the sequence word) into the
 * reserved slot and publishes it.  Only after a reserve that returned a
 * slot. */
void moe_ring_commit(struct moe_ring *r, const void *entry);
/* moe_ring_reserve, then moe_ring_commit: 0 or reserve's errors. */
int moe_ring_push(struct moe_ring *r, const void *entry, int timeout_ms);

/*
 * Consumer, in two steps, so that the caller can copy data of its own that
 * belongs to the slot before the producer may reuse it: moe_ring_peek
 * copies the oldest entry out (the sequence word included) and returns its
 * slot index, without releasing it; peeking again returns the same entry.
 * -EAGAIN when empty and timeout_ms is 0 (the producer's tail is not
 * looked at); -ETIMEDOUT after waiting timeout_ms (< 0: forever); -EPROTO
 * when the slot's sequence word is one no producer writes, or, before
 * sleeping, when tail is out of range.
 */
int moe_ring_peek(struct moe_ring *r, void *entry, int timeout_ms);
/* Releases the slot of the entry peeked: the producer may reuse it.  Only
 * after a peek that returned a slot. */
void moe_ring_release(struct moe_ring *r);
/* moe_ring_peek, then moe_ring_release: 0 or peek's errors. */
int moe_ring_pop(struct moe_ring *r, void *entry, int timeout_ms);

/* Entries waiting, from the published head and tail as seen now (may be
 * stale by the time it returns; a hostile side may make it anything). */
uint32_t moe_ring_count(const struct moe_ring *r);

/* Wakes both sides' sleepers.  A waiter woken with nothing to take sleeps
 * again until its timeout: callers that must notice a flag (a session
 * closing) wait with a timeout and check it between waits. */
void moe_ring_wake_all(struct moe_ring *r);

#endif
