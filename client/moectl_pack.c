/*
 * moectl pack and verify: write a packed store (engine/pack.h) from a
 * checkpoint, check one against its checksums and its checkpoint.
 */
#include "moectl.h"

#include "common.h"
#include "model.h"
#include "pack.h"
#include "quant.h"
#include "safetensors.h"

#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct progress_ctx {
    bool show;
    const char *what; /* "packing", "verifying" */
    uint64_t t0;
    uint64_t last_ns; /* of the last line drawn */
    bool open_line;   /* a line is drawn without its newline */
    bool finished;    /* the 100% line is drawn: a repeat of it is not */
};

/* Ends a half-drawn progress line, before an error message. */
static void progress_end(struct progress_ctx *p)
{
    if (p->open_line)
        fputc('\n', stderr);
    p->open_line = false;
}

/* A progress bar on stderr (a tty), redrawn at most 10 times a second. */
static void progress(void *ctx, uint64_t done, uint64_t total)
{
    struct progress_ctx *p = ctx;
    const int width = 30;
    uint64_t now = moe_now_ns();
    int fill = total > 0 ? (int)((double)done * width / (double)total) : width;
    double secs = (double)(now - p->t0) / 1e9;
    char b1[32], b2[32];

    if (!p->show || (done < total && now - p->last_ns < 100000000ull))
        return;
    /* The writer may report its end more than once (data, then index). */
    if (done >= total && p->finished)
        return;
    p->finished = done >= total;
    p->last_ns = now;
    fprintf(stderr, "\r  %s [%.*s%*s] %s / %s, %.0f MB/s   ", p->what, fill,
            "##############################", width - fill, "", human_bytes(done, b1, sizeof(b1)),
            human_bytes(total, b2, sizeof(b2)), secs > 0 ? (double)done / secs / 1e6 : 0.0);
    p->open_line = done < total;
    if (!p->open_line)
        fputc('\n', stderr);
    fflush(stderr);
}

/* ---- pack ----------------------------------------------------------------- */

static void pack_usage(FILE *f)
{
    fprintf(f, "usage: moectl pack --model DIR --out DIR [--quantize int8|int4 [--group N]]\n"
               "                  [--force] [-q]\n"
               "\n"
               "Writes the packed store of a checkpoint: config.json, experts.bin (every routed\n"
               "expert as one 4096-aligned blob of gate, up and down, then routers, biases and\n"
               "shared experts) and moe-pack.json (offsets and XXH3 checksums), written last.\n"
               "moed and every moectl command open the store like the checkpoint, faster.\n"
               "FP8 and gpt-oss's MXFP4 experts are stored as they are (MXFP4's interleaved\n"
               "gate and up rows taken apart).\n"
               "\n"
               "  --model DIR    the checkpoint (Hugging Face layout)\n"
               "  --out DIR      the store's directory (created; not the checkpoint's)\n"
               "  --quantize int8|int4\n"
               "                 store the experts (routed and shared) quantized, symmetric\n"
               "                 with one float32 scale per group of a row, from a bf16,\n"
               "                 f16, f32 or fp8 checkpoint; moed computes on them directly\n"
               "  --group N      values per scale: a multiple of 32 that divides hidden and\n"
               "                 the expert ffn (default 128 for int8, 32 for int4, halved\n"
               "                 until it divides them)\n"
               "  --force        replace a store already in --out\n"
               "  -q, --quiet    no progress output\n");
}

