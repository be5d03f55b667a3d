/*
 * Benchmark of expert page-ins through the cache (engine/cache.c) from a
 * packed store, the path a forward takes on a miss: the pager's O_DIRECT
 * reads into the host tier, then the xxh3 check.
 *
 * 1. Makes a Mixtral-shaped synthetic model (experts of 3 x 4096 x 14336
 *    bf16, 352 MB each; 12 of them, 4.2 GB) and packs it (moectl pack's
 *    code) in --dir, then removes the checkpoint.
 * 2. Throughput: every expert of the store paged in cold, a layer's experts
 *    at once, through moe_cache_acquire/wait; then evicted; several passes.
 * 3. fio (io_uring, O_DIRECT, 1 MiB blocks, queue depth 32) on experts.bin
 *    in the same run, alternating with the passes; prints page-in GB/s /
 *    fio GB/s (target >= 0.9).
 * 4. Latency of one expert paged in alone: the Mixtral-sized ones, and
 *    DeepSeek-V3-sized ones (3 x 7168 x 2048 bf16, 88 MB) from a second
 *    store; p50 and max.  Then per stored format, DeepSeek-V3-sized again:
 *    fp8 (as published: e4m3 and a float32 scale per 128 x 128 block,
 *    44 MB), int8 (pack --quantize, group 128) and int4 (group 32): the
 *    page-in time of an expert follows its stored bytes.
 *
 * usage: bench-pagein [--quick] [--dir DIR] [--keep] [--no-register]
 * --quick shrinks the experts (ctest's smoke run).
 */
#include "bench.h"
#include "cache.h"
#include "common.h"
#include "genmodel.h"
#include "model.h"
#include "pack.h"
#include "quant.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PASSES 3

struct opts {
    bool quick, keep, no_register;
    const char *dir;
};

static void die(const char *what, const struct moe_error *err)
{
    fprintf(stderr, "bench-pagein: %s: %s\n", what, err ? err->msg : strerror(errno));
    exit(1);
}

static void rmrf(const char *path)
{
    char cmd[4200];

    if (strchr(path, '\''))
        return;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", path);
    if (system(cmd) != 0)
        fprintf(stderr, "bench-pagein: could not remove %s\n", path);
}

/* Generates a model (dtype: BF16, or F8_E4M3 as FP8 checkpoints are) and
 * packs it into dir/name, quantized to q unless q is NULL; returns the
 * store path. */
static char *make_store_as(const struct opts *o, const char *name, int layers, int experts,
                           int hidden, int ffn, enum moe_dtype dtype, const struct moe_quant_fmt *q)
{
    struct moe_genmodel_opts g;
    struct moe_error err;
    struct moe_model *m;
    char ck[4096], *pack = malloc(4096);
    uint64_t t0 = moe_now_ns();

    snprintf(ck, sizeof(ck), "%s/bench-pagein-%s-ckpt", o->dir, name);
    snprintf(pack, 4096, "%s/bench-pagein-%s", o->dir, name);
    rmrf(ck);
    rmrf(pack);
    moe_genmodel_defaults(MOE_ARCH_MIXTRAL, &g);
    g.out_dir = ck;
    g.n_layers = layers;
    g.n_experts = experts;
    g.top_k = 2;
    g.hidden = hidden;
    g.ffn = ffn;
    g.seed = 3;
    g.dtype = dtype;
    if (moe_genmodel_write(&g, &err) < 0)
        die("gen-model", &err);
    if (moe_model_open(ck, &m, &err) < 0)
        die("open", &err);
    if (moe_pack_write_quant(m, pack, true, q, NULL, NULL, &err) < 0)
        die("pack", &err);
    if (q) {
        /* the store's own expert size */
        moe_model_free(m);
        if (moe_model_open(pack, &m, &err) < 0)
            die("open", &err);
    }
    printf("store    %s: %d x %d experts of %.1f MB, made in %.1f s\n", pack, layers, experts,
           (double)m->expert_bytes / 1e6, (double)(moe_now_ns() - t0) / 1e9);
    moe_model_free(m);
    rmrf(ck);
    return pack;
}

static char *make_store(const struct opts *o, const char *name, int layers, int experts, int hidden,
                        int ffn)
{
    return make_store_as(o, name, layers, experts, hidden, ffn, MOE_DTYPE_BF16, NULL);
}

