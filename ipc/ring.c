/*
 * SPSC rings in shared memory (ring.h).
 *
 * Memory order, at each use:
 *   producer: reads head only when the last head it saw leaves no room
 *             (acquire: the consumer's copy out of those slots happens-before
 *             we overwrite them), writes the entry, stores the slot's
 *             sequence word (release: the entry's bytes happen-before the
 *             consumer's acquire of that word), then publishes tail
 *             (release; read by moe_ring_count and the consumer's check
 *             before it sleeps);
 *   consumer: reads the slot's sequence word (acquire, pairs with the
 *             producer's release), copies the entry out, publishes head
 *             (release: the copy happens-before the producer reusing the
 *             slot).
 * Sleeping: a waiter sets its sleeping word, issues a seq_cst fence,
 * re-checks the ring, then FUTEX_WAITs on the word while it is 1; the other
 * side, after publishing, issues a seq_cst fence and swaps the word to 0,
 * and wakes when it was 1.  The two fences forbid the lost-wakeup
 * interleaving (the waiter misses the publish and the publisher misses the
 * sleeper: a store followed by a load may otherwise be reordered, even on
 * x86).  The swap to 0 closes the other one: a wake that comes after the
 * waiter's re-check but before its FUTEX_WAIT wakes nobody, so it must
 * change the word, for the FUTEX_WAIT to find it no longer 1 and return
 * at once (a wake that only read the word left the waiter asleep until its
 * timeout: both sides of test-ring's two processes once waited 30 s).
 */
#include "ring.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static size_t align_up(size_t v, size_t a)
{
    return (v + a - 1) / a * a;
}

size_t moe_ring_bytes(uint32_t capacity, uint32_t entry_size)
{
    return align_up(sizeof(struct moe_ring_ctl), MOE_RING_CACHELINE) +
           align_up((size_t)capacity * entry_size, MOE_RING_CACHELINE);
}

static bool pow2(uint32_t v)
{
    return v && !(v & (v - 1));
}

static bool good_shape(uint32_t capacity, uint32_t entry_size)
{
    return pow2(capacity) && capacity <= (1u << 24) && entry_size >= 8 && entry_size % 4 == 0;
}

static void view(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *r)
{
    struct moe_ring_ctl *c = mem;

    r->ctl = c;
    r->entries = (uint8_t *)mem + align_up(sizeof(struct moe_ring_ctl), MOE_RING_CACHELINE);
    r->capacity = capacity;
    r->entry_size = entry_size;
    /* Relaxed: read once at set-up, before either side runs the ring (the
     * mapping came to us over a socket, after the daemon wrote it). */
    r->head = atomic_load_explicit(&c->head, memory_order_relaxed);
    r->tail = atomic_load_explicit(&c->tail, memory_order_relaxed);
    r->head_seen = r->head;
}

int moe_ring_init(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *ret)
{
    struct moe_ring_ctl *c = mem;

    if (!mem || !good_shape(capacity, entry_size) || ((uintptr_t)mem % MOE_RING_CACHELINE))
        return -EINVAL;
    memset(mem, 0, moe_ring_bytes(capacity, entry_size)); /* every sequence word 0 */
    c->capacity = capacity;
    c->entry_size = entry_size;
    view(mem, capacity, entry_size, ret);
    return 0;
}

int moe_ring_attach(void *mem, uint32_t capacity, uint32_t entry_size, struct moe_ring *ret)
{
    const struct moe_ring_ctl *c = mem;

    if (!mem || ((uintptr_t)mem % MOE_RING_CACHELINE) || !good_shape(capacity, entry_size) ||
        c->capacity != capacity || c->entry_size != entry_size)
        return -EPROTO;
    view(mem, capacity, entry_size, ret);
    return 0;
}

static long futex(_Atomic uint32_t *word, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, (uint32_t *)word, op, val, ts, NULL, 0);
}

/* The sequence word of the slot of position p. */
static _Atomic uint32_t *seq_word(const struct moe_ring *r, uint32_t p)
{
    return (_Atomic uint32_t *)(r->entries + (size_t)(p & (r->capacity - 1)) * r->entry_size);
}

