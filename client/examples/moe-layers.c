/*
 * moe-layers: runs every MoE layer of a model served by moed for a stream of
 * tokens, the way an inference engine would, through libmoe-client.
 *
 * The tokens are split into micro-batches, each with its own residual
 * stream (f32, private) and two arena buffers (the layer's input and its
 * MoE output, in the activation dtype).  A micro-batch goes through the
 * MoE layers in order: its input is the RMS-normalised residual, and when
 * the layer's completion arrives the output is added to the residual and
 * the micro-batch moves on to the next MoE layer.  All micro-batches are in
 * flight at once (moe_submit / moe_wait), so moed can batch them together
 * and the client never idles while one of them is computed.  The attention
 * and dense layers an engine would run in between are not modelled.
 *
 *   moe-layers --socket /run/moed/shm.sock --model mixtral-tiny --tokens 256 --steps 8
 *
 * Prints, per step, tokens/s and the hit/miss counts moed reported (with
 * --verbose, those of every request).  Exits 1 on any error, saying which.
 */
#include <moe_client.h>

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct micro {
    uint32_t first, n; /* tokens [first, first + n) of the step */
    float *res;        /* the residual stream [n, hidden], private */
    void *in, *out;    /* [n, hidden] of dtype, in the arena */
    int next;          /* index into the MoE layer list */
};

static double now_s(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint16_t f32_to_bf16(float f)
{
    uint32_t u;

    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1);          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;

    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f32_to_f16(float f)
{
    uint32_t u, sign, mant;
    int exp;

    memcpy(&u, &f, 4);
    sign = (u >> 16) & 0x8000u;
    exp = (int)((u >> 23) & 0xff) - 127 + 15;
    mant = u & 0x7fffffu;
    if (((u >> 23) & 0xff) == 0xff)
        return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
    if (exp >= 31)
        return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10)
            return (uint16_t)sign;
        mant |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp), half = 1u << (shift - 1);
        uint32_t v = mant >> shift, rest = mant & ((1u << shift) - 1);
        if (rest > half || (rest == half && (v & 1)))
            v++;
        return (uint16_t)(sign | v);
    }
    uint32_t v = ((uint32_t)exp << 10) | (mant >> 13), rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (v & 1)))
        v++; /* may carry into the exponent: still correct, up to infinity */
    return (uint16_t)(sign | v);
}

static float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    float f;

    if (exp == 0)
        return (sign ? -1.0f : 1.0f) * ldexpf((float)mant, -24);
    uint32_t u =
        sign | (exp == 31 ? 0x7f800000u | (mant << 13) : ((exp - 15 + 127) << 23) | (mant << 13));
    memcpy(&f, &u, 4);
    return f;
}

static void store(enum moe_act_dtype dt, void *dst, size_t i, float v)
{
    if (dt == MOE_F32)
        ((float *)dst)[i] = v;
    else if (dt == MOE_BF16)
        ((uint16_t *)dst)[i] = f32_to_bf16(v);
    else
        ((uint16_t *)dst)[i] = f32_to_f16(v);
}

static float load(enum moe_act_dtype dt, const void *src, size_t i)
{
    if (dt == MOE_F32)
        return ((const float *)src)[i];
    if (dt == MOE_BF16)
        return bf16_to_f32(((const uint16_t *)src)[i]);
    return f16_to_f32(((const uint16_t *)src)[i]);
}

/* in = rmsnorm(res), row by row: what an engine feeds a MoE block. */
static void prepare_input(struct micro *mb, int hidden, enum moe_act_dtype dt)
{
    for (uint32_t t = 0; t < mb->n; t++) {
        const float *r = mb->res + (size_t)t * hidden;
        double ss = 0;

        for (int i = 0; i < hidden; i++)
            ss += (double)r[i] * r[i];
        float scale = (float)(1.0 / sqrt(ss / hidden + 1e-6));
        for (int i = 0; i < hidden; i++)
            store(dt, mb->in, (size_t)t * hidden + i, r[i] * scale);
    }
}

/* Queues micro-batch k (tag k) through MoE layer `layer`. */
static int submit_layer(struct moe_session *s, const struct moe_model_info *m,
                        enum moe_act_dtype dt, struct micro *mb, int layer, long k)
{
    struct moe_request r = {.op = MOE_OP_FORWARD,
                            .model = m->id,
                            .layer = layer,
                            .dtype = dt,
                            .n_tokens = mb->n,
                            .input = mb->in,
                            .output = mb->out,
                            .tag = (uint64_t)k};
    int rc;

