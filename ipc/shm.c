/*
 * The shared-memory protocol's layout and checks (shm.h): pure functions
 * over caller memory, shared by the daemon's server and libmoe-client, and
 * the descriptor check the fuzz target drives.
 */
#include "shm.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

_Static_assert(offsetof(struct moe_shm_welcome, status) == 12,
               "the welcome's first fields never move between versions");

static int fail(int rc, char *msg, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(int rc, char *msg, size_t len, const char *fmt, ...)
{
    va_list ap;

    if (msg && len) {
        va_start(ap, fmt);
        vsnprintf(msg, len, fmt, ap);
        va_end(ap);
    }
    return rc;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

static int pow2(uint32_t v)
{
    return v && !(v & (v - 1));
}

int moe_shm_layout(uint32_t sq_entries, uint32_t cq_entries, uint64_t arena_bytes,
                   uint64_t max_arena, struct moe_shm_layout *ret, char *msg, size_t len)
{
    struct moe_shm_layout l = {0};

    l.sq_entries = sq_entries ? sq_entries : MOE_SHM_DEFAULT_ENTRIES;
    if (!pow2(l.sq_entries) || l.sq_entries < MOE_SHM_MIN_ENTRIES ||
        l.sq_entries > MOE_SHM_MAX_ENTRIES)
        return fail(-EINVAL, msg, len,
                    "submission ring of %u entries: expected a power of two in [%u, %u]",
                    l.sq_entries, MOE_SHM_MIN_ENTRIES, MOE_SHM_MAX_ENTRIES);
    l.cq_entries = cq_entries ? cq_entries : 2 * l.sq_entries;
    if (!pow2(l.cq_entries) || l.cq_entries < l.sq_entries ||
        l.cq_entries > 2 * MOE_SHM_MAX_ENTRIES)
        return fail(-EINVAL, msg, len,
                    "completion ring of %u entries: expected a power of two in [%u, %u]",
                    l.cq_entries, l.sq_entries, 2 * MOE_SHM_MAX_ENTRIES);
    l.arena_bytes = arena_bytes ? arena_bytes : MOE_SHM_DEFAULT_ARENA;
    if (l.arena_bytes > max_arena)
        l.arena_bytes = max_arena;
    /* Above this the sizes below would overflow (a cap of 2^64 - 1). */
    if (l.arena_bytes > MOE_SHM_MAX_ARENA)
        return fail(-EINVAL, msg, len, "an arena of %llu bytes: at most %llu",
                    (unsigned long long)l.arena_bytes, (unsigned long long)MOE_SHM_MAX_ARENA);
    l.arena_bytes = align_up(l.arena_bytes, MOE_SHM_ALIGN);
    if (!l.arena_bytes)
        return fail(-EINVAL, msg, len, "an arena of 0 bytes");
    l.sq_offset = align_up(sizeof(struct moe_shm_header), MOE_SHM_ALIGN);
    l.cq_offset = l.sq_offset +
                  align_up(moe_ring_bytes(l.sq_entries, sizeof(struct moe_shm_sqe)), MOE_SHM_ALIGN);
    l.msg_offset = l.cq_offset + align_up(moe_ring_bytes(l.cq_entries, sizeof(struct moe_shm_cqe)),
                                          MOE_SHM_ALIGN);
    l.arena_offset = l.msg_offset + align_up((uint64_t)l.cq_entries * MOE_SHM_MSG, MOE_SHM_ALIGN);
    l.mapping_bytes = l.arena_offset + l.arena_bytes;
    *ret = l;
    return 0;
}

int moe_shm_hello_check(const void *buf, size_t n, uint64_t max_arena, struct moe_shm_hello *ret,
                        struct moe_shm_layout *ret_layout, char *msg, size_t len)
{
    struct moe_shm_hello h;

    memset(&h, 0, sizeof(h));
    memcpy(&h, buf, n < sizeof(h) ? n : sizeof(h));
    if (n < 16 || h.magic != MOE_SHM_MAGIC)
        return fail(-EPROTO, msg, len, "not a moed shared-memory hello (bad magic or size)");
    if (h.version != MOE_SHM_VERSION)
        return fail(-EPROTONOSUPPORT, msg, len,
                    "this moed speaks shared-memory protocol version %u; the client speaks "
                    "version %u: use a libmoe-client of the same version",
                    MOE_SHM_VERSION, h.version);
    if (n != sizeof(h) || h.op != MOE_SHM_OP_HELLO)
        return fail(-EPROTO, msg, len, "malformed hello");
    *ret = h;
    return moe_shm_layout(h.sq_entries, h.cq_entries, h.arena_bytes, max_arena, ret_layout, msg,
                          len);
}

int moe_shm_init(void *map, const struct moe_shm_layout *l, uint32_t session)
{
    struct moe_shm_header *h = map;
    struct moe_ring r;
    int rc;

    memset(h, 0, sizeof(*h));
    h->magic = MOE_SHM_MAGIC;
    h->version = MOE_SHM_VERSION;
    h->header_bytes = sizeof(*h);
    h->mapping_bytes = l->mapping_bytes;
    h->session = session;
    h->sq_entries = l->sq_entries;
    h->sq_entry_size = sizeof(struct moe_shm_sqe);
    h->cq_entries = l->cq_entries;
    h->cq_entry_size = sizeof(struct moe_shm_cqe);
    h->msg_size = MOE_SHM_MSG;
    h->msg_offset = l->msg_offset;
    h->sq_offset = l->sq_offset;
    h->cq_offset = l->cq_offset;
    h->arena_offset = l->arena_offset;
    h->arena_bytes = l->arena_bytes;
    atomic_store_explicit(&h->state, MOE_SHM_RUNNING, memory_order_relaxed);
    rc =
        moe_ring_init((uint8_t *)map + l->sq_offset, l->sq_entries, sizeof(struct moe_shm_sqe), &r);
    if (rc == 0)
        rc = moe_ring_init((uint8_t *)map + l->cq_offset, l->cq_entries, sizeof(struct moe_shm_cqe),
                           &r);
    return rc;
}

/* [off, off + bytes) inside [0, size)? */
static int inside(uint64_t off, uint64_t bytes, uint64_t size)
{
    return off <= size && bytes <= size - off;
}

int moe_shm_attach(void *map, uint64_t map_bytes, struct moe_ring *sq, struct moe_ring *cq,
                   struct moe_shm_header *ret, char *msg, size_t len)
{
    struct moe_shm_header h;
    uint64_t sqb, cqb, msgb;

    if (map_bytes < sizeof(h))
        return fail(-EPROTO, msg, len, "mapping of %llu bytes is smaller than the header",
                    (unsigned long long)map_bytes);
    memcpy(&h, map, sizeof(h));
    if (h.magic != MOE_SHM_MAGIC)
        return fail(-EPROTO, msg, len, "not a moed session (magic %#llx)",
                    (unsigned long long)h.magic);
    if (h.version != MOE_SHM_VERSION)
        return fail(-EPROTONOSUPPORT, msg, len,
                    "moed speaks shared-memory protocol version %u, this client version %u",
                    h.version, MOE_SHM_VERSION);
    if (h.header_bytes != sizeof(h) || h.mapping_bytes != map_bytes ||
        h.sq_entry_size != sizeof(struct moe_shm_sqe) ||
        h.cq_entry_size != sizeof(struct moe_shm_cqe) || h.msg_size != MOE_SHM_MSG ||
        !pow2(h.sq_entries) || !pow2(h.cq_entries) || h.sq_entries > MOE_SHM_MAX_ENTRIES ||
        h.cq_entries > 2 * MOE_SHM_MAX_ENTRIES)
        return fail(-EPROTO, msg, len, "session header has inconsistent sizes");
    sqb = moe_ring_bytes(h.sq_entries, h.sq_entry_size);
    cqb = moe_ring_bytes(h.cq_entries, h.cq_entry_size);
    msgb = (uint64_t)h.cq_entries * h.msg_size;
    if ((h.sq_offset | h.cq_offset | h.arena_offset) % MOE_RING_CACHELINE ||
        !inside(h.sq_offset, sqb, map_bytes) || !inside(h.cq_offset, cqb, map_bytes) ||
        !inside(h.msg_offset, msgb, map_bytes) ||
        !inside(h.arena_offset, h.arena_bytes, map_bytes) || h.sq_offset < sizeof(h))
        return fail(-EPROTO, msg, len, "session header places a part outside the mapping");
    if (moe_ring_attach((uint8_t *)map + h.sq_offset, h.sq_entries, h.sq_entry_size, sq) ||
        moe_ring_attach((uint8_t *)map + h.cq_offset, h.cq_entries, h.cq_entry_size, cq))
        return fail(-EPROTO, msg, len, "session rings do not match the header");
    if (ret)
        memcpy(ret, &h, sizeof(h));
    return 0;
}

uint64_t moe_shm_row_bytes(uint32_t dtype, uint32_t hidden)
{
    switch (dtype) {
    case MOE_SHM_DTYPE_F32:
        return 4ull * hidden;
    case MOE_SHM_DTYPE_F16:
    case MOE_SHM_DTYPE_BF16:
        return 2ull * hidden;
    default:
        return 0;
    }
}

static int overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

static int check_range(const char *what, uint64_t off, uint64_t bytes, uint64_t align,
                       uint64_t arena, char *msg, size_t len)
{
    if (!inside(off, bytes, arena))
        return fail(-ERANGE, msg, len, "%s [%llu, +%llu) lies outside the arena of %llu bytes",
                    what, (unsigned long long)off, (unsigned long long)bytes,
                    (unsigned long long)arena);
    if (off % align)
        return fail(-EINVAL, msg, len, "%s offset %llu is not a multiple of %llu", what,
                    (unsigned long long)off, (unsigned long long)align);
    return 0;
}

int moe_shm_check_sqe(const struct moe_shm_sqe *q, uint64_t arena_bytes,
                      const struct moe_shm_model_info *models, int n_models, int *model_ret,
                      char *msg, size_t len)
{
    const struct moe_shm_model_info *m = NULL;
    uint64_t row, io, rb = 0;
    int i, rc;

    if (q->opcode == MOE_SHM_NOP)
        return 0;
    if (q->opcode != MOE_SHM_FORWARD)
        return fail(-EINVAL, msg, len, "unknown opcode %u", (unsigned)q->opcode);
    if (q->flags & ~MOE_SHM_F_ROUTING)
        return fail(-EINVAL, msg, len, "unknown flags %#x",
                    (unsigned)(q->flags & ~MOE_SHM_F_ROUTING));
    for (i = 0; i < n_models; i++)
        if (models[i].id == q->model) {
            m = &models[i];
            break;
        }
    if (!m)
        return fail(-ENOENT, msg, len, "no model with id %u is loaded", q->model);
    if (q->layer < 0 || (uint32_t)q->layer >= m->n_layers)
        return fail(-ENOENT, msg, len, "model '%s' has no layer %d (it has %u)", m->name, q->layer,
                    m->n_layers);
    if (q->layer >= MOE_SHM_MAX_LAYERS)
        return fail(-ENOENT, msg, len,
                    "layer %d of '%s': the shared-memory protocol reaches layers 0 to %d only",
                    q->layer, m->name, MOE_SHM_MAX_LAYERS - 1);
    if (!(m->moe_layer[q->layer / 8] & (1u << (q->layer % 8))))
        return fail(-ENOENT, msg, len, "layer %d of '%s' is dense, not a MoE layer", q->layer,
                    m->name);
    if (m->hidden == 0)
        return fail(-EINVAL, msg, len, "model '%s' has hidden size 0", m->name);
    row = moe_shm_row_bytes(q->dtype, m->hidden);
    if (!row)
        return fail(-EINVAL, msg, len, "unknown activation dtype %u (f32 0, f16 1, bf16 2)",
                    q->dtype);
    if (q->n_tokens == 0 || q->n_tokens > MOE_SHM_MAX_TOKENS)
        return fail(-EINVAL, msg, len, "%u tokens: expected 1 to %u", q->n_tokens,
                    MOE_SHM_MAX_TOKENS);
    io = row * q->n_tokens; /* <= 2^20 * 2^32 * 4: no overflow */
    rc =
        check_range("input", q->in_off, io, row == 4ull * m->hidden ? 4 : 2, arena_bytes, msg, len);
    if (rc == 0)
        rc = check_range("output", q->out_off, io, row == 4ull * m->hidden ? 4 : 2, arena_bytes,
                         msg, len);
    if (rc < 0)
        return rc;
    if (overlap(q->in_off, io, q->out_off, io))
        return fail(-EINVAL, msg, len, "input [%llu, +%llu) and output [%llu, +%llu) overlap",
                    (unsigned long long)q->in_off, (unsigned long long)io,
                    (unsigned long long)q->out_off, (unsigned long long)io);
    if (q->flags & MOE_SHM_F_ROUTING) {
        if (m->top_k == 0 || m->top_k > MOE_SHM_MAX_TOP_K)
            return fail(-EINVAL, msg, len, "model '%s' takes no caller routing", m->name);
        rb = 4ull * m->top_k * q->n_tokens;
        rc = check_range("routing ids", q->ids_off, rb, 4, arena_bytes, msg, len);
        if (rc == 0)
            rc = check_range("routing weights", q->weights_off, rb, 4, arena_bytes, msg, len);
        if (rc < 0)
            return rc;
        if (overlap(q->ids_off, rb, q->out_off, io) || overlap(q->weights_off, rb, q->out_off, io))
            return fail(-EINVAL, msg, len, "routing overlaps the output");
    }
    if (model_ret)
        *model_ret = (int)(m - models);
    return 0;
}
