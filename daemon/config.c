/*
 * moed's configuration (config.h): one table of keys, set from the INI file
 * (inih) and from flags by the same setter.
 */
#include "config.h"

#include "layer.h"
#include "model.h"
#include "safetensors.h"

#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

enum kind {
    K_STR,
    K_BYTES,
    K_BOOL,
    K_INT,
    K_U64,
    K_DOUBLE,
    K_LEVEL,
    K_POLICY,
    K_LOG_FORMAT,
    K_PRECISION,
};

struct key {
    const char *section;
    const char *name;
    enum kind kind;
    size_t off;
    long min, max; /* K_INT, K_U64 */
    const char *help;
};

#define OFF(f) offsetof(struct moed_config, f)

static const struct key keys[] = {
    {"server", "listen", K_STR, OFF(listen), 0, 0,
     "gRPC address HOST:PORT (default 127.0.0.1:50051; \"none\": no TCP)"},
    {"server", "socket", K_STR, OFF(socket), 0, 0, "Unix socket for local gRPC control"},
    {"server", "token", K_STR, OFF(token), 0, 0, "bearer token required by mutating control calls"},
    {"server", "tls_cert", K_STR, OFF(tls_cert), 0, 0, "server certificate (PEM)"},
    {"server", "tls_key", K_STR, OFF(tls_key), 0, 0, "server private key (PEM)"},
    {"server", "tls_client_ca", K_STR, OFF(tls_client_ca), 0, 0,
     "CA (PEM) to verify client certificates"},
    {"server", "tls_require_client_cert", K_BOOL, OFF(tls_require_client_cert), 0, 0,
     "refuse clients without a certificate"},
    {"server", "max_message_bytes", K_BYTES, OFF(max_message_bytes), 0, 0,
     "largest request accepted (default 64M)"},
    {"server", "log_level", K_LEVEL, OFF(log_level), 0, 0, "error, warn, info or debug"},
    {"server", "log_format", K_LOG_FORMAT, OFF(log_format), 0, 0,
     "text (a timestamp and moed[PID] before each line, none under the systemd journal) or "
     "json (one object per line: ts, level, pid, msg)"},
    {"server", "rpc_threads", K_INT, OFF(rpc_threads), 1, 64, "gRPC completion-queue threads"},
    {"server", "drain_timeout_ms", K_U64, OFF(drain_timeout_ms), 0, 3600000,
     "on SIGTERM, how long requests in flight may finish"},
    {"server", "metrics", K_STR, OFF(metrics), 0, 0,
     "Prometheus GET /metrics on HOST:PORT (default: off)"},
    {"server", "shm_socket", K_STR, OFF(shm_socket), 0, 0,
     "Unix socket for shared-memory clients (libmoe-client; default: off)"},
    {"server", "shm_allow_users", K_STR, OFF(shm_allow_users), 0, 0,
     "users (names or uids, comma-separated) admitted besides root and moed's own"},
    {"server", "shm_allow_groups", K_STR, OFF(shm_allow_groups), 0, 0,
     "groups (names or gids) whose members are admitted"},
    {"server", "shm_max_arena_bytes", K_BYTES, OFF(shm_max_arena_bytes), 0, 0,
     "largest shared arena one client may ask for (default 1G)"},
    {"server", "shm_max_sessions", K_INT, OFF(shm_max_sessions), 1, 65536,
     "shared-memory clients at once (default 256)"},
    {"server", "model_dirs", K_STR, OFF(model_dirs), 0, 0,
     "directories LoadModel may load from, absolute, comma-separated (default: none but the "
     "configured models')"},
    {"server", "state_dir", K_STR, OFF(state_dir), 0, 0,
     "moed's own files: expert heat for warm starts, routing recordings (default: "
     "$STATE_DIRECTORY, which systemd sets, else none)"},
    {"cache", "host_cache_bytes", K_BYTES, OFF(host_cache_bytes), 0, 0,
     "host expert cache (default: every expert of the models)"},
    {"cache", "policy", K_POLICY, OFF(policy), 0, 0, "lru, freq, routing or adaptive"},
    {"cache", "prefetch", K_BOOL, OFF(prefetch), 0, 0, "prefetch the next layer's experts"},
    {"cache", "warm_start", K_BOOL, OFF(warm_start), 0, 0,
     "save each expert's heat at stop and page the hottest in at start (needs state_dir; "
     "default on)"},
    {"cache", "half_life", K_DOUBLE, OFF(half_life), 0, 0,
     "freq/routing decay, in uses of a layer"},
    {"cache", "register_buffers", K_BOOL, OFF(register_buffers), 0, 0,
     "register the cache with io_uring (locks it in memory)"},
    {"cache", "buffered", K_BOOL, OFF(buffered), 0, 0, "read experts without O_DIRECT"},
    {"scheduler", "batch_window_us", K_U64, OFF(batch_window_us), 1, 1000000,
     "how long a request waits for others to batch with"},
    {"scheduler", "max_batch_tokens", K_INT, OFF(max_batch_tokens), 1, MOE_MAX_TOKENS,
     "tokens per batch at most"},
    {"scheduler", "workers", K_INT, OFF(workers), 1, 256, "batches computed at once"},
    {"scheduler", "request_memory_bytes", K_BYTES, OFF(request_memory_bytes), 0, 0,
     "memory that requests in flight may use; more wait, a larger one is refused with "
     "RESOURCE_EXHAUSTED (default: a quarter of the host's memory)"},
    {"cluster", "node_name", K_STR, OFF(node_name), 0, 0,
     "this node's name among its peers (default: the host name)"},
    {"cluster", "replicas", K_INT, OFF(replicas), 0, 8,
     "extra copies of each hot expert on other nodes (default 1)"},
    {"cluster", "hot_fraction", K_DOUBLE, OFF(hot_fraction), 0, 0,
     "at most this share of experts, the most loaded, get replicas (default 0.125)"},
    {"cluster", "peer_timeout_ms", K_U64, OFF(peer_timeout_ms), 1, 3600000,
     "a peer slower than this for one call is failed over (default 2000)"},
    {"cluster", "ping_interval_ms", K_U64, OFF(ping_interval_ms), 10, 3600000,
     "how often each peer's health is checked (default 500)"},
    {"cluster", "rebalance_interval_ms", K_U64, OFF(rebalance_interval_ms), 100, 86400000,
     "how often replicas are chosen again from the measured load (default 5000)"},
    {"cluster", "peer_max_rows", K_INT, OFF(peer_max_rows), 0, MOE_MAX_TOKENS,
     "token rows per call to a peer; more are split (default: what max_message_bytes allows)"},
    {"cluster", "max_split_forwards", K_INT, OFF(max_split_forwards), 1, 4096,
     "forwards split across nodes in flight at most; more are refused with RESOURCE_EXHAUSTED "
     "(default 64)"},
    {"cluster", "peer_bf16", K_BOOL, OFF(peer_bf16), 0, 0,
     "token rows and partial outputs to peers in bf16: half the bytes, ~3 significant digits "
     "(default false: f32, exact)"},
    {"cluster", "nccl", K_BOOL, OFF(nccl), 0, 0,
     "send token rows to peers over NCCL where both ends have it and a GPU (default on)"},
    {"cluster", "nccl_device", K_INT, OFF(nccl_device), -1, 1023,
     "CUDA device for NCCL (default: the first of gpus, else 0)"},
    {"compute", "threads", K_INT, OFF(threads), 0, 1024, "CPU threads (0: one per CPU)"},
    {"compute", "kernel", K_STR, OFF(kernel), 0, 0, "auto, generic, avx2, avx512, amx or onednn"},
    {"compute", "int8_activations", K_BOOL, OFF(int8_activations), 0, 0,
     "int8, int4 and MXFP4 experts on the CPU take their activations as int8, per 32 values: "
     "faster decode where the kernel has it (avx2, avx512), about 1% error on a layer's output "
     "(default false: exact)"},
    {"compute", "gpus", K_STR, OFF(gpus), 0, 0,
     "CUDA devices to compute on, e.g. 0 (default: none, the CPU)"},
    {"compute", "gpu_cache_bytes", K_BYTES, OFF(gpu_cache_bytes), 0, 0,
     "experts resident on the GPU (default: half its free memory)"},
    {"compute", "compute_precision", K_PRECISION, OFF(compute_precision), 0, 0,
     "exact (activations to fp32 accuracy, the default) or bf16 (rounded to bf16 as torch "
     "computes a bf16 model; faster on CPUs with AVX-512 BF16); per model: [models] "
     "NAME.compute_precision"},
};