int moectl_pack(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},    {"out", required_argument, NULL, 'o'},
        {"force", no_argument, NULL, 'f'},          {"quiet", no_argument, NULL, 'q'},
        {"quantize", required_argument, NULL, 'Q'}, {"group", required_argument, NULL, 'g'},
        {"help", no_argument, NULL, 'h'},           {0},
    };
    struct moe_quant_fmt quant = {0};
    long group = 0;
    char *end;
    struct progress_ctx pc = {.show = isatty(STDERR_FILENO), .what = "packing"};
    struct moe_error err = {0};
    struct moe_model *m = NULL, *packed = NULL;
    const char *dir = NULL, *out = NULL;
    bool force = false;
    uint64_t t0, bytes;
    double secs;
    char b1[32];
    int c, r;

    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            dir = optarg;
            break;
        case 'o':
            out = optarg;
            break;
        case 'f':
            force = true;
            break;
        case 'Q':
            if (moe_quant_parse(optarg, &quant.q) < 0 ||
                (quant.q != MOE_QUANT_INT8 && quant.q != MOE_QUANT_INT4)) {
                errorf("pack: --quantize '%s': expected int8 or int4", optarg);
                return 2;
            }
            break;
        case 'g':
            errno = 0;
            group = strtol(optarg, &end, 10);
            if (errno || *end || end == optarg || group < 32 || group > MOE_QUANT_GROUP_MAX ||
                group % 32 != 0) {
                errorf("pack: --group '%s': expected a multiple of 32 from 32 to %d", optarg,
                       MOE_QUANT_GROUP_MAX);
                return 2;
            }
            break;
        case 'q':
            pc.show = false;
            break;
        case 'h':
            pack_usage(stdout);
            return 0;
        default:
            pack_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("pack: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!dir || !out) {
        errorf("pack: --model and --out are required (see moectl pack --help)");
        return 2;
    }
    if (group && quant.q == MOE_QUANT_NONE) {
        errorf("pack: --group needs --quantize int8|int4");
        return 2;
    }

    t0 = moe_now_ns();
    r = moe_model_open(dir, &m, &err);
    if (r < 0) {
        errorf("pack: %s", err.msg);
        return 1;
    }
    if (quant.q != MOE_QUANT_NONE) {
        quant.brows = 1;
        quant.bcols = group ? (int)group : moe_pack_default_group(m, quant.q);
    }
    pc.t0 = moe_now_ns();
    r = moe_pack_write_quant(m, out, force, &quant, progress, &pc, &err);
    moe_model_free(m);
    if (r < 0) {
        progress_end(&pc);
        errorf("pack: %s", err.msg);
        return 1;
    }
    secs = (double)(moe_now_ns() - t0) / 1e9;
    /* Read back what was written with the real loader, as the daemon will. */
    r = moe_model_open(out, &packed, &err);
    if (r < 0) {
        errorf("pack: the written store does not load: %s", err.msg);
        return 1;
    }
    bytes = packed->files[0].size;
    printf("packed %s into %s%s%s: %d experts in %d MoE layers, %zu tensors, %llu bytes (%s) in "
           "%.2f s, %.0f MB/s\n",
           dir, out, quant.q ? " as " : "", quant.q ? moe_quant_name(quant.q) : "",
           packed->n_moe_layers * packed->cfg.n_experts, packed->n_moe_layers,
           packed->headers[0]->n_tensors, (unsigned long long)bytes,
           human_bytes(bytes, b1, sizeof(b1)), secs, secs > 0 ? (double)bytes / secs / 1e6 : 0.0);
    moe_model_free(packed);
    return 0;
}

/* ---- verify --------------------------------------------------------------- */

static void verify_usage(FILE *f)
{
    fprintf(f, "usage: moectl verify --pack DIR [--model CHECKPOINT_DIR] [-q]\n"
               "\n"
               "Checks a packed store: its structure against config.json, then every tensor's\n"
               "and every expert's XXH3 checksum against experts.bin (read once, in full).\n"
               "With --model, also compares config.json and every tensor byte for byte with\n"
               "the checkpoint it was packed from.  Exit 0 when everything matches, 1 with the\n"
               "first mismatch named otherwise.\n"
               "\n"
               "  --pack DIR     the packed store\n"
               "  --model DIR    the checkpoint to compare with (optional)\n"
               "  -q, --quiet    no progress output\n");
}

int moectl_verify(int argc, char **argv)
{
    static const struct option opts[] = {
        {"pack", required_argument, NULL, 'p'},
        {"model", required_argument, NULL, 'm'},
        {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    struct progress_ctx pc = {.show = isatty(STDERR_FILENO), .what = "verifying"};
    struct moe_pack_report rep = {0};
    struct moe_error err = {0};
    const char *pack = NULL, *dir = NULL;
    double secs;
    char b1[32];
    int c, r;

    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 'p':
            pack = optarg;
            break;
        case 'm':
            dir = optarg;
            break;
        case 'q':
            pc.show = false;
            break;
        case 'h':
            verify_usage(stdout);
            return 0;
        default:
            verify_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("verify: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!pack) {
        errorf("verify: --pack DIR is required (see moectl verify --help)");
        return 2;
    }

    pc.t0 = moe_now_ns();
    r = moe_pack_verify(pack, dir, &rep, progress, &pc, &err);
    secs = (double)(moe_now_ns() - pc.t0) / 1e9;
    progress_end(&pc);
    if (r < 0 && r != -EBADMSG) {
        errorf("verify: %s", err.msg);
        return 1;
    }
    printf("checked %s: %llu tensors and %llu experts, %llu bytes (%s) of experts.bin against "
           "the index checksums%s%s in %.2f s\n",
           pack, (unsigned long long)rep.tensors_checked, (unsigned long long)rep.experts_checked,
           (unsigned long long)rep.bytes_checked, human_bytes(rep.bytes_checked, b1, sizeof(b1)),
           dir ? ", and byte for byte against " : "", dir ? dir : "", secs);
    if (r == -EBADMSG) {
        errorf("verify: %s: %llu mismatch%s; first: %s", pack, (unsigned long long)rep.mismatches,
               rep.mismatches == 1 ? "" : "es", err.msg);
        return 1;
    }
    printf("all match\n");
    return 0;
}
