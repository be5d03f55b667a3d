/*
 * The packed store: a model's MoE tensors rewritten for fast paging.
 *
 * `moectl pack --model DIR --out OUT` writes, in OUT:
 *   config.json    copied byte for byte from the checkpoint;
 *   experts.bin    the data: every routed expert as one blob, its gate, up
 *                  and down matrices back to back (in that order, the
 *                  checkpoint's dtype and row-major layout: [ffn, hidden],
 *                  [ffn, hidden], [hidden, ffn]; Llama 4's and gpt-oss's
 *                  transposed experts are made plain on the way, and so
 *                  are gpt-oss's MXFP4 ones, whose gate and up rows the
 *                  checkpoint interleaves; a quantized expert's three
 *                  scale tensors follow, in the same order), starting at
 *                  a multiple of MOE_PACK_ALIGN and padded with zeros to
 *                  the next one; then the other
 *                  MoE tensors (routers, score biases, shared experts and
 *                  their scales, qwen2_moe shared-expert gates, gpt-oss's
 *                  router bias and expert biases gate_up_proj_bias and
 *                  down_proj_bias, as the checkpoint has them), each
 *                  MOE_PACK_ALIGN-aligned.  The file's size is a
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
 *                  "nbytes": <gate+up+down bytes, with their scales>,
 *                  "xxh3": "<16 hex>"}, ...],
 *     "quantization": {"format": "int8" | "int4", "group": G}  (optional)
 *   }
 *
 * Quantized experts (quant.h):
 *   - FP8, from a checkpoint as DeepSeek-V3 publishes it (its config.json,
 *     copied, says quantization_config fp8): each weight "<name>" F8_E4M3
 *     [rows, cols] and its "<name>_scale_inv" F32 [ceil(rows / 128),
 *     ceil(cols / 128)], copied as they are.
 *   - MXFP4, from gpt-oss as released (its config.json, copied, says
 *     quantization_config quant_method "mxfp4"): the checkpoint's fused
 *     gate_up_proj_blocks/_scales and down_proj_blocks/_scales are stored
 *     per expert, at their stored size: each weight "<name>" U8 [rows,
 *     cols / 2] (e2m1 values, element 2j in the low nibble of byte j, 2j + 1
 *     in the high) and "<name>_scale" U8 [rows, cols / 32] (e8m0: one byte
 *     a scale, 2^(s - 127), per 32 values of a row).  gate and up are plain:
 *     gate's ffn rows are the checkpoint's rows 2f of the expert's [2 x ffn,
 *     hidden], up's its rows 2f + 1 (values and scales alike); down is
 *     copied.  The biases (gate_up_proj_bias, gate and up interleaved as
 *     stored, and down_proj_bias) keep their dtype and layout.  --quantize
 *     of MXFP4 experts is refused.
 *   - moectl pack --quantize int8|int4 --group G: "quantization" is set and
 *     every expert matrix (routed and shared) "<name>" is I8 [rows, cols]
 *     (int8, values -127..127) or U8 [rows, cols / 2] (int4: values -7..7
 *     stored as v + 8, element 2j in the low nibble of byte j, 2j + 1 in
 *     the high), with "<name>_scale" F32 [rows, cols / G]: weight = value x
 *     scale, scale = max |w| / 127 (7) of the G weights it covers, values
 *     rounded to nearest (ties away from zero).  Routers, biases and the
 *     shared-expert gate keep their dtype.  G is a multiple of 32, at most
 *     4096, and divides every expert matrix's columns.
 * xxh3 is XXH3_64bits (libxxhash) of the bytes, exactly 16 lower-case hex
 * digits.  An expert's blob offset equals its gate tensor's offset, and up
 * and down follow it.  Entries are written in file order: the "experts"
 * array by (layer, expert), "tensors" routed experts first.
 *
 * What the parser requires (moe_pack_index_parse), beyond the keys above
 * being present with those types (unknown keys are ignored):
 *   - format "moed-pack", version 1, alignment 4096; "data" a plain file
 *     name (no '/', not "." or ".."); data_bytes a multiple of 4096, at
 *     most MOE_PACK_MAX_DATA;
 *   - every tensor: a known dtype, 0 to MOE_MAX_DIMS dimensions, nbytes =
 *     dtype size x product(shape), [offset, offset + nbytes) within
 *     data_bytes; no two tensors overlap;
 *   - every expert: layer < MOE_MAX_LAYERS, expert < MOE_MAX_EXPERTS, each
 *     (layer, expert) once, offset a multiple of 4096, nbytes > 0, within
 *     data_bytes; no two blobs overlap;
 *   - a tensor either lies wholly inside one expert blob or overlaps none
 *     and starts at a multiple of 4096;
 *   - at least one tensor and one expert;
 *   - "quantization", when present: format "int8" or "int4", group a
 *     multiple of 32 from 32 to 4096.
 * moe_model_open() then checks the rest against config.json: every tensor
 * the model needs, with its shape and dtype (quantized: as above, scales
 * included); every routed expert has an entry whose blob is exactly its
 * gate, up and down (then their scales) back to back; no entry
 * for an expert the model does not have; experts.bin is data_bytes long.
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
#define MOE_PACK_FORMAT "moed-pack"
/* Largest data_bytes accepted: 1 PiB. */
#define MOE_PACK_MAX_DATA (1ull << 50)
/* Largest moe-pack.json read (DeepSeek-V3's is about 10 MB). */
#define MOE_PACK_INDEX_MAX (64u << 20)