    prepare_input(mb, m->hidden, dt);
    rc = moe_submit(s, &r);
    if (rc < 0)
        fprintf(stderr, "moe-layers: submitting layer %d: %s\n", layer, moe_last_error(s));
    return rc;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: moe-layers [--socket PATH] [--model NAME] [--tokens N] [--steps S]\n"
               "                  [--dtype bf16|f16|f32] [--micro-batches M] [--poll] [--verbose]\n"
               "\n"
               "  --socket PATH   moed's shared-memory socket, its shm_socket (default\n"
               "                  /run/moed/shm.sock; moed.sock is its gRPC socket)\n");
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"socket", required_argument, NULL, 's'}, {"model", required_argument, NULL, 'm'},
        {"tokens", required_argument, NULL, 't'}, {"steps", required_argument, NULL, 'n'},
        {"dtype", required_argument, NULL, 'd'},  {"micro-batches", required_argument, NULL, 'b'},
        {"poll", no_argument, NULL, 'p'},         {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0}};
    const char *path = "/run/moed/shm.sock", *model = NULL;
    struct moe_session_opts opts = {.name = "moe-layers"};
    enum moe_act_dtype dt = MOE_BF16;
    long tokens = 64, steps = 4, n_mb = 4;
    int verbose = 0, c, rc, layers[256], n_layers = 0;
    struct moe_model_info m;
    struct moe_session *s;
    struct micro *mbs;
    double t_all = 0;
    uint64_t all_hits = 0, all_misses = 0, all_req = 0, all_lat_ns = 0;

    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
            path = optarg;
            break;
        case 'm':
            model = optarg;
            break;
        case 't':
            tokens = strtol(optarg, NULL, 10);
            break;
        case 'n':
            steps = strtol(optarg, NULL, 10);
            break;
        case 'b':
            n_mb = strtol(optarg, NULL, 10);
            break;
        case 'd':
            if (!strcmp(optarg, "bf16"))
                dt = MOE_BF16;
            else if (!strcmp(optarg, "f16"))
                dt = MOE_F16;
            else if (!strcmp(optarg, "f32"))
                dt = MOE_F32;
            else {
                fprintf(stderr, "moe-layers: unknown dtype '%s' (bf16, f16, f32)\n", optarg);
                return 1;
            }
            break;
        case 'p':
            opts.flags |= MOE_SESSION_POLL;
            break;
        case 'v':
            verbose = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    if (tokens < 1 || tokens > (1 << 20) || steps < 1 || n_mb < 1 || n_mb > 256) {
        fprintf(stderr, "moe-layers: expected 1 <= tokens <= 2^20, steps >= 1, "
                        "1 <= micro-batches <= 256\n");
        return 1;
    }
    if (n_mb > tokens)
        n_mb = tokens;

    rc = moe_connect(path, &opts, &s);
    if (rc < 0) {
        fprintf(stderr, "moe-layers: %s\n", moe_connect_error());
        return 1;
    }
    rc = moe_model_find(s, model, &m);
    if (rc < 0) {
        fprintf(stderr, "moe-layers: %s\n", moe_last_error(s));
        moe_close(s);
        return 1;
    }
    for (int l = 0; l < m.n_layers && l < 256; l++)
        if (moe_model_is_moe_layer(&m, l))
            layers[n_layers++] = l;
    if (n_layers == 0 || m.hidden <= 0) {
        fprintf(stderr, "moe-layers: model '%s' has no MoE layer\n", m.name);
        moe_close(s);
        return 1;
    }
    printf("model %s (%s): %d layers, %d MoE, hidden %d, %d experts, top-%d; %ld tokens in %ld "
           "micro-batches, %s activations\n",
           m.name, m.arch, m.n_layers, n_layers, m.hidden, m.n_experts, m.top_k, tokens, n_mb,
           dt == MOE_F32   ? "f32"
           : dt == MOE_F16 ? "f16"
                           : "bf16");

    /* Buffers: per micro-batch, the residual privately and in/out in the arena. */
    size_t el = dt == MOE_F32 ? 4 : 2;
    uint64_t seed = 0x243f6a8885a308d3ull;
    mbs = calloc((size_t)n_mb, sizeof(*mbs));
    if (!mbs) {
        fprintf(stderr, "moe-layers: out of memory\n");
        return 1;
    }
    for (long i = 0; i < n_mb; i++) {
        struct micro *mb = &mbs[i];

        mb->first = (uint32_t)(tokens * i / n_mb);
        mb->n = (uint32_t)(tokens * (i + 1) / n_mb) - mb->first;
        size_t bytes = (size_t)mb->n * (size_t)m.hidden * el;
        mb->res = malloc((size_t)mb->n * (size_t)m.hidden * sizeof(float));
        mb->in = moe_alloc(s, bytes);
        mb->out = moe_alloc(s, bytes);
        if (!mb->res || !mb->in || !mb->out) {
            fprintf(stderr, "moe-layers: cannot allocate %zu bytes for micro-batch %ld: %s\n",
                    bytes, i, moe_last_error(s));
            return 1;
        }
    }

    for (long step = 0; step < steps; step++) {
        uint64_t hits = 0, misses = 0, reqs = 0;
        int running = 0;
        double t0 = now_s();

        /* New tokens: fresh embeddings for every micro-batch. */
        for (long i = 0; i < n_mb; i++) {
            struct micro *mb = &mbs[i];

            for (size_t j = 0; j < (size_t)mb->n * (size_t)m.hidden; j++) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                mb->res[j] = (float)((double)(seed >> 11) * 0x1p-53 - 0.5);
            }
            mb->next = 0;
        }
        /* Submit the first MoE layer of every micro-batch, then advance each
         * micro-batch as its completion comes. */
        for (long k = 0; k < n_mb; k++) {
            if (submit_layer(s, &m, dt, &mbs[k], layers[0], k) < 0)
                return 1;
            running++;
        }
        while (running > 0) {
            struct moe_completion cq;
            struct micro *mb;
            long k;

            rc = moe_wait(s, &cq, -1);
            if (rc < 0) {
                fprintf(stderr, "moe-layers: %s\n", moe_last_error(s));
                return 1;
            }
            running--;
            k = (long)cq.tag;
            if (cq.tag >= (uint64_t)n_mb) {
                fprintf(stderr, "moe-layers: completion with unknown tag %llu: %s\n",
                        (unsigned long long)cq.tag, cq.msg);
                return 1;
            }
            mb = &mbs[k];
            if (cq.status < 0) {
                fprintf(stderr, "moe-layers: layer %d, micro-batch %ld: %s (%s)\n",
                        layers[mb->next], k, cq.msg, moe_strerror(cq.status));
                return 1;
            }
            if (verbose)
                printf("  step %ld layer %3d mb %3ld: %u tokens, hits %u misses %u, batch "
                       "%u req/%u tok, queue %.1f us compute %.1f us total %.1f us\n",
                       step, layers[mb->next], k, mb->n, cq.hits, cq.misses, cq.batch_requests,
                       cq.batch_tokens, cq.queue_ns / 1e3, cq.compute_ns / 1e3, cq.total_ns / 1e3);
            hits += cq.hits;
            misses += cq.misses;
            reqs++;
            all_lat_ns += cq.total_ns;
            /* The residual connection: res += MoE(norm(res)). */
            for (size_t j = 0; j < (size_t)mb->n * (size_t)m.hidden; j++)
                mb->res[j] += load(dt, mb->out, j);
            if (++mb->next < n_layers) {
                if (submit_layer(s, &m, dt, mb, layers[mb->next], k) < 0)
                    return 1;
                running++;
            }
        }
        double dt_s = now_s() - t0;
        t_all += dt_s;
        all_hits += hits;
        all_misses += misses;
        all_req += reqs;
        printf("step %ld: %ld tokens through %d MoE layers in %.3f s: %.1f tokens/s, %llu "
               "requests, hits %llu misses %llu\n",
               step, tokens, n_layers, dt_s, tokens / dt_s, (unsigned long long)reqs,
               (unsigned long long)hits, (unsigned long long)misses);
    }
    double checksum = 0;
    for (long i = 0; i < n_mb; i++)
        for (size_t j = 0; j < (size_t)mbs[i].n * (size_t)m.hidden; j++)
            checksum += mbs[i].res[j];
    printf("total: %.1f tokens/s (all MoE layers), %llu requests, mean latency %.1f us, hits "
           "%llu misses %llu (hit rate %.1f%%), checksum %.6g\n",
           (double)tokens * steps / t_all, (unsigned long long)all_req,
           all_req ? all_lat_ns / 1e3 / all_req : 0.0, (unsigned long long)all_hits,
           (unsigned long long)all_misses,
           all_hits + all_misses ? 100.0 * all_hits / (all_hits + all_misses) : 0.0, checksum);
    for (long i = 0; i < n_mb; i++) {
        moe_free(s, mbs[i].in);
        moe_free(s, mbs[i].out);
        free(mbs[i].res);
    }
    free(mbs);
    moe_close(s);
    return 0;
}
