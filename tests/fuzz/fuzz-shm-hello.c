/*
 * Fuzz target of the daemon's check of a shared-memory hello
 * (ipc/shm.c moe_shm_hello_check): the first message on moed's shm socket,
 * from any local process.  The input's first 8 bytes are the daemon's
 * arena cap (shm_max_arena_bytes), the rest the message as received, of
 * any length.  Anything accepted must be a hello of this version whose
 * layout fits: rings of powers of two in range, every part in order inside
 * the mapping, the arena no larger than the cap (rounded to the alignment)
 * and the mapping's size without overflow.  A refusal says why.
 */
#include "shm.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_shm_hello h;
    struct moe_shm_layout l;
    uint64_t cap = 1ull << 30;
    char msg[200];
    int rc;

    if (size >= 8) {
        memcpy(&cap, data, 8);
        data += 8;
        size -= 8;
    }
    msg[0] = 0;
    rc = moe_shm_hello_check(data, size, cap, &h, &l, msg, sizeof(msg));
    if (rc < 0) {
        if (rc != -EPROTO && rc != -EPROTONOSUPPORT && rc != -EINVAL)
            abort();
        if (!msg[0] || !memchr(msg, 0, sizeof(msg)))
            abort(); /* a refusal says why */
        return 0;
    }
    if (rc != 0 || size != sizeof(h) || h.magic != MOE_SHM_MAGIC ||
        h.version != MOE_SHM_VERSION || h.op != MOE_SHM_OP_HELLO)
        abort();
    if (!l.sq_entries || (l.sq_entries & (l.sq_entries - 1)) ||
        l.sq_entries < MOE_SHM_MIN_ENTRIES || l.sq_entries > MOE_SHM_MAX_ENTRIES)
        abort();
    if (!l.cq_entries || (l.cq_entries & (l.cq_entries - 1)) || l.cq_entries < l.sq_entries)
        abort();
    if (!l.arena_bytes || l.arena_bytes % MOE_SHM_ALIGN)
        abort();
    if (cap < UINT64_MAX - MOE_SHM_ALIGN && l.arena_bytes > cap + MOE_SHM_ALIGN)
        abort();
    if (!(l.sq_offset < l.cq_offset && l.cq_offset < l.msg_offset &&
          l.msg_offset < l.arena_offset && l.arena_offset < l.mapping_bytes &&
          l.mapping_bytes - l.arena_offset == l.arena_bytes))
        abort();
    return 0;
}