void moed_config_init(struct moed_config *c)
{
    memset(c, 0, sizeof(*c));
    c->listen = strdup("127.0.0.1:50051");
    c->max_message_bytes = 64ull << 20;
    c->log_level = MOE_LOG_INFO;
    c->rpc_threads = 2;
    c->drain_timeout_ms = 10000;
    c->policy = MOE_POLICY_ADAPTIVE;
    c->prefetch = true;
    c->warm_start = true;
    c->batch_window_us = 200;
    c->max_batch_tokens = 4096;
    c->shm_max_arena_bytes = 1ull << 30;
    c->replicas = 1;
    c->hot_fraction = 0.125;
    c->peer_timeout_ms = 2000;
    c->ping_interval_ms = 500;
    c->rebalance_interval_ms = 5000;
    c->max_split_forwards = MOED_SPLIT_FORWARDS_DEFAULT;
    c->shm_max_sessions = 256;
    c->workers = 2;
    c->nccl = true;
    c->nccl_device = -1;
}

void moed_config_clear(struct moed_config *c)
{
    for (size_t i = 0; i < MOE_ARRAY_SIZE(keys); i++)
        if (keys[i].kind == K_STR)
            free(*(char **)((char *)c + keys[i].off));
    for (int i = 0; i < c->n_models; i++) {
        free(c->models[i].name);
        free(c->models[i].dir);
    }
    for (int i = 0; i < c->n_peers; i++) {
        free(c->peers[i].name);
        free(c->peers[i].address);
    }
    free(c->config_path);
    memset(c, 0, sizeof(*c));
}