/* Consumer: 1 when position head has been published, 0 when not yet,
 * -EPROTO when its sequence word is one no producer writes. */
static int entry_ready(struct moe_ring *r)
{
    /* Acquire: pairs with the release store in moe_ring_commit, so the
     * entry's bytes are visible once the word matches. */
    uint32_t s = atomic_load_explicit(seq_word(r, r->head), memory_order_acquire);

    if (s == MOE_RING_SEQ(r->head))
        return 1;
    if (s == 0 || s == MOE_RING_SEQ(r->head - r->capacity))
        return 0;
    return -EPROTO;
}

/* Consumer, before it sleeps: tail within capacity of head.  tail is
 * published after the sequence word, so it may trail our head by one. */
static int tail_sane(struct moe_ring *r)
{
    /* Acquire: pairs with the release store of tail in moe_ring_commit. */
    uint32_t ahead = atomic_load_explicit(&r->ctl->tail, memory_order_acquire) - r->head;

    return ahead <= r->capacity || ahead == UINT32_MAX ? 0 : -EPROTO;
}

/* Producer: 1 when the slot of position tail is free, 0 when the ring is
 * full, -EPROTO when the consumer's head is out of range. */
static int room(struct moe_ring *r)
{
    uint32_t head;

    if (r->tail - r->head_seen < r->capacity)
        return 1;
    /* Acquire: pairs with the release store of head in moe_ring_release
     * (the consumer's copy out of the slot happens-before we overwrite it). */
    head = atomic_load_explicit(&r->ctl->head, memory_order_acquire);
    if (r->tail - head > r->capacity)
        return -EPROTO;
    r->head_seen = head;
    return r->tail - head < r->capacity;
}

/* Waits until ready() (1), an error from ready() or check() (run before each
 * sleep), or the timeout (< 0: none).  0 or -errno. */
static int wait_for(struct moe_ring *r, _Atomic uint32_t *sleeping, int (*ready)(struct moe_ring *),
                    int (*check)(struct moe_ring *), int timeout_ms)
{
    int64_t start = 0, end, left;
    struct timespec ts;
    int rc;

    for (unsigned i = 1;; i++) {
        rc = ready(r);
        if (rc)
            return rc < 0 ? rc : 0;
        moe_ring_relax();
        if (i % 64 == 0) { /* the clock is read every 64 polls, from the 64th */
            int64_t now = (int64_t)moe_ring_now_ns();

            if (!start)
                start = now;
            else if (now - start >= MOE_RING_SPIN_NS)
                break;
        }
    }
    end = timeout_ms >= 0 ? start + (int64_t)timeout_ms * 1000000 : INT64_MAX;
    for (;;) {
        atomic_store_explicit(sleeping, 1, memory_order_relaxed);
        /* seq_cst: orders the store above before the re-check below; pairs
         * with the fence in wake(). */
        atomic_thread_fence(memory_order_seq_cst);
        rc = ready(r);
        if (rc == 0 && check)
            rc = check(r);
        if (rc) {
            atomic_store_explicit(sleeping, 0, memory_order_relaxed);
            return rc < 0 ? rc : 0;
        }
        if (timeout_ms >= 0) {
            left = end - (int64_t)moe_ring_now_ns();
            if (left <= 0) {
                atomic_store_explicit(sleeping, 0, memory_order_relaxed);
                rc = ready(r);
                return rc > 0 ? 0 : rc < 0 ? rc : -ETIMEDOUT;
            }
            ts.tv_sec = left / 1000000000;
            ts.tv_nsec = left % 1000000000;
        }
        /* Shared (not FUTEX_PRIVATE): the other side is another process. */
        futex(sleeping, FUTEX_WAIT, 1, timeout_ms >= 0 ? &ts : NULL);
        atomic_store_explicit(sleeping, 0, memory_order_relaxed);
        rc = ready(r);
        if (rc)
            return rc < 0 ? rc : 0;
    }
}

