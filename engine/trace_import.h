/*
 * Importing routing recorded by other tools into a routing trace
 * (trace.h): one row per (layer, token), in the order the layers ran.
 *
 * csv: comma-separated fields layer, token, experts[, weights]; experts and
 *   weights are top_k values separated by spaces, ';' or '|', optionally in
 *   double quotes and/or brackets ("[3, 7]" with a comma inside quotes).  A
 *   first line whose first field is not a number is a header and skipped.
 *   Blank lines and lines starting with '#' are skipped.
 * jsonl: one JSON object per line, {"layer": L, "token": T, "experts":
 *   [ids], "weights": [w]} ("weights" optional, other keys ignored).  Blank
 *   lines are skipped.
 *
 * Checks, with the line number: the same as the trace reader's on a record
 * (layer < n_layers, each expert < n_experts, distinct, exactly top_k of
 * them), and token in [0, 2^32); weights, when given, top_k finite numbers
 * (not stored: the trace format has none).  With is_moe given (NULL: every
 * layer is), a row of a dense layer is refused too.
 */
#ifndef MOED_ENGINE_TRACE_IMPORT_H
#define MOED_ENGINE_TRACE_IMPORT_H

#include "trace.h"

#include <stdbool.h>
#include <stddef.h>

enum moe_trace_import_format {
    MOE_TRACE_IMPORT_CSV = 0,
    MOE_TRACE_IMPORT_JSONL,
};

/* Longest line accepted. */
#define MOE_TRACE_IMPORT_MAX_LINE 65536

/* "csv", "jsonl" -> 0 and *ret, or -EINVAL. */
int moe_trace_import_format_parse(const char *s, enum moe_trace_import_format *ret);

/*
 * Parses len bytes of buf in format fmt for a model of info's shape (its
 * model name and expert_bytes are copied, lookahead is off); is_moe
 * [info->n_layers] or NULL; fname names the input in messages ("FILE:LINE:
 * what").  0 and *ret (free with moe_trace_free), or -EINVAL with err on the
 * first bad line, -ENOMEM.
 */
int moe_trace_import(const void *buf, size_t len, enum moe_trace_import_format fmt,
                     const struct moe_trace_info *info, const bool *is_moe, const char *fname,
                     struct moe_trace **ret, struct moe_error *err);

#endif