static struct moe_cache *open_cache(const struct opts *o, struct moe_model *m, int *model)
{
    struct moe_cache_config cfg = {
        .host_bytes = m->n_moe_layers * (uint64_t)m->cfg.n_experts * (m->expert_bytes + 8192),
        .policy = MOE_POLICY_LRU,
        .register_buffers = !o->no_register,
    };
    struct moe_cache *c;
    struct moe_error err;
    struct moe_pager_stats ps;

    if (moe_cache_create(&cfg, &c, &err) < 0)
        die("cache", &err);
    if (moe_cache_add_model(c, m, "bench", model, &err) < 0)
        die("cache", &err);
    moe_pager_get_stats(moe_cache_pager(c), &ps);
    printf("cache    host tier %.2f GB, O_DIRECT %s, registered buffers %s, files %s\n",
           (double)cfg.host_bytes / 1e9,
           moe_pager_file_direct(moe_cache_pager(c), 0) ? "yes" : "no",
           ps.buffers_registered ? "yes" : "no", ps.files_registered ? "yes" : "no");
    return c;
}

/* Pages every expert in, a layer at a time; returns bytes/s. */
static double page_all(struct moe_cache *c, int model, const struct moe_model *m)
{
    int E = m->cfg.n_experts;
    int32_t *ex = malloc((size_t)E * sizeof(*ex));
    struct moe_cache_ref *refs = calloc((size_t)E, sizeof(*refs));
    struct moe_error err;
    uint64_t bytes = 0, t0;

    for (int x = 0; x < E; x++)
        ex[x] = x;
    t0 = moe_now_ns();
    for (int l = 0; l < m->cfg.n_layers; l++) {
        if (moe_cache_acquire(c, model, l, ex, E, refs, &err) < 0)
            die("acquire", &err);
        for (int x = 0; x < E; x++) {
            if (refs[x].hit)
                die("an expert was resident before its page-in", NULL);
            if (moe_cache_wait(c, &refs[x], &err) < 0)
                die("page-in", &err);
            bytes += m->layers[l].experts[x].nbytes;
        }
        moe_cache_release(c, refs, E);
    }
    t0 = moe_now_ns() - t0;
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (int x = 0; x < E; x++)
            if (moe_cache_evict(c, model, l, x, &err) < 0)
                die("evict", &err);
    free(ex);
    free(refs);
    return (double)bytes * 1e9 / (double)t0;
}

/* One expert alone, n times (evicted between): p50 and max in seconds. */
static void latency(const struct opts *o, const char *store, const char *what, int n, double fio_bw)
{
    struct moe_model *m;
    struct moe_cache *c;
    struct moe_error err;
    double t[BENCH_MAX_PASSES * 4];
    int model, E;

    if (moe_model_open(store, &m, &err) < 0)
        die("open", &err);
    c = open_cache(o, m, &model);
    E = m->cfg.n_experts;
    n = MOE_MIN(n, (int)MOE_ARRAY_SIZE(t));
    for (int i = 0; i < n; i++) {
        int32_t x = i % E;
        int l = (i / E) % m->cfg.n_layers;
        struct moe_cache_ref ref;
        uint64_t t0 = moe_now_ns();

        if (moe_cache_acquire(c, model, l, &x, 1, &ref, &err) < 0 ||
            moe_cache_wait(c, &ref, &err) < 0)
            die("page-in", &err);
        t[i] = (double)(moe_now_ns() - t0) / 1e9;
        moe_cache_release(c, &ref, 1);
        if (moe_cache_evict(c, model, l, x, &err) < 0)
            die("evict", &err);
    }
    qsort(t, (size_t)n, sizeof(t[0]), bench_cmp_double);
    printf("latency  %-9s %9.1f MB x %2d: p50 %7.1f ms, max %7.1f ms -> %5.2f GB/s", what,
           (double)m->expert_bytes / 1e6, n, t[n / 2] * 1e3, t[n - 1] * 1e3,
           (double)m->expert_bytes / t[n / 2] / 1e9);
    if (fio_bw > 0)
        printf(", %.2f of fio", (double)m->expert_bytes / t[n / 2] / fio_bw);
    printf("\n");
    moe_cache_free(c);
    moe_model_free(m);
}