static void wake(_Atomic uint32_t *sleeping)
{
    /* seq_cst: orders our publish (above, in the caller) before the load of
     * the sleeping word; pairs with the fence in wait_for(). */
    atomic_thread_fence(memory_order_seq_cst);
    /* Relaxed: ordered by the fence; the waiter rechecks the ring anyway.
     * A plain load first: the swap (a write to the waiter's line) only when
     * someone announced a sleep. */
    if (atomic_load_explicit(sleeping, memory_order_relaxed) &&
        atomic_exchange_explicit(sleeping, 0, memory_order_relaxed))
        futex(sleeping, FUTEX_WAKE, INT_MAX, NULL);
}

uint32_t moe_ring_count(const struct moe_ring *r)
{
    /* Acquire: pairs with the release stores of tail and head. */
    uint32_t tail = atomic_load_explicit(&r->ctl->tail, memory_order_acquire);
    uint32_t head = atomic_load_explicit(&r->ctl->head, memory_order_acquire);

    return tail - head;
}

int moe_ring_reserve(struct moe_ring *r, int timeout_ms)
{
    int rc = room(r);

    if (rc == 0) {
        if (timeout_ms == 0)
            return -EAGAIN;
        rc = wait_for(r, &r->ctl->producer_sleeping, room, NULL, timeout_ms);
    }
    if (rc < 0)
        return rc;
    return (int)(r->tail & (r->capacity - 1));
}

void moe_ring_commit(struct moe_ring *r, const void *entry)
{
    _Atomic uint32_t *seq = seq_word(r, r->tail);

    memcpy((uint8_t *)seq + 4, (const uint8_t *)entry + 4, r->entry_size - 4);
    /* Release: the entry's bytes (and whatever the caller wrote for the
     * slot after reserving it) happen-before the consumer's acquire of the
     * sequence word in entry_ready(). */
    atomic_store_explicit(seq, MOE_RING_SEQ(r->tail), memory_order_release);
    r->tail++;
    /* Release: pairs with the acquire loads in moe_ring_count and
     * tail_sane(); nobody waits on it. */
    atomic_store_explicit(&r->ctl->tail, r->tail, memory_order_release);
    wake(&r->ctl->consumer_sleeping);
}

int moe_ring_push(struct moe_ring *r, const void *entry, int timeout_ms)
{
    int rc = moe_ring_reserve(r, timeout_ms);

    if (rc < 0)
        return rc;
    moe_ring_commit(r, entry);
    return 0;
}

int moe_ring_peek(struct moe_ring *r, void *entry, int timeout_ms)
{
    uint32_t seq = MOE_RING_SEQ(r->head);
    int rc = entry_ready(r);

    if (rc == 0) {
        if (timeout_ms == 0)
            return -EAGAIN;
        rc = wait_for(r, &r->ctl->consumer_sleeping, entry_ready, tail_sane, timeout_ms);
    }
    if (rc < 0)
        return rc;
    /* Copied out before anyone looks at it: the producer may be hostile.
     * The sequence word is not re-read: we know what it holds. */
    memcpy(entry, &seq, 4);
    memcpy((uint8_t *)entry + 4, (const uint8_t *)seq_word(r, r->head) + 4, r->entry_size - 4);
    return (int)(r->head & (r->capacity - 1));
}

void moe_ring_release(struct moe_ring *r)
{
    r->head++;
    /* Release: our copy out of the slot happens-before the producer's
     * acquire of head in room(), and so before it reuses the slot. */
    atomic_store_explicit(&r->ctl->head, r->head, memory_order_release);
    wake(&r->ctl->producer_sleeping);
}

int moe_ring_pop(struct moe_ring *r, void *entry, int timeout_ms)
{
    int rc = moe_ring_peek(r, entry, timeout_ms);

    if (rc < 0)
        return rc;
    moe_ring_release(r);
    return 0;
}

void moe_ring_wake_all(struct moe_ring *r)
{
    /* Relaxed: the words only need to change (see wake()). */
    atomic_store_explicit(&r->ctl->consumer_sleeping, 0, memory_order_relaxed);
    atomic_store_explicit(&r->ctl->producer_sleeping, 0, memory_order_relaxed);
    futex(&r->ctl->consumer_sleeping, FUTEX_WAKE, INT_MAX, NULL);
    futex(&r->ctl->producer_sleeping, FUTEX_WAKE, INT_MAX, NULL);
}
