/*
 * moectl forward: run MoE layers in process (--local) on a .npy of hidden
 * states.
 */
#include "moectl.h"

#include "backend.h"
#include "common.h"
#include "layer.h"
#include "model.h"
#include "npy.h"
#include "threadpool.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- forward ------------------------------------------------------------ */

static void forward_usage(FILE *f)
{
    fprintf(f, "usage: moectl forward --local --model DIR --layer L --in X.npy --out Y.npy\n"
               "                      [--routing-out R.npz] [--routing-in R.npz]\n"
               "                      [--threads N] [--kernel auto|generic|avx2|avx512] [-q]\n"
               "\n"
               "Runs one MoE layer in this process.  X.npy: float32 [tokens, hidden] hidden\n"
               "states; Y.npy: float32 [tokens, hidden], the layer's output (routed experts\n"
               "weighted and summed, plus shared experts).  --routing-out writes the routing used\n"
               "(arrays 'ids' int32 and 'weights' float32, [tokens, top_k]); --routing-in takes\n"
               "the routing from such a file instead of the model's router.\n"
               "\n"
               "--local is required for now: forwarding through a running moed comes with the\n"
               "daemon.\n");
}

static int load_routing(const char *path, int n_tokens, int top_k, struct moe_npy *ids,
                        struct moe_npy *w)
{
    struct moe_error err = {0};

    if (moe_npz_read_array(path, "ids", ids, &err) < 0 ||
        moe_npz_read_array(path, "weights", w, &err) < 0) {
        errorf("forward: %s", err.msg);
        return -EINVAL;
    }
    if (ids->type != MOE_NPY_I32 || ids->ndim != 2 || ids->shape[0] != n_tokens ||
        ids->shape[1] != top_k) {
        errorf("forward: %s: 'ids' must be int32 [%d, %d] (tokens, top_k)", path, n_tokens, top_k);
        return -EINVAL;
    }
    if (w->type != MOE_NPY_F32 || w->ndim != 2 || w->shape[0] != n_tokens || w->shape[1] != top_k) {
        errorf("forward: %s: 'weights' must be float32 [%d, %d] (tokens, top_k)", path, n_tokens,
               top_k);
        return -EINVAL;
    }
    return 0;
}