static int parse_bool(const char *v, bool *ret)
{
    static const char *const yes[] = {"1", "true", "yes", "on"}, *const no[] = {"0", "false", "no",
                                                                                "off"};

    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(v, yes[i]) == 0) {
            *ret = true;
            return 0;
        }
        if (strcasecmp(v, no[i]) == 0) {
            *ret = false;
            return 0;
        }
    }
    return -EINVAL;
}

static int add_model(struct moed_config *c, const char *name, const char *dir, const char *where,
                     struct moe_error *err)
{
    char *base;

    if (!dir || !*dir)
        return moe_error_set(err, -EINVAL, "%s: model '%s': expected a directory", where,
                             name ? name : "");
    if (c->n_models == MOED_MAX_MODELS)
        return moe_error_set(err, -E2BIG, "%s: more than %d models", where, MOED_MAX_MODELS);
    if (!name || !*name) {
        /* the directory's name, without trailing slashes */
        char *d = strdup(dir);
        size_t n = strlen(d);

        while (n > 1 && d[n - 1] == '/')
            d[--n] = 0;
        base = strrchr(d, '/');
        name = base ? base + 1 : d;
        c->models[c->n_models].name = strdup(name);
        free(d);
    } else {
        c->models[c->n_models].name = strdup(name);
    }
    for (int i = 0; i < c->n_models; i++)
        if (strcmp(c->models[i].name, c->models[c->n_models].name) == 0) {
            int r =
                moe_error_set(err, -EINVAL, "%s: model name '%s' given twice (name them: NAME=DIR)",
                              where, c->models[i].name);

            free(c->models[c->n_models].name);
            c->models[c->n_models].name = NULL;
            return r;
        }
    c->models[c->n_models].dir = strdup(dir);
    c->models[c->n_models].precision = -1;
    c->n_models++;
    return 0;
}

/* [models] NAME.compute_precision = exact|bf16, for a model named before. */
static int set_model_precision(struct moed_config *c, const char *key, const char *v,
                               const char *where, struct moe_error *err)
{
    size_t len = strlen(key) - strlen(".compute_precision");
    enum moe_compute_precision p;

    if (moe_precision_parse(v, &p) < 0)
        return moe_error_set(err, -EINVAL, "%s: %s = '%s': expected exact or bf16", where, key,
                             v);
    for (int i = 0; i < c->n_models; i++)
        if (strlen(c->models[i].name) == len && !strncmp(c->models[i].name, key, len)) {
            c->models[i].precision = (int)p;
            return 0;
        }
    return moe_error_set(err, -EINVAL, "%s: %s: no model called '%.*s' above it (name it first: "
                         "%.*s = DIR)", where, key, (int)len, key, (int)len, key);
}

int moed_config_model_precision(const struct moed_config *c, int i)
{
    return c->models[i].precision >= 0 ? c->models[i].precision : c->compute_precision;
}

/* Sets key from its text; where names the file and line or the flag. */
static int set_key(struct moed_config *c, const struct key *k, const char *v, const char *where,
                   struct moe_error *err)
{
    void *p = (char *)c + k->off;
    char *end;
    long l;
    double d;
    int r;

