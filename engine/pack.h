/*
 * The packed store: a model's MoE tensors rewritten for fast paging.
 *
 * `moectl pack --model DIR --out OUT` writes, in OUT:
 *   config.json    copied byte for byte from the checkpoint;
 *   experts.bin    the data: every routed expert as one blob, its gate, up
 *                  and down matrices back to back (in that order, the
 *                  checkpoint's dtype and row-major layout), starting at a
 *                  multiple of MOE_PACK_ALIGN and padded with zeros to the
 *                  next one; then the other MoE tensors (routers, score
 *                  biases, shared experts, qwen2_moe shared-expert gates),
 *                  each MOE_PACK_ALIGN-aligned.  The file's size is a
 *                  multiple of MOE_PACK_ALIGN, so an O_DIRECT read of any
 *                  blob's aligned span never runs past its end.
 *   moe-pack.json  the index (below), written last, atomically (rename), so
 *                  that a directory holding it is a complete store.
 *
 * moe-pack.json:
 *   {
 *     "format": "moed-pack", "version": 1, "alignment": 4096,
 *     "data": "experts.bin", "data_bytes": <size of experts.bin>,
 *     "source": {"files": [{"name": "model-00001-of-00002.safetensors",
 *                           "size": <bytes>}, ...]},
 *     "tensors": {
 *       "<checkpoint tensor name>": {"dtype": "BF16", "shape": [rows, cols],
 *                                    "offset": <absolute in experts.bin>,
 *                                    "nbytes": <bytes>, "xxh3": "<16 hex>"},
 *       ...                          (every MoE tensor the model uses, the
 *                                    expert matrices included)
 *     },
 *     "experts": [{"layer": L, "expert": E, "offset": <blob offset>,
 *                  "nbytes": <gate+up+down bytes>, "xxh3": "<16 hex>"}, ...]
 *   }
 * xxh3 is XXH3_64bits (libxxhash) of the bytes, lower-case hex.  An expert's
 * blob offset equals its gate tensor's offset, and up and down follow it.
 *
 * moe_model_open() recognises a directory holding moe-pack.json and returns
 * a struct moe_model whose tensor references point into experts.bin (one
 * file), with blob = true and the checksum for every routed expert; the
 * rest of the engine serves from it exactly as from the checkpoint.
 */
#ifndef MOED_ENGINE_PACK_H
#define MOED_ENGINE_PACK_H

#include "common.h"

#define MOE_PACK_ALIGN 4096u
#define MOE_PACK_INDEX "moe-pack.json"
#define MOE_PACK_DATA "experts.bin"
#define MOE_PACK_VERSION 1

struct moe_model;
struct moe_st_header;

/* Called after each expert written or checked; may be NULL. */
typedef void (*moe_pack_progress_fn)(void *ctx, uint64_t done, uint64_t total);

/*
 * Writes the packed store of the checkpoint m into out_dir (created if
 * missing; refused with -EEXIST if it already holds a store, unless
 * overwrite).  Reads every MoE tensor once; writes experts.bin, then the
 * index.  0 or -errno with err.
 */
int moe_pack_write(const struct moe_model *m, const char *out_dir, bool overwrite,
                   moe_pack_progress_fn progress, void *ctx, struct moe_error *err);

/* What moe_pack_verify found. */
struct moe_pack_report {
    uint64_t tensors_checked;
    uint64_t experts_checked;
    uint64_t bytes_checked;
    uint64_t mismatches; /* checksum or content mismatches (err names the first) */
};

/*
 * Checks the packed store in pack_dir: every checksum in its index against
 * experts.bin, and, when checkpoint_dir is not NULL, every tensor byte for
 * byte against the original checkpoint.  0 when all match; -EBADMSG (first
 * mismatch in err) or another -errno otherwise.  rep may be NULL.
 */
int moe_pack_verify(const char *pack_dir, const char *checkpoint_dir, struct moe_pack_report *rep,
                    moe_pack_progress_fn progress, void *ctx, struct moe_error *err);

/* Parsed moe-pack.json, used by moe_model_open (model.c). */
struct moe_pack_entry {
    int layer, expert;
    uint64_t offset, nbytes, xxh3;
};

struct moe_pack_index {
    uint64_t data_bytes;
    char *data_name;                  /* owned; "experts.bin" */
    struct moe_st_header *tensors;    /* tensors, offsets absolute in the data file, owned */
    uint64_t *tensor_xxh3;            /* [tensors->n_tensors], same order, owned */
    size_t n_experts;
    struct moe_pack_entry *experts;   /* owned */
};

/*
 * Parses an index (len bytes of JSON); fname names it in messages.  Refuses
 * with -EINVAL (and the key, value and what is expected): another format or
 * version, a misaligned or overlapping offset, a range past data_bytes, a
 * bad checksum string, duplicate entries.
 */
int moe_pack_index_parse(const char *json, size_t len, const char *fname,
                         struct moe_pack_index *ret, struct moe_error *err);
void moe_pack_index_clear(struct moe_pack_index *ix);

#endif