int moectl_forward(int argc, char **argv)
{
    static const struct option opts[] = {
        {"local", no_argument, NULL, 'l'},
        {"model", required_argument, NULL, 'm'},
        {"layer", required_argument, NULL, 'L'},
        {"in", required_argument, NULL, 'i'},
        {"out", required_argument, NULL, 'o'},
        {"routing-out", required_argument, NULL, 'R'},
        {"routing-in", required_argument, NULL, 'r'},
        {"threads", required_argument, NULL, 't'},
        {"kernel", required_argument, NULL, 'k'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *dir = NULL, *in = NULL, *outp = NULL, *rout = NULL, *rin = NULL;
    struct moe_cpu_config cpu = {0};
    struct moe_error err = {0};
    struct moe_model *m = NULL;
    struct moe_backend *b = NULL;
    struct moe_engine *e = NULL;
    struct moe_npy x = {0}, rids = {0}, rw = {0};
    struct moe_forward_stats st;
    int32_t *ids = NULL;
    float *w = NULL, *y = NULL;
    bool local = false, quiet = false;
    int layer = -1, c, r, ret = 1, T;
    char b1[32];

    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 'l':
            local = true;
            break;
        case 'm':
            dir = optarg;
            break;
        case 'L':
            if (parse_int("--layer", optarg, 0, MOE_MAX_LAYERS - 1, &layer) < 0)
                return 2;
            break;
        case 'i':
            in = optarg;
            break;
        case 'o':
            outp = optarg;
            break;
        case 'R':
            rout = optarg;
            break;
        case 'r':
            rin = optarg;
            break;
        case 't':
            if (parse_int("--threads", optarg, 1, 1024, &cpu.n_threads) < 0)
                return 2;
            break;
        case 'k':
            cpu.kernel = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'h':
            forward_usage(stdout);
            return 0;
        default:
            forward_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("forward: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!local) {
        errorf("forward: --local is required: forwarding through a running moed is not "
               "available yet");
        return 2;
    }
    if (!dir || layer < 0 || !in || !outp) {
        errorf("forward: --model, --layer, --in and --out are required (see moectl forward "
               "--help)");
        return 2;
    }

    if (moe_model_open(dir, &m, &err) < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    if (moe_npy_read(in, &x, &err) < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    if (x.type != MOE_NPY_F32 || x.ndim != 2 || x.shape[1] != m->cfg.hidden) {
        errorf("forward: %s: expected float32 hidden states of shape [tokens, %d], got %s of "
               "%d dimension(s)%s",
               in, m->cfg.hidden, x.type == MOE_NPY_F32 ? "float32" : "int32", x.ndim,
               x.ndim == 2 ? " with another width" : "");
        goto out;
    }
    if (x.shape[0] < 1 || x.shape[0] > MOE_MAX_TOKENS) {
        errorf("forward: %s: %lld tokens: expected 1 to %d", in, (long long)x.shape[0],
               MOE_MAX_TOKENS);
        goto out;
    }
    T = (int)x.shape[0];
    if (rin && load_routing(rin, T, m->cfg.top_k, &rids, &rw) < 0)
        goto out;

    r = moe_backend_cpu_init(&cpu, &b, &err);
    if (r < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    if (moe_engine_init(m, b, &e) < 0) {
        errorf("forward: out of memory");
        goto out;
    }
    ids = malloc((size_t)T * m->cfg.top_k * sizeof(*ids));
    w = malloc((size_t)T * m->cfg.top_k * sizeof(*w));
    y = malloc((size_t)T * m->cfg.hidden * sizeof(*y));
    if (!ids || !w || !y) {
        errorf("forward: out of memory for %d tokens", T);
        goto out;
    }
    r = moe_layer_forward(e, layer, x.data, T, rin ? rids.data : NULL, rin ? rw.data : NULL, y, ids,
                          w, &st, &err);
    if (r < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    {
        int64_t shape[2] = {T, m->cfg.hidden};

        if (moe_npy_write(outp, MOE_NPY_F32, 2, shape, y, &err) < 0) {
            errorf("forward: %s", err.msg);
            goto out;
        }
    }
    if (rout) {
        int64_t shape[2] = {T, m->cfg.top_k};
        struct moe_npz_entry ent[2] = {
            {"ids", MOE_NPY_I32, 2, shape, ids},
            {"weights", MOE_NPY_F32, 2, shape, w},
        };

        if (moe_npz_write(rout, ent, 2, &err) < 0) {
            errorf("forward: %s", err.msg);
            goto out;
        }
    }
    if (!quiet) {
        uint64_t total = st.route_ns + st.load_ns + st.compute_ns;

        printf("layer %d: %d tokens, %d of %d experts used (%s read), %.3f ms: route %.3f ms, "
               "read %.3f ms, compute %.3f ms; %.0f tokens/s [%s %s]\n",
               layer, T, st.experts_used, m->cfg.n_experts,
               human_bytes(st.bytes_read, b1, sizeof(b1)), (double)total / 1e6,
               (double)st.route_ns / 1e6, (double)st.load_ns / 1e6, (double)st.compute_ns / 1e6,
               total ? (double)T * 1e9 / (double)total : 0.0, b->ops->name,
               moe_backend_cpu_kernel(b));
    }
    ret = 0;
out:
    moe_engine_free(e);
    moe_backend_free(b);
    moe_model_free(m);
    moe_npy_clear(&x);
    moe_npy_clear(&rids);
    moe_npy_clear(&rw);
    free(ids);
    free(w);
    free(y);
    return ret;
}