    switch (k->kind) {
    case K_STR:
        free(*(char **)p);
        *(char **)p = *v ? strdup(v) : NULL;
        return 0;
    case K_BYTES:
        r = moe_parse_bytes(v, (uint64_t *)p, err);
        if (r < 0)
            moe_error_prefix(err, "%s: %s", where, k->name);
        return r;
    case K_BOOL:
        if (parse_bool(v, (bool *)p) < 0)
            return moe_error_set(err, -EINVAL, "%s: %s = '%s': expected true or false", where,
                                 k->name, v);
        return 0;
    case K_INT:
    case K_U64:
        errno = 0;
        l = strtol(v, &end, 10);
        if (errno || end == v || *end || l < k->min || l > k->max)
            return moe_error_set(err, -EINVAL, "%s: %s = '%s': expected an integer from %ld to %ld",
                                 where, k->name, v, k->min, k->max);
        if (k->kind == K_INT)
            *(int *)p = (int)l;
        else
            *(uint64_t *)p = (uint64_t)l;
        return 0;
    case K_DOUBLE:
        errno = 0;
        d = strtod(v, &end);
        if (errno || end == v || *end || !(d > 0) || d > 1e9)
            return moe_error_set(err, -EINVAL, "%s: %s = '%s': expected a positive number", where,
                                 k->name, v);
        *(double *)p = d;
        return 0;
    case K_LEVEL:
        if (moe_log_level_parse(v, (enum moe_log_level *)p) < 0)
            return moe_error_set(err, -EINVAL, "%s: %s = '%s': expected error, warn, info or debug",
                                 where, k->name, v);
        return 0;
    case K_LOG_FORMAT:
        if (moed_log_format_parse(v, (enum moed_log_format *)p) < 0)
            return moe_error_set(err, -EINVAL, "%s: %s = '%s': expected text or json", where,
                                 k->name, v);
        return 0;
    case K_POLICY:
        if (moe_cache_policy_parse(v, (enum moe_cache_policy *)p) < 0)
            return moe_error_set(err, -EINVAL,
                                 "%s: %s = '%s': expected lru, freq, routing or adaptive", where,
                                 k->name, v);
        return 0;
    case K_PRECISION: {
        enum moe_compute_precision cp;

        if (moe_precision_parse(v, &cp) < 0)
            return moe_error_set(err, -EINVAL, "%s: %s = '%s': expected exact or bf16", where,
                                 k->name, v);
        *(int *)p = (int)cp;
        return 0;
    }
    }
    return -EINVAL;
}

int moed_config_add_peer(struct moed_config *c, const char *spec, const char *where,
                         struct moe_error *err)
{
    char name[128], addr[256], extra[2];
    const char *colon;
    char *end;
    long port;

    if (!spec || sscanf(spec, "%127s %255s %1s", name, addr, extra) != 2)
        return moe_error_set(err, -EINVAL, "%s: peer '%s': expected NAME HOST:PORT", where,
                             spec ? spec : "");
    colon = strrchr(addr, ':');
    port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || colon == addr || *end || end == colon + 1 || port < 1 || port > 65535)
        return moe_error_set(err, -EINVAL, "%s: peer %s: address '%s': expected HOST:PORT", where,
                             name, addr);
    if (c->n_peers == MOED_MAX_PEERS)
        return moe_error_set(err, -E2BIG, "%s: more than %d peers", where, MOED_MAX_PEERS);
    for (int i = 0; i < c->n_peers; i++)
        if (strcmp(c->peers[i].name, name) == 0)
            return moe_error_set(err, -EINVAL, "%s: peer %s is named twice", where, name);
    c->peers[c->n_peers].name = strdup(name);
    c->peers[c->n_peers].address = strdup(addr);
    c->n_peers++;
    return 0;
}

struct ini_ctx {
    struct moed_config *c;
    const char *fname;
    /* The reader's place in the text: the next byte, and the number of the
     * line inih was handed last (1-based). */
    const char *next;
    int line;
    bool have_key; /* a key was read in this section: indented lines continue it */
    struct moe_error err; /* the first error, with its place */
    int r;
    /* --check-config: every error, not only the first (NULL: stop at the
     * first), and the line of each key and model set from the file. */
    struct moed_config_check *check;
};

/* Keeps an error of the file at the current line: the first one in x->err,
 * every one in x->check.  Returns x->r. */
static int ini_fail(struct ini_ctx *x, int r, const struct moe_error *e)
{
    if (x->check)
        moed_config_check_add(x->check, "%s:%d: %s", x->fname, x->line, e->msg);
    if (x->r == 0) {
        moe_error_set(&x->err, r, "%s:%d: %s", x->fname, x->line, e->msg);
        x->r = r;
    }
    return x->r;
}

/* Keeps a line inih will not parse as an error, as inih reads it (Debian's
 * build: ';' and '#' comments, multi-line values, '=' or ':'), so that
 * every such line is reported, not only the first error of the file. */