struct moe_model;
struct moe_st_header;

/*
 * Called after each expert (and each other tensor) written or checked; may
 * be NULL.  done and total count bytes of experts.bin.
 */
typedef void (*moe_pack_progress_fn)(void *ctx, uint64_t done, uint64_t total);

/*
 * Writes the packed store of the checkpoint m into out_dir (created, with
 * its parents, if missing).  Refused: out_dir the checkpoint's own directory
 * (-EINVAL); out_dir already holding a store (-EEXIST) unless overwrite, in
 * which case its index is removed first; out_dir holding a Hugging Face
 * checkpoint (-EEXIST, even with overwrite).  Reads every MoE tensor once;
 * copies config.json, writes experts.bin with large sequential writes and
 * fsyncs it, then writes the index to a temporary name, fsyncs and renames
 * it.  0 or -errno with err naming the file or tensor; a failure removes
 * what was written (no moe-pack.json is ever left behind).
 */
int moe_pack_write(const struct moe_model *m, const char *out_dir, bool overwrite,
                   moe_pack_progress_fn progress, void *ctx, struct moe_error *err);

/*
 * moe_pack_write, with the experts (routed and shared) quantized to
 * quant->q (INT8 or INT4, brows 1, bcols the group: a multiple of 32 that
 * divides every expert matrix's columns) from a BF16, F16, F32 or FP8
 * checkpoint, symmetric per group (quant.h moe_quant_row); quant NULL or
 * NONE copies them as they are (MXFP4 ones made plain).  From MXFP4
 * experts quant is refused (-ENOTSUP, naming the checkpoint).  Non-finite
 * weights are refused (-EINVAL, naming the tensor and element).
 */
int moe_pack_write_quant(const struct moe_model *m, const char *out_dir, bool overwrite,
                         const struct moe_quant_fmt *quant, moe_pack_progress_fn progress,
                         void *ctx, struct moe_error *err);

/* The group --quantize q takes when none is given: 128 (int8) or 32
 * (int4), halved down to 32 until it divides every expert matrix's
 * columns (the default again when none does: moe_pack_write_quant says
 * why). */
int moe_pack_default_group(const struct moe_model *m, enum moe_quant q);

/* What moe_pack_verify found. */
struct moe_pack_report {
    uint64_t tensors_checked;
    uint64_t experts_checked;
    uint64_t bytes_checked;
    uint64_t mismatches; /* checksum or content mismatches (err names the first) */
};

/*
 * Checks the packed store in pack_dir: opens it as moe_model_open() does
 * (structure, config.json, experts.bin's size), then reads experts.bin once,
 * front to back, and checks every tensor's and every expert's checksum.
 * When checkpoint_dir is not NULL, also compares config.json and every
 * tensor byte for byte (same names, dtypes and shapes) with the checkpoint's
 * (a transposed checkpoint expert, or an MXFP4 one with interleaved gate and
 * up rows, with its copy made plain).
 * rep->mismatches counts the tensors found wrong (by their checksum or by
 * the checkpoint, once each), plus expert blobs whose checksum fails while
 * their tensors pass, plus config.json and tensors missing on either side.
 * 0 when all match; -EBADMSG with the first mismatch in err (by file
 * offset; "layer 3 expert 5: checksum mismatch: index says ..., experts.bin
 * has ..." for a routed expert), or another -errno when the store cannot be
 * opened or read.  rep may be NULL; it is filled in either case.
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
    struct moe_quant_fmt quant;    /* "quantization", or .q NONE */
    char *data_name;               /* owned; "experts.bin" */
    struct moe_st_header *tensors; /* tensors, offsets absolute in the data file, owned */
    uint64_t *tensor_xxh3;         /* [tensors->n_tensors], same order, owned */
    size_t n_experts;
    struct moe_pack_entry *experts; /* owned, sorted by (layer, expert) */
};

/*
 * Parses an index (len bytes of JSON); fname names it in messages.  Refuses
 * with -EINVAL (and the key, value and what is expected): another format or
 * version, a misaligned or overlapping offset, a range past data_bytes, a
 * bad checksum string, duplicate keys or entries, missing keys (see the
 * list above); -ENOMEM.  *ret is set only on success; free its contents
 * with moe_pack_index_clear (which also takes a zeroed struct, and leaves
 * one).  tensors->header_len and data_start are 0, file_size data_bytes.
 */
int moe_pack_index_parse(const char *json, size_t len, const char *fname,
                         struct moe_pack_index *ret, struct moe_error *err);
void moe_pack_index_clear(struct moe_pack_index *ix);

/* qsort order of entries by offset, then (layer, expert). */
int moe_pack_entry_cmp_offset(const void *a, const void *b);
/* Binary search of ix->experts; NULL when (layer, expert) has no entry. */
const struct moe_pack_entry *moe_pack_index_find(const struct moe_pack_index *ix, int layer,
                                                 int expert);

#endif
