/*
 * moectl's use of libmoe-client: forward through moed's shared-memory socket
 * (moectl forward --socket SHM_SOCKET), and telling that socket from moed's
 * gRPC one.  bench's shared-memory callers are in moectl_bench.c.
 */
#include "moectl.h"

#include "dtype.h"
#include "moe_client.h"
#include "npy.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

bool moectl_socket_is_shm(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    int fd, rc;

    if (strlen(path) >= sizeof(a.sun_path))
        return false;
    memcpy(a.sun_path, path, strlen(path));
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    /* A stream socket (gRPC) refuses a seqpacket connection (EPROTOTYPE). */
    rc = connect(fd, (struct sockaddr *)&a, sizeof(a));
    close(fd);
    return rc == 0;
}

static enum moe_act_dtype act_dtype(enum moe_dtype t)
{
    return t == MOE_DTYPE_BF16 ? MOE_BF16 : t == MOE_DTYPE_F16 ? MOE_F16 : MOE_F32;
}

int moectl_forward_shm(struct moectl_remote *r, const char *model, int layer,
                       const struct moe_npy *x, enum moe_dtype dt, const char *outp, bool quiet)
{
    struct moe_session_opts o = {.name = "moectl"};
    struct moe_session *s = NULL;
    struct moe_model_info mi;
    struct moe_completion c = {0};
    struct moe_error err = {0};
    int64_t T = x->shape[0], H = x->shape[1];
    size_t n = (size_t)T * (size_t)H, esz = dt == MOE_DTYPE_F32 ? 4 : 2;
    const float *xf = x->data;
    uint8_t *in = NULL, *out = NULL;
    float *y = NULL;
    uint64_t t0, rtt;
    int rc, ret = 1;

    /* The arena holds the input and the output, with room to spare. */
    o.arena_bytes = ((2 * n * esz + (1u << 20)) + 4095) & ~(uint64_t)4095;
    rc = moe_connect(r->socket, &o, &s);
    if (rc < 0) {
        errorf("forward: cannot reach moed at %s: %s", r->socket, moe_connect_error());
        return 1;
    }
    rc = moe_model_find(s, model, &mi);
    if (rc < 0) {
        errorf("forward: %s: %s", model, moe_last_error(s));
        goto out;
    }
    if (H != mi.hidden) {
        errorf("forward: the input has %lld columns; model '%s' has hidden size %d", (long long)H,
               model, mi.hidden);
        goto out;
    }
    in = moe_alloc(s, n * esz);
    out = moe_alloc(s, n * esz);
    y = malloc(n * sizeof(*y));
    if (!in || !out || !y) {
        errorf("forward: %s", in && out ? "out of memory" : moe_last_error(s));
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t h;

        if (esz == 4) {
            memcpy(in + 4 * i, &xf[i], 4);
        } else {
            h = dt == MOE_DTYPE_BF16 ? moe_f32_to_bf16(xf[i]) : moe_f32_to_f16(xf[i]);
            memcpy(in + 2 * i, &h, 2);
        }
    }
    t0 = moe_now_ns();
    rc = moe_forward(s,
                     &(struct moe_request){.op = MOE_OP_FORWARD,
                                           .model = mi.id,
                                           .layer = layer,
                                           .dtype = act_dtype(dt),
                                           .n_tokens = (uint32_t)T,
                                           .input = in,
                                           .output = out},
                     &c);
    rtt = moe_now_ns() - t0;
    if (rc < 0) {
        errorf("forward: layer %d of %s: %s", layer, model,
               c.status < 0 && c.msg[0] ? c.msg : moe_last_error(s));
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t h;

        if (esz == 4) {
            memcpy(&y[i], out + 4 * i, 4);
        } else {
            memcpy(&h, out + 2 * i, 2);
            y[i] = dt == MOE_DTYPE_BF16 ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);
        }
    }
    if (moe_npy_write(outp, MOE_NPY_F32, 2, x->shape, y, &err) < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    ret = 0;
    if (r->json) {
        json_t *j = json_pack("{ss si sI sI ss ss sI s{sI sI sI si si} sI sI ss}", "model", model,
                              "layer", layer, "tokens", (json_int_t)T, "hidden", (json_int_t)H,
                              "dtype", moe_dtype_user_name(dt), "transport", "shm", "round_trip_ns",
                              (json_int_t)rtt, "timing", "queue_ns", (json_int_t)c.queue_ns,
                              "compute_ns", (json_int_t)c.compute_ns, "total_ns",
                              (json_int_t)c.total_ns, "batch_requests", (int)c.batch_requests,
                              "batch_tokens", (int)c.batch_tokens, "cache_hits", (json_int_t)c.hits,
                              "cache_misses", (json_int_t)c.misses, "out", outp);

        ret = moectl_print_json(r, j);
    } else if (!quiet) {
        printf("layer %d of %s: %lld tokens, %.3f ms round trip through shared memory; in moed "
               "%.3f ms: queue %.3f ms, compute %.3f ms (batch of %u requests, %u tokens)\n",
               layer, model, (long long)T, (double)rtt / 1e6, (double)c.total_ns / 1e6,
               (double)c.queue_ns / 1e6, (double)c.compute_ns / 1e6, c.batch_requests,
               c.batch_tokens);
        printf("cache: %u hits, %u misses of this call's experts\n", c.hits, c.misses);
    }
out:
    free(y);
    moe_close(s); /* frees the arena's buffers with it */
    return ret;
}