static void ini_syntax(struct ini_ctx *x, const char *line, size_t n)
{
    size_t i = 0;
    struct moe_error e;

    while (n && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
        n--;
    if (x->line == 1 && n >= 3 && memcmp(line, "\xEF\xBB\xBF", 3) == 0) {
        line += 3; /* a UTF-8 byte order mark, skipped by inih too */
        n -= 3;
    }
    while (i < n && (line[i] == ' ' || line[i] == '\t'))
        i++;
    if (i == n || line[i] == ';' || line[i] == '#')
        return;
    if (i > 0 && x->have_key)
        return; /* a value continued */
    if (line[i] == '[') {
        x->have_key = false;
        if (memchr(line + i, ']', n - i))
            return;
        moe_error_set(&e, -EINVAL, "not a section header (expected [section])");
    } else if (memchr(line + i, '=', n - i) || memchr(line + i, ':', n - i)) {
        x->have_key = true;
        return;
    } else {
        moe_error_set(&e, -EINVAL, "not an INI line (expected key = value or [section])");
    }
    ini_fail(x, -EINVAL, &e);
}

/* The line-counting reader behind ini_parse_stream: fgets over the text,
 * one line per call, so that inih's line numbers are the file's.  A line
 * longer than inih's buffer is an error (its value would be cut). */
static char *ini_read(char *str, int num, void *stream)
{
    struct ini_ctx *x = stream;
    size_t n = strcspn(x->next, "\n"), take = n;

    if (!*x->next || num < 2)
        return NULL;
    x->line++;
    if (n > (size_t)num - 2) {
        struct moe_error e;

        moe_error_set(&e, -EINVAL, "line longer than %d characters", num - 2);
        ini_fail(x, -EINVAL, &e);
        take = (size_t)num - 2;
    }
    ini_syntax(x, x->next, n);
    memcpy(str, x->next, take);
    str[take] = '\n';
    str[take + 1] = 0;
    x->next += n + (x->next[n] == '\n');
    return str;
}

/* inih (Debian's build passes no line number: the reader counts lines). */
static int on_ini(void *user, const char *section, const char *name, const char *value)
{
    struct ini_ctx *x = user;
    struct moe_error e = {0};
    int r;

    if (x->r < 0 && !x->check)
        return 0; /* keep the first error */
    if (strcmp(section, "models") == 0 && strlen(name) > strlen(".compute_precision") &&
        !strcmp(name + strlen(name) - strlen(".compute_precision"), ".compute_precision")) {
        r = set_model_precision(x->c, name, value, "[models]", &e);
    } else if (strcmp(section, "models") == 0) {
        r = add_model(x->c, name, value, "[models]", &e);
        if (r == 0 && x->check && x->c->n_models <= MOED_MAX_MODELS)
            x->check->model_line[x->c->n_models - 1] = x->line;
    } else if (strcmp(section, "cluster") == 0 && strcmp(name, "peer") == 0) {
        r = moed_config_add_peer(x->c, value, "[cluster] peer", &e);
    } else {
        size_t i;

        for (i = 0; i < MOE_ARRAY_SIZE(keys); i++)
            if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].name, name) == 0)
                break;
        if (i < MOE_ARRAY_SIZE(keys)) {
            r = set_key(x->c, &keys[i], value, section, &e);
            if (r == 0 && x->check)
                x->check->key_line[i] = x->line;
        } else {
            for (i = 0; i < MOE_ARRAY_SIZE(keys); i++)
                if (strcmp(keys[i].name, name) == 0)
                    break;
            if (i < MOE_ARRAY_SIZE(keys))
                r = moe_error_set(&e, -EINVAL, "key '%s' belongs in section [%s], not [%s]", name,
                                  keys[i].section, section);
            else
                r = moe_error_set(&e, -EINVAL,
                                  "unknown key '%s' in section [%s] (see moed --help for the keys)",
                                  name, section);
        }
    }
    if (r < 0)
        ini_fail(x, r, &e);
    return r == 0;
}

/* moed_config_parse, keeping every error in check when it is not NULL. */
static int parse_text(struct moed_config *c, const char *text, const char *fname,
                      struct moed_config_check *check, struct moe_error *err)
{
    struct ini_ctx x = {.c = c, .fname = fname, .next = text, .check = check};
    int r = ini_parse_stream(ini_read, &x, on_ini, &x);

    if (r < 0)
        return moe_error_set(err, -ENOMEM, "%s: out of memory", fname);
    /* A line inih could not parse that ini_syntax let through. */
    if (r > 0 && x.r == 0) {
        struct moe_error e;

        moe_error_set(&e, -EINVAL, "not an INI line (expected key = value or [section])");
        x.line = r;
        ini_fail(&x, -EINVAL, &e);
    }
    if (x.r < 0) {
        *err = x.err;
        return x.r;
    }
    return 0;
}

