/*
 * Tests of the fault-injecting backend (engine/backend_fault.c,
 * moe_backend_faults_wrap): before its fault it computes bit for bit what
 * the backend it wraps computes; the Nth call of the kind named (and only
 * that kind counts) returns -ENOTRECOVERABLE, and from then on every copy
 * and compute call does and alloc returns NULL, as after a sticky CUDA
 * error; lost says which call lost the device.  Through the engine: a
 * layer forward that meets the fault fails with -ENOTRECOVERABLE and a
 * message naming the layer, and so does every later one.
 */
#include "backend.h"
#include "genmodel.h"
#include "layer.h"
#include "model.h"
#include "tests.h"

#include <errno.h>
#include <string.h>

enum { T = 3, H = 32, F = 64 };

struct ffn_case {
    float gate[F * H], up[F * H], down[H * F];
    float x[T * H];
    int32_t tokens[T];
    float scales[T];
    struct moe_expert_weights w;
    struct moe_ffn_work work;
};

static void ffn_case_init(struct ffn_case *c)
{
    uint64_t seed = 5;

    for (int i = 0; i < F * H; i++) {
        c->gate[i] = test_rand_f32(&seed) * 0.2f;
        c->up[i] = test_rand_f32(&seed) * 0.2f;
        c->down[i] = test_rand_f32(&seed) * 0.2f;
    }
    for (int i = 0; i < T * H; i++)
        c->x[i] = test_rand_f32(&seed);
    for (int t = 0; t < T; t++) {
        c->tokens[t] = t;
        c->scales[t] = 0.25f * (float)(t + 1);
    }
    c->w = (struct moe_expert_weights){.dtype = MOE_DTYPE_F32,
                                       .hidden = H,
                                       .ffn = F,
                                       .gate = c->gate,
                                       .up = c->up,
                                       .down = c->down};
    c->work =
        (struct moe_ffn_work){.w = &c->w, .n_tokens = T, .tokens = c->tokens, .scales = c->scales};
}

static int ffn(struct moe_backend *b, struct ffn_case *c, float *out)
{
    memset(out, 0, sizeof(float) * T * H);
    return b->ops->grouped_ffn(b, c->x, H, T, &c->work, 1, out);
}

static int mm(struct moe_backend *b, struct ffn_case *c, float *y)
{
    return b->ops->matmul(b, c->gate, MOE_DTYPE_F32, F, H, c->x, T, y);
}

static int copy(struct moe_backend *b, struct ffn_case *c, float *dst)
{
    return b->ops->copy_in(b, dst, c->x, sizeof(c->x));
}

/* Every kind of call, for each fault kind and N: calls before the Nth of
 * the faulty kind succeed (other kinds interleaved, not counted), the Nth
 * and everything after fail. */
static void test_kinds(struct ffn_case *c)
{
    static const char *const names[] = {"grouped_ffn", "matmul", "copy"};
    float out[T * H], y[T * F], dst[T * H];

    for (int kind = 0; kind < 3; kind++) {
        for (uint64_t n = 1; n <= 3; n++) {
            struct moe_backend_faults f = {0};
            struct moe_cpu_config cfg = {.n_threads = 1};
            struct moe_backend *cpu, *b;
            struct moe_error err = {0};
            char want[64];

            if (kind == 0)
                f.ffn_nth = n;
            else if (kind == 1)
                f.matmul_nth = n;
            else
                f.copy_nth = n;
            ASSERT_EQ(moe_backend_cpu_init(&cfg, &cpu, NULL), 0);
            ASSERT_EQ(moe_backend_faults_wrap(cpu, &f, &b, &err), 0);
            for (uint64_t k = 1; k < n; k++) {
                ASSERT_EQ(ffn(b, c, out), 0);
                ASSERT_EQ(mm(b, c, y), 0);
                ASSERT_EQ(copy(b, c, dst), 0);
            }
            ASSERT_TRUE(moe_backend_lost(b) == NULL);
            /* the other kinds once more: still not counted */
            if (kind != 0)
                ASSERT_EQ(ffn(b, c, out), 0);
            if (kind != 1)
                ASSERT_EQ(mm(b, c, y), 0);
            if (kind != 2)
                ASSERT_EQ(copy(b, c, dst), 0);
            ASSERT_TRUE(moe_backend_lost(b) == NULL);
            ASSERT_EQ(kind == 0   ? ffn(b, c, out)
                      : kind == 1 ? mm(b, c, y)
                                  : copy(b, c, dst),
                      -ENOTRECOVERABLE);
            snprintf(want, sizeof(want), "%s call %llu", names[kind], (unsigned long long)n);
            ASSERT_CONTAINS(moe_backend_lost(b), want);
            ASSERT_CONTAINS(moe_backend_lost(b), "MOED_BACKEND_FAULTS");
            /* sticky: everything fails now, alloc too */
            ASSERT_EQ(ffn(b, c, out), -ENOTRECOVERABLE);
            ASSERT_EQ(mm(b, c, y), -ENOTRECOVERABLE);
            ASSERT_EQ(copy(b, c, dst), -ENOTRECOVERABLE);
            ASSERT_EQ(b->ops->copy_out(b, dst, c->x, sizeof(c->x)), -ENOTRECOVERABLE);
            ASSERT_TRUE(b->ops->alloc(b, 64) == NULL);
            ASSERT_CONTAINS(moe_backend_lost(b), want);
            moe_backend_free(b);
        }
    }
}

/* Before the fault: the wrapped backend's results, bit for bit; its name
 * and memory are the inner backend's; alloc and mem_free pass through. */
