/*
 * Fuzz target of the daemon's check of shared-memory submissions
 * (ipc/shm.c moe_shm_check_sqe) and of the client's check of a session
 * header (moe_shm_attach).  The input's first byte picks which:
 *   even: 8 bytes of arena size, then a submission (64 bytes, zero-padded),
 *         checked against two models; anything accepted must lie wholly in
 *         the arena, aligned, with input and routing apart from the output,
 *         on a MoE layer of a model that exists;
 *   odd:  a mapping whose first bytes are the input (the first byte, odd, is
 *         also the low byte of the magic); anything attached must place
 *         both rings, the message table and the arena inside the mapping.
 */
#include "shm.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void models(struct moe_shm_model_info *m)
{
    memset(m, 0, 2 * sizeof(*m));
    m[0] = (struct moe_shm_model_info){
        .id = 1, .n_layers = 4, .hidden = 64, .n_experts = 8, .top_k = 2, .name = "mix"};
    m[0].moe_layer[0] = 0x0f;
    m[1] = (struct moe_shm_model_info){
        .id = 7, .n_layers = 300, .hidden = 7168, .n_experts = 256, .top_k = 8, .name = "ds"};
    for (int l = 3; l < 256; l += 2)
        m[1].moe_layer[l / 8] |= (uint8_t)(1u << (l % 8));
}

static int apart(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a + alen <= b || b + blen <= a;
}

static void check_sqe(const uint8_t *data, size_t size)
{
    struct moe_shm_model_info m[2];
    struct moe_shm_sqe q;
    uint64_t arena = 0, row, io, rb;
    char msg[MOE_SHM_MSG];
    int idx = -1, rc;

    models(m);
    memset(&q, 0, sizeof(q));
    if (size >= 8) {
        memcpy(&arena, data, 8);
        data += 8;
        size -= 8;
    }
    memcpy(&q, data, size < sizeof(q) ? size : sizeof(q));
    msg[0] = 0;
    rc = moe_shm_check_sqe(&q, arena, m, 2, &idx, msg, sizeof(msg));
    if (rc < 0) {
        if (!msg[0] || !memchr(msg, 0, sizeof(msg)))
            abort(); /* a refusal says why */
        return;
    }
    if (rc != 0)
        abort();
    if (q.opcode == MOE_SHM_NOP)
        return;
    if (q.opcode != MOE_SHM_FORWARD || idx < 0 || idx > 1 || m[idx].id != q.model)
        abort();
    if (q.layer < 0 || (uint32_t)q.layer >= m[idx].n_layers ||
        !(m[idx].moe_layer[q.layer / 8] & (1u << (q.layer % 8))))
        abort();
    if (q.n_tokens < 1 || q.n_tokens > MOE_SHM_MAX_TOKENS)
        abort();
    row = q.dtype == MOE_SHM_DTYPE_F32 ? 4ull * m[idx].hidden : 2ull * m[idx].hidden;
    if (q.dtype > MOE_SHM_DTYPE_BF16)
        abort();
    io = row * q.n_tokens;
    if (q.in_off > arena || io > arena - q.in_off || q.out_off > arena || io > arena - q.out_off)
        abort();
    if (!apart(q.in_off, io, q.out_off, io) || q.in_off % 2 || q.out_off % 2)
        abort();
    if (q.flags & MOE_SHM_F_ROUTING) {
        rb = 4ull * m[idx].top_k * q.n_tokens;
        if (q.ids_off > arena || rb > arena - q.ids_off || q.weights_off > arena ||
            rb > arena - q.weights_off || q.ids_off % 4 || q.weights_off % 4)
            abort();
        if (!apart(q.ids_off, rb, q.out_off, io) || !apart(q.weights_off, rb, q.out_off, io))
            abort();
    }
}

static void check_attach(const uint8_t *data, size_t size)
{
    /* A mapping of a size the input picks, 64-byte aligned like a real one. */
    uint64_t bytes = 1u << 16;
    struct moe_ring sq, cq;
    struct moe_shm_header h;
    char msg[128];
    void *map;

    if (size >= 2)
        bytes = (uint64_t)4096 * (1 + (data[1] % 32));
    map = aligned_alloc(4096, bytes);
    if (!map)
        return;
    memset(map, 0, bytes);
    memcpy(map, data, size < bytes ? size : bytes);
    if (moe_shm_attach(map, bytes, &sq, &cq, &h, msg, sizeof(msg)) == 0) {
        uint8_t *lo = map, *hi = lo + bytes;

        if ((uint8_t *)sq.ctl < lo || sq.entries + (size_t)sq.capacity * sq.entry_size > hi ||
            (uint8_t *)cq.ctl < lo || cq.entries + (size_t)cq.capacity * cq.entry_size > hi ||
            h.arena_offset + h.arena_bytes > bytes || h.arena_offset > bytes ||
            h.msg_offset > bytes || (uint64_t)cq.capacity * MOE_SHM_MSG > bytes - h.msg_offset)
            abort();
        /* The rings work on what was attached (nothing out of bounds). */
        struct moe_shm_sqe q = {0};

        struct moe_shm_cqe c = {0};

        (void)moe_ring_pop(&sq, &q, 0);
        (void)moe_ring_push(&sq, &q, 0);
        (void)moe_ring_push(&cq, &c, 0);
        (void)moe_ring_pop(&cq, &c, 0);
    }
    free(map);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    if (data[0] & 1)
        check_attach(data, size);
    else
        check_sqe(data + 1, size - 1);
    return 0;
}