int moed_config_parse(struct moed_config *c, const char *text, const char *fname,
                      struct moe_error *err)
{
    return parse_text(c, text, fname, NULL, err);
}

static int read_file(struct moed_config *c, const char *path, struct moed_config_check *check,
                     struct moe_error *err)
{
    char *text;
    size_t len;
    int r = moe_read_file(path, 1 << 20, &text, &len, err);

    if (r < 0) {
        moe_error_prefix(err, "--config");
        return r;
    }
    if (memchr(text, 0, len)) {
        free(text);
        return moe_error_set(err, -EINVAL, "%s: a NUL byte: not a text file", path);
    }
    r = parse_text(c, text, path, check, err);
    free(text);
    return r;
}

/* The value a key's flag takes, for --help and the man page. */
static const char *arg_name(const struct key *k)
{
    static const struct {
        const char *name, *arg;
    } strs[] = {
        {"listen", "HOST:PORT"},      {"metrics", "HOST:PORT"},  {"socket", "PATH"},
        {"shm_socket", "PATH"},       {"token", "TOKEN"},        {"tls_cert", "FILE"},
        {"tls_key", "FILE"},          {"tls_client_ca", "FILE"}, {"shm_allow_users", "LIST"},
        {"shm_allow_groups", "LIST"}, {"gpus", "LIST"},          {"kernel", "NAME"},
        {"node_name", "NAME"},        {"model_dirs", "LIST"},
        {"state_dir", "PATH"},
    };

    switch (k->kind) {
    case K_BYTES:
        return "SIZE";
    case K_BOOL:
        return "BOOL";
    case K_INT:
    case K_U64:
        return "N";
    case K_DOUBLE:
        return "X";
    case K_LEVEL:
        return "LEVEL";
    case K_POLICY:
        return "POLICY";
    case K_LOG_FORMAT:
        return "FORMAT";
    case K_PRECISION:
        return "exact|bf16";
    case K_STR:
        break;
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(strs); i++)
        if (strcmp(strs[i].name, k->name) == 0)
            return strs[i].arg;
    return "VALUE";
}

/* One option of --help: the option in a column of 28, its description
 * wrapped at 79 columns under itself (on the next line when the option is
 * wider than its column). */
static void usage_opt(FILE *f, const char *opt, const char *desc)
{
    enum { COL = 30, WIDTH = 79 };
    int col = fprintf(f, "  %s", opt);

    while (*desc) {
        int n = (int)strlen(desc), take = n;

        if (col >= COL) {
            fputc('\n', f);
            col = 0;
        }
        fprintf(f, "%*s", COL - col, "");
        if (n > WIDTH - COL) {
            take = WIDTH - COL;
            while (take > 0 && desc[take] != ' ')
                take--;
            if (take == 0)
                take = WIDTH - COL;
        }
        fprintf(f, "%.*s\n", take, desc);
        col = 0;
        desc += take;
        while (*desc == ' ')
            desc++;
    }
    if (col)
        fputc('\n', f);
}

void moed_usage(FILE *f)
{
    const char *section = NULL;

    fprintf(f, "usage: moed [--config FILE] [--model [NAME=]DIR]... [--KEY VALUE]...\n"
               "       moed --check-config FILE [--KEY VALUE]...\n"
               "\n"
               "moed serves the expert layers of Mixture-of-Experts models over gRPC\n"
               "(moe.v1.Experts, moe.v1.Control, grpc.health.v1.Health) and shared memory.\n"
               "Every key of the configuration file is also a flag (--host-cache-bytes 8G);\n"
               "flags win.  SIZE takes K, M, G, T (powers of 1024), BOOL true or false.\n"
               "\n"
               "Options:\n");
    usage_opt(f, "--config FILE", "read the INI file FILE (see moed.conf(5)), then the flags");
    usage_opt(f, "--check-config FILE",
              "check FILE and the flags without starting anything: every key, the settings "
              "that go together, each model directory, the TLS files; print \"FILE: OK\" and "
              "exit 0, or each error (FILE:LINE: ...) and exit 1");
    usage_opt(f, "--model [NAME=]DIR",
              "a checkpoint or packed store to serve (repeatable; the name defaults to the "
              "directory's name)");
    usage_opt(f, "--peer \"NAME HOST:PORT\"",
              "another node of this cluster (repeatable; [cluster] peer = NAME HOST:PORT)");
    usage_opt(f, "-h, --help", "print this help and exit");
    usage_opt(f, "--version", "print the version and exit");
    for (size_t i = 0; i < MOE_ARRAY_SIZE(keys); i++) {
        char flag[96];
        int n;

        if (!section || strcmp(section, keys[i].section) != 0) {
            section = keys[i].section;
            fprintf(f, "\n[%s] keys, also flags:\n", section);
        }
        n = snprintf(flag, sizeof(flag), "--%s", keys[i].name);
        for (char *p = flag; *p; p++)
            if (*p == '_')
                *p = '-';
        snprintf(flag + n, sizeof(flag) - (size_t)n, " %s", arg_name(&keys[i]));
        usage_opt(f, flag, keys[i].help);
    }
    fprintf(f,
            "\n"
            "Signals: SIGTERM and SIGINT stop (requests in flight finish), SIGHUP re-reads\n"
            "the file's log level and format, cache capacity, policy and prefetch.  With\n"
            "NOTIFY_SOCKET set (systemd Type=notify) moed reports READY, STATUS, WATCHDOG\n"
            "and STOPPING.  Logs go to stderr; under the systemd journal without timestamps.\n"
            "See moed(8) and moed.conf(5).\n");
}