static void test_pass_through(struct ffn_case *c)
{
    struct moe_backend_faults f = {.ffn_nth = 3};
    struct moe_cpu_config cfg = {.n_threads = 2};
    struct moe_backend *ref, *cpu, *b;
    struct moe_error err = {0};
    float want[T * H], got[T * H], ym[T * F], yr[T * F];
    void *p;

    ASSERT_EQ(moe_backend_cpu_init(&cfg, &ref, NULL), 0);
    ASSERT_EQ(moe_backend_cpu_init(&cfg, &cpu, NULL), 0);
    ASSERT_EQ(moe_backend_faults_wrap(cpu, &f, &b, &err), 0);
    ASSERT_STREQ(b->ops->name, ref->ops->name);
    ASSERT_EQ(b->ops->host_memory, ref->ops->host_memory);
    ASSERT_TRUE(ref->ops->lost == NULL || moe_backend_lost(ref) == NULL);
    ASSERT_EQ(ffn(ref, c, want), 0);
    for (int i = 0; i < 2; i++) {
        ASSERT_EQ(ffn(b, c, got), 0);
        ASSERT_TRUE(memcmp(got, want, sizeof(got)) == 0);
    }
    ASSERT_EQ(mm(ref, c, yr), 0);
    ASSERT_EQ(mm(b, c, ym), 0);
    ASSERT_TRUE(memcmp(ym, yr, sizeof(ym)) == 0);
    p = b->ops->alloc(b, 4096);
    ASSERT_TRUE(p != NULL);
    ASSERT_EQ(ffn(b, c, got), -ENOTRECOVERABLE);
    b->ops->mem_free(b, p); /* memory from before the loss is still freed */
    if (b->ops->trim)
        b->ops->trim(b);
    moe_backend_free(b);
    moe_backend_free(ref);
}

/* Through the engine: forwards of a generated model on a backend that
 * loses its device at its 12th grouped_ffn call (a forward makes one per run
 * of experts ready): those before it are the
 * unwrapped backend's, bit for bit; the one that meets it fails with
 * -ENOTRECOVERABLE naming its layer, and so does every later one (at its
 * router). */
static void test_engine(void)
{
    char *dir = test_tmpdir("backend-fault");
    struct moe_genmodel_opts o;
    struct moe_backend_faults f = {.ffn_nth = 12};
    struct moe_cpu_config cfg = {.n_threads = 1};
    struct moe_backend *ref_b, *cpu, *b;
    struct moe_engine *ref_e, *e;
    struct moe_model *m;
    struct moe_error err = {0};
    float x[T * 64], want[2][T * 64], got[T * 64];
    char layer[32];
    uint64_t seed = 9;
    int served = 0, r = 0, i;

    moe_genmodel_defaults(MOE_ARCH_MIXTRAL, &o);
    o.out_dir = dir;
    o.hidden = 64;
    o.ffn = 32;
    o.n_layers = 2;
    o.n_experts = 4;
    o.seed = 3;
    if (moe_genmodel_write(&o, &err) != 0)
        FAIL("gen-model: %s", err.msg);
    ASSERT_EQ(moe_model_open(dir, &m, &err), 0);
    ASSERT_EQ(moe_backend_cpu_init(&cfg, &ref_b, NULL), 0);
    ASSERT_EQ(moe_backend_cpu_init(&cfg, &cpu, NULL), 0);
    ASSERT_EQ(moe_backend_faults_wrap(cpu, &f, &b, &err), 0);
    ASSERT_EQ(moe_engine_init(m, ref_b, &ref_e), 0);
    ASSERT_EQ(moe_engine_init(m, b, &e), 0);
    for (int k = 0; k < T * 64; k++)
        x[k] = test_rand_f32(&seed);
    for (int l = 0; l < 2; l++)
        ASSERT_EQ(moe_layer_forward(ref_e, l, x, T, NULL, NULL, want[l], NULL, NULL, NULL, &err),
                  0);
    for (i = 0; i < 40; i++) {
        r = moe_layer_forward(e, i % 2, x, T, NULL, NULL, got, NULL, NULL, NULL, &err);
        if (r < 0)
            break;
        ASSERT_TRUE(memcmp(got, want[i % 2], sizeof(got)) == 0);
        ASSERT_TRUE(moe_backend_lost(b) == NULL);
        served++;
    }
    printf("engine: %d forwards served before the fault: %d %s\n", served, r, err.msg);
    ASSERT_TRUE(served >= 1);
    ASSERT_EQ(r, -ENOTRECOVERABLE);
    snprintf(layer, sizeof(layer), "layer %d", i % 2);
    ASSERT_CONTAINS(err.msg, layer);
    ASSERT_CONTAINS(moe_backend_lost(b), "grouped_ffn call 12");
    for (int l = 0; l < 2; l++) {
        memset(&err, 0, sizeof(err));
        ASSERT_EQ(moe_layer_forward(e, l, x, T, NULL, NULL, got, NULL, NULL, NULL, &err),
                  -ENOTRECOVERABLE);
        snprintf(layer, sizeof(layer), "router of layer %d", l);
        ASSERT_CONTAINS(err.msg, layer);
    }
    moe_engine_free(e);
    moe_engine_free(ref_e);
    moe_backend_free(b);
    moe_backend_free(ref_b);
    moe_model_free(m);
    test_rmtree(dir);
    free(dir);
}

int main(void)
{
    struct ffn_case *c = calloc(1, sizeof(*c));

    ASSERT_TRUE(c);
    ffn_case_init(c);
    test_pass_through(c);
    test_kinds(c);
    test_engine();
    free(c);
    printf("ok\n");
    return 0;
}