int main(int argc, char **argv)
{
    struct opts o = {.dir = "."};
    double pg[PASSES], fio[PASSES];
    struct moe_model *m;
    struct moe_cache *c;
    struct moe_error err;
    char *big, *ds, data[4200];
    struct stat sb;
    int model, passes;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            o.quick = true;
        else if (!strcmp(argv[i], "--keep"))
            o.keep = true;
        else if (!strcmp(argv[i], "--no-register"))
            o.no_register = true;
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            o.dir = argv[++i];
        else {
            fprintf(stderr, "usage: bench-pagein [--quick] [--dir DIR] [--keep] [--no-register]\n");
            return 2;
        }
    }
    passes = o.quick ? 1 : PASSES;
    /* Mixtral experts (3 x 4096 x 14336), 12 of them: 4.2 GB. */
    big = o.quick ? make_store(&o, "mixtral", 2, 4, 1024, 3584)
                  : make_store(&o, "mixtral", 2, 6, 4096, 14336);
    if (moe_model_open(big, &m, &err) < 0)
        die("open", &err);
    snprintf(data, sizeof(data), "%s/%s", big, MOE_PACK_DATA);
    if (stat(data, &sb) < 0)
        die(data, NULL);
    c = open_cache(&o, m, &model);

    printf("throughput: every expert paged in cold, a layer's %d at once, %d passes\n",
           m->cfg.n_experts, passes);
    for (int p = 0; p < passes; p++) {
        pg[p] = page_all(c, model, m);
        fio[p] = bench_fio(data, (uint64_t)sb.st_size, "");
    }
    printf("  page-in %6.2f GB/s (best; passes", bench_best(pg, passes) / 1e9);
    for (int p = 0; p < passes; p++)
        printf("%s %.2f", p ? "," : "", pg[p] / 1e9);
    printf("; checksums verified)\n");
    if (bench_best(fio, passes) > 0) {
        printf("  fio     %6.2f GB/s (best; passes", bench_best(fio, passes) / 1e9);
        for (int p = 0; p < passes; p++)
            printf("%s %.2f", p ? "," : "", fio[p] / 1e9);
        printf("; io_uring, O_DIRECT, 1 MiB, QD 32, on experts.bin)\n");
        printf("  ratio   %6.2f     page-in / fio, best (target >= 0.90); median %.2f\n",
               bench_best(pg, passes) / bench_best(fio, passes),
               bench_median(pg, passes) / bench_median(fio, passes));
    } else {
        printf("  fio not found: no ratio (scripts/deps.sh installs it)\n");
    }
    moe_cache_free(c);
    moe_model_free(m);

    latency(&o, big, "mixtral", o.quick ? 4 : 8, bench_best(fio, passes));
    ds = o.quick ? make_store(&o, "deepseek", 1, 4, 1024, 512)
                 : make_store(&o, "deepseek", 1, 8, 7168, 2048);
    latency(&o, ds, "deepseek", o.quick ? 4 : 16, bench_best(fio, passes));
    if (!o.keep)
        rmrf(ds);
    /* the same experts in the quantized formats */
    {
        static const struct {
            const char *name;
            enum moe_dtype dtype;
            struct moe_quant_fmt q;
        } fmts[] = {
            {"ds-fp8", MOE_DTYPE_F8_E4M3, {MOE_QUANT_NONE, 0, 0}},
            {"ds-int8", MOE_DTYPE_BF16, {MOE_QUANT_INT8, 1, MOE_QUANT_INT8_GROUP}},
            {"ds-int4", MOE_DTYPE_BF16, {MOE_QUANT_INT4, 1, MOE_QUANT_INT4_GROUP}},
        };

        for (size_t i = 0; i < MOE_ARRAY_SIZE(fmts); i++) {
            char *st =
                o.quick
                    ? make_store_as(&o, fmts[i].name, 1, 4, 1024, 512, fmts[i].dtype, &fmts[i].q)
                    : make_store_as(&o, fmts[i].name, 1, 8, 7168, 2048, fmts[i].dtype, &fmts[i].q);

            latency(&o, st, fmts[i].name, o.quick ? 4 : 16, bench_best(fio, passes));
            if (!o.keep)
                rmrf(st);
            free(st);
        }
    }
    if (!o.keep)
        rmrf(big);
    free(big);
    free(ds);
    return 0;
}