static const struct key *flag_key(const char *flag)
{
    char name[64];

    if (strncmp(flag, "--", 2) != 0 || strlen(flag) >= sizeof(name) + 2)
        return NULL;
    snprintf(name, sizeof(name), "%s", flag + 2);
    for (char *p = name; *p; p++)
        if (*p == '-')
            *p = '_';
    for (size_t i = 0; i < MOE_ARRAY_SIZE(keys); i++)
        if (strcmp(keys[i].name, name) == 0)
            return &keys[i];
    return NULL;
}

/* Applies the flags (not --config) to c. */
static int apply_flags(struct moed_config *c, int argc, char **argv, struct moe_error *err)
{
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        const struct key *k;
        char where[96];

        if (strcmp(a, "--config") == 0 || strcmp(a, "--check-config") == 0) {
            i++;
            continue;
        }
        if (strcmp(a, "--peer") == 0) {
            int r = moed_config_add_peer(c, v, "--peer", err);

            if (r < 0)
                return r;
            i++;
            continue;
        }
        if (strcmp(a, "--model") == 0) {
            const char *eq;
            char name[256];
            int r;

            if (!v)
                return moe_error_set(err, -EINVAL, "--model: expected [NAME=]DIR");
            eq = strchr(v, '=');
            if (eq && (size_t)(eq - v) < sizeof(name)) {
                snprintf(name, sizeof(name), "%.*s", (int)(eq - v), v);
                r = add_model(c, name, eq + 1, "--model", err);
            } else {
                r = add_model(c, NULL, v, "--model", err);
            }
            if (r < 0)
                return r;
            i++;
            continue;
        }
        k = flag_key(a);
        if (!k)
            return moe_error_set(err, -EINVAL, "unknown option '%s' (see moed --help)", a);
        if (!v)
            return moe_error_set(err, -EINVAL, "%s: expected a value", a);
        snprintf(where, sizeof(where), "flag %s", a);
        if (set_key(c, k, v, where, err) < 0)
            return -EINVAL;
        i++;
    }
    return 0;
}

/* The settings that go together, once the file and the flags are read:
 * the first error in err, every one in check when it is not NULL. */
static int validate(struct moed_config *c, struct moed_config_check *check, struct moe_error *err)
{
    int r = 0;

    if (c->listen && strcmp(c->listen, "none") == 0) {
        free(c->listen);
        c->listen = NULL;
    }
    if (!c->listen && !c->socket) {
        r = moe_error_set(err, -EINVAL, "nothing to listen on: give --listen or --socket");
        if (!check)
            return r;
        moed_config_check_add(check, "%s", err->msg);
    }
    if (!c->tls_cert != !c->tls_key) {
        r = moe_error_set(err, -EINVAL, "tls_cert and tls_key go together");
        if (check)
            moed_config_check_add(check, "%s", err->msg);
    }
    return r;
}

int moed_config_load(struct moed_config *c, int argc, char **argv, struct moe_error *err)
{
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            moed_usage(stdout);
            return 1;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("moed %s\n", MOED_VERSION);
            return 1;
        }
        if (strcmp(argv[i], "--config") == 0) {
            if (i + 1 >= argc)
                return moe_error_set(err, -EINVAL, "--config: expected a file");
            free(c->config_path);
            c->config_path = strdup(argv[i + 1]);
        }
    }
    if (c->config_path && read_file(c, c->config_path, NULL, err) < 0)
        return -EINVAL;
    if (apply_flags(c, argc, argv, err) < 0)
        return -EINVAL;
    return validate(c, NULL, err);
}

int moed_config_reload(const struct moed_config *start, int argc, char **argv,
                       struct moed_config *ret, struct moe_error *err)
{
    moed_config_init(ret);
    if (start->config_path) {
        ret->config_path = strdup(start->config_path);
        if (read_file(ret, start->config_path, NULL, err) < 0)
            return -EINVAL;
    }
    /* Flags given at start still win; models named again are not new. */
    for (int i = 0; i < ret->n_models; i++) {
        free(ret->models[i].name);
        free(ret->models[i].dir);
    }
    ret->n_models = 0;
    /* Peers change at run time through AddPeer and RemovePeer, not SIGHUP. */
    for (int i = 0; i < ret->n_peers; i++) {
        free(ret->peers[i].name);
        free(ret->peers[i].address);
    }
    ret->n_peers = 0;
    return apply_flags(ret, argc, argv, err);
}

/* ---- moed --check-config ---------------------------------------------------------------- */

_Static_assert(MOE_ARRAY_SIZE(keys) <= MOED_CONFIG_KEYS, "raise MOED_CONFIG_KEYS");

void moed_config_check_add(struct moed_config_check *k, const char *fmt, ...)
{
    va_list ap;
    char *msg;

    if (k->n == MOED_CHECK_MAX_ERRORS) {
        k->dropped++;
        return;
    }
    va_start(ap, fmt);
    if (vasprintf(&msg, fmt, ap) < 0)
        msg = NULL;
    va_end(ap);
    if (msg)
        k->errors[k->n++] = msg;
    else
        k->dropped++;
}

void moed_config_check_clear(struct moed_config_check *k)
{
    for (int i = 0; i < k->n; i++)
        free(k->errors[i]);
    memset(k, 0, sizeof(*k));
}

/* Where a key's value came from: "FILE:LINE: [section] " or "flag --key-name: ". */
static void key_where(const struct moed_config_check *k, const char *path, size_t i, char *buf,
                      size_t len)
{
    if (k->key_line[i]) {
        snprintf(buf, len, "%s:%d: [%s] ", path, k->key_line[i], keys[i].section);
        return;
    }
    snprintf(buf, len, "flag --%s: ", keys[i].name);
    for (char *p = buf + 7; *p && *p != ':'; p++)
        if (*p == '_')
            *p = '-';
}

int moed_config_check(const char *path, int argc, char **argv, struct moed_config_check *k)
{
    struct moed_config c;
    struct moe_error err = {0};

    memset(k, 0, sizeof(*k));
    moed_config_init(&c);
    c.config_path = strdup(path);
    if (read_file(&c, path, k, &err) < 0 && k->n == 0)
        moed_config_check_add(k, "%s", err.msg); /* unreadable: no line to name */
    if (apply_flags(&c, argc, argv, &err) < 0)
        moed_config_check_add(k, "%s", err.msg);
    validate(&c, k, &err);
    /* Files the daemon opens at start. */
    for (size_t i = 0; i < MOE_ARRAY_SIZE(keys); i++) {
        const char *v;
        char where[256];

        if (keys[i].off != OFF(tls_cert) && keys[i].off != OFF(tls_key) &&
            keys[i].off != OFF(tls_client_ca))
            continue;
        v = *(char **)((char *)&c + keys[i].off);
        if (!v || access(v, R_OK) == 0)
            continue;
        key_where(k, path, i, where, sizeof(where));
        moed_config_check_add(k, "%s%s = '%s': cannot read it (%s): expected a PEM file", where,
                              keys[i].name, v, strerror(errno));
    }
    /* Each model opens: its config.json, index and shard headers, or its
     * packed store's moe-pack.json; no expert is read. */
    for (int i = 0; i < c.n_models; i++) {
        struct moe_model *m = NULL;

        if (moe_model_open(c.models[i].dir, &m, &err) < 0) {
            if (k->model_line[i])
                moed_config_check_add(k, "%s:%d: [models] %s = %s: %s; expected a checkpoint "
                                      "(config.json, *.safetensors) or a packed store",
                                      path, k->model_line[i], c.models[i].name, c.models[i].dir,
                                      err.msg);
            else
                moed_config_check_add(k, "--model %s=%s: %s; expected a checkpoint "
                                      "(config.json, *.safetensors) or a packed store",
                                      c.models[i].name, c.models[i].dir, err.msg);
        }
        moe_model_free(m);
    }
    moed_config_clear(&c);
    return k->n + k->dropped;
}
