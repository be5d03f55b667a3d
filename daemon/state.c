/*
 * moed's state directory (state_dir): each model's expert heat, saved when
 * the model goes (stop, UnloadModel) and read when it comes (start,
 * LoadModel) to page its hottest experts in before the first request (a
 * warm start); and live routing recordings (Control RecordRouting), traces
 * that `moectl cache-sim` replays.
 *
 * Layout: STATE_DIR/heat/MODEL.heat (engine/heat.h), STATE_DIR/traces/NAME.
 * A model's name is used in a file name with every byte other than a letter,
 * digit, '-' or '_' (and a leading '.') written as %XX.
 */
#include "moed.h"

#include "heat.h"
#include "log.h"
#include "moe.pb-c.h"
#include "trace.h"

#include <errno.h>
#include <grpc/status.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define WARM_SHARE 0.9                 /* of each tier, what a warm start may fill */
#define RECORD_DEFAULT_MAX 10000000ull /* records of a recording, by default */
#define RECORD_NAME_MAX 128

struct moed_recording {
    struct moe_trace_writer *w;
    char *path;
    uint64_t t0;
};

static int make_dir(const char *path, struct moe_error *err)
{
    struct stat st;

    if (mkdir(path, 0750) == 0)
        return 0;
    if (errno != EEXIST)
        return moe_error_set(err, -errno, "state_dir: cannot make %s: %s", path, strerror(errno));
    if (stat(path, &st) < 0)
        return moe_error_set(err, -errno, "state_dir: %s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return moe_error_set(err, -ENOTDIR, "state_dir: %s is not a directory", path);
    return 0;
}

int moed_state_init(struct moed *d, struct moe_error *err)
{
    const char *dir = d->cfg.state_dir, *env = getenv("STATE_DIRECTORY");
    char sub[PATH_MAX], buf[PATH_MAX];
    int r;

    d->model_came = moed_state_warm;
    d->model_gone = moed_state_model_gone;
    d->state_dir = NULL;
    if ((!dir || !*dir) && env && *env) {
        /* systemd's StateDirectory=: a colon-separated list; the first. */
        size_t n = strcspn(env, ":");

        if (n >= sizeof(buf))
            return moe_error_set(err, -ENAMETOOLONG, "STATE_DIRECTORY is too long");
        memcpy(buf, env, n);
        buf[n] = '\0';
        dir = buf;
    }
    if (!dir || !*dir || strcmp(dir, "none") == 0) {
        moe_log(MOE_LOG_DEBUG, "no state_dir: no warm start, no routing recordings");
        return 0;
    }
    if (dir[0] != '/')
        return moe_error_set(err, -EINVAL, "state_dir '%s' is not an absolute path", dir);
    if (strlen(dir) + 16 >= sizeof(sub))
        return moe_error_set(err, -ENAMETOOLONG, "state_dir '%s' is too long", dir);
    r = make_dir(dir, err);
    if (r < 0)
        return r;
    snprintf(sub, sizeof(sub), "%s/heat", dir);
    r = make_dir(sub, err);
    if (r < 0)
        return r;
    snprintf(sub, sizeof(sub), "%s/traces", dir);
    r = make_dir(sub, err);
    if (r < 0)
        return r;
    d->state_dir = strdup(dir);
    if (!d->state_dir)
        return moe_error_set(err, -ENOMEM, "out of memory");
    moe_log(MOE_LOG_INFO, "state in %s (warm start %s)", d->state_dir,
            d->cfg.warm_start ? "on" : "off");
    return 0;
}

void moed_state_clear(struct moed *d)
{
    free(d->state_dir);
    d->state_dir = NULL;
}

/* STATE_DIR/heat/NAME.heat, the name escaped; false when too long. */
static bool heat_path(const struct moed *d, const char *name, char *buf, size_t size)
{
    size_t n = (size_t)snprintf(buf, size, "%s/heat/", d->state_dir);

    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        bool plain = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                     (*p >= '0' && *p <= '9') || *p == '-' || *p == '_' ||
                     (*p == '.' && p != (const unsigned char *)name);

        if (n + 4 >= size)
            return false;
        n += (size_t)snprintf(buf + n, size - n, plain ? "%c" : "%%%02X", *p);
    }
    return n + 6 < size && snprintf(buf + n, size - n, ".heat") == 5;
}

void moed_state_warm(struct moed *d, struct moed_model *mm)
{
    const struct moe_model_config *c = &mm->m->cfg;
    char path[PATH_MAX];
    struct moe_error err;
    double *heat;
    int r;

    if (!d->state_dir || !d->cfg.warm_start)
        return;
    if (!heat_path(d, mm->name, path, sizeof(path))) {
        moe_log(MOE_LOG_WARN, "warm start of %s skipped: its heat file's path is too long",
                mm->name);
        return;
    }
    heat = malloc((size_t)c->n_layers * (size_t)c->n_experts * sizeof(*heat));
    if (!heat) {
        moe_log(MOE_LOG_WARN, "warm start of %s skipped: out of memory", mm->name);
        return;
    }
    r = moe_heat_read(path, c->n_layers, c->n_experts, heat, &err);
    if (r == -ENOENT)
        moe_log(MOE_LOG_DEBUG, "warm start of %s: no heat saved yet (%s)", mm->name, path);
    else if (r < 0)
        moe_log(MOE_LOG_WARN, "warm start of %s skipped: %s", mm->name, err.msg);
    else if ((r = moe_cache_warm(d->cache, mm->cache_id, heat, WARM_SHARE, &err)) < 0)
        moe_log(MOE_LOG_WARN, "warm start of %s failed: %s", mm->name, err.msg);
    else
        moe_log(MOE_LOG_INFO, "warm start of %s: paging in the %d experts hottest at its last stop",
                mm->name, r);
    free(heat);
}

static void save_heat(struct moed *d, struct moed_model *mm)
{
    const struct moe_model_config *c = &mm->m->cfg;
    char path[PATH_MAX];
    struct moe_error err;
    double *heat;

    /* A run that served nothing (a failed start) leaves the last heat be. */
    if (!d->state_dir || !d->cfg.warm_start ||
        atomic_load_explicit(&mm->token_rows, memory_order_relaxed) == 0)
        return;
    if (!heat_path(d, mm->name, path, sizeof(path))) {
        moe_log(MOE_LOG_WARN, "%s: heat not saved: its file's path is too long", mm->name);
        return;
    }
    heat = malloc((size_t)c->n_layers * (size_t)c->n_experts * sizeof(*heat));
    if (!heat) {
        moe_log(MOE_LOG_WARN, "%s: heat not saved: out of memory", mm->name);
        return;
    }
    if (moe_cache_heat(d->cache, mm->cache_id, heat, &err) < 0 ||
        moe_heat_write(path, c->n_layers, c->n_experts, heat, &err) < 0)
        moe_log(MOE_LOG_WARN, "%s: heat not saved: %s", mm->name, err.msg);
    else
        moe_log(MOE_LOG_INFO, "%s: expert heat saved to %s", mm->name, path);
    free(heat);
}

/* Stops mm's recording (d->rec_lock held); fills r (may be NULL). */
static int record_stop_locked(struct moed_model *mm, Moe__V1__RecordRoutingResponse *resp,
                              struct moe_error *err)
{
    struct moed_recording *rec = mm->rec;
    bool full = false;
    uint64_t n;
    int r;

    moe_engine_set_trace(mm->e, NULL); /* no forward writes to it after this */
    n = moe_trace_writer_records(rec->w, &full, NULL);
    r = moe_trace_writer_close(rec->w, err);
    if (resp) {
        resp->recording = false;
        resp->path = rec->path; /* the caller frees it after answering */
        resp->records = n;
        resp->duration_ns = moe_now_ns() - rec->t0;
        resp->full = full;
    }
    moe_log(r < 0 ? MOE_LOG_WARN : MOE_LOG_INFO,
            "%s: routing recording %s stopped: %llu records%s%s%s", mm->name, rec->path,
            (unsigned long long)n, full ? " (full)" : "", r < 0 ? ": " : "", r < 0 ? err->msg : "");
    if (!resp)
        free(rec->path);
    free(rec);
    mm->rec = NULL;
    return r;
}

void moed_state_model_gone(struct moed *d, struct moed_model *mm)
{
    save_heat(d, mm);
    pthread_mutex_lock(&d->rec_lock);
    if (mm->rec)
        record_stop_locked(mm, NULL, NULL);
    pthread_mutex_unlock(&d->rec_lock);
}

/* A trace file name: letters, digits, '.', '_', '-', not starting with '.'. */
static bool name_ok(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > RECORD_NAME_MAX || s[0] == '.')
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
              (s[i] >= '0' && s[i] <= '9') || s[i] == '.' || s[i] == '_' || s[i] == '-'))
            return false;
    return true;
}

static int record_start_locked(struct moed *d, struct moed_model *mm, const char *name,
                               uint64_t max_records, Moe__V1__RecordRoutingResponse *resp,
                               int *status, struct moe_error *err)
{
    char gen[RECORD_NAME_MAX + 64], path[PATH_MAX];
    struct moe_trace_info ti;
    struct moed_recording *rec;
    struct stat st;
    int r;

    if (mm->rec) {
        *status = GRPC_STATUS_FAILED_PRECONDITION;
        return moe_error_set(err, -EBUSY, "%s is being recorded to %s already: stop that first",
                             mm->name, mm->rec->path);
    }
    if (!name || !*name) {
        struct tm tm;
        time_t now = time(NULL);
        size_t n = 0;

        gmtime_r(&now, &tm);
        /* The model's name, kept to the letters a trace name may have. */
        for (const char *p = mm->name; *p && n < 64; p++) {
            bool plain = name_ok((char[]){*p, 0}) || (*p == '.' && n > 0);

            gen[n++] = plain ? *p : '_';
        }
        strftime(gen + n, sizeof(gen) - n, "-%Y%m%d-%H%M%S.trace", &tm);
        name = gen;
    }
    if (!name_ok(name)) {
        *status = GRPC_STATUS_INVALID_ARGUMENT;
        return moe_error_set(err, -EINVAL,
                             "trace name '%.*s' is not a plain file name (letters, digits, '.', "
                             "'_', '-', not starting with '.', at most %d bytes)",
                             RECORD_NAME_MAX, name, RECORD_NAME_MAX);
    }
    snprintf(path, sizeof(path), "%s/traces/%s", d->state_dir, name);
    if (lstat(path, &st) == 0) {
        *status = GRPC_STATUS_ALREADY_EXISTS;
        return moe_error_set(err, -EEXIST, "%s exists: name another trace, or remove it", path);
    }
    moe_trace_info_from_model(mm->m, mm->name, &ti);
    ti.lookahead = true;
    rec = calloc(1, sizeof(*rec));
    if (!rec || !(rec->path = strdup(path))) {
        free(rec);
        *status = GRPC_STATUS_RESOURCE_EXHAUSTED;
        return moe_error_set(err, -ENOMEM, "out of memory");
    }
    r = moe_trace_writer_open(path, &ti, &rec->w, err);
    if (r < 0) {
        free(rec->path);
        free(rec);
        *status = moed_grpc_status(r);
        return r;
    }
    moe_trace_writer_set_limit(rec->w, max_records ? max_records : RECORD_DEFAULT_MAX);
    rec->t0 = moe_now_ns();
    mm->rec = rec;
    moe_engine_set_trace(mm->e, rec->w);
    resp->recording = true;
    resp->path = rec->path;
    moe_log(MOE_LOG_INFO, "%s: recording its routing to %s (at most %llu records)", mm->name, path,
            (unsigned long long)(max_records ? max_records : RECORD_DEFAULT_MAX));
    return 0;
}

void moed_on_record_routing(struct moe_rpc_call *call, const uint8_t *req, size_t len, void *arg)
{
    struct moed *d = arg;
    Moe__V1__RecordRoutingRequest *q = moe__v1__record_routing_request__unpack(NULL, len, req);
    Moe__V1__RecordRoutingResponse resp = MOE__V1__RECORD_ROUTING_RESPONSE__INIT;
    struct moed_model *mm = NULL;
    struct moe_error err = {0};
    char *stopped = NULL;
    int status = GRPC_STATUS_OK, r = 0;

    if (!q || !q->model || !*q->model) {
        moe_rpc_fail(call, GRPC_STATUS_INVALID_ARGUMENT,
                     "the request is not a RecordRoutingRequest with a model");
        goto out;
    }
    mm = moed_model_get(d, q->model);
    if (!mm) {
        moe_rpc_fail(call, GRPC_STATUS_NOT_FOUND, "no model called '%s'", q->model);
        goto out;
    }
    pthread_mutex_lock(&d->rec_lock);
    switch (q->action) {
    case MOE__V1__RECORD_ROUTING_REQUEST__ACTION__START:
        if (!d->state_dir) {
            status = GRPC_STATUS_FAILED_PRECONDITION;
            r = moe_error_set(&err, -ENOENT,
                              "moed has no state directory to record to: set [server] state_dir "
                              "(systemd's StateDirectory= sets it)");
            break;
        }
        r = record_start_locked(d, mm, q->name, q->max_records, &resp, &status, &err);
        break;
    case MOE__V1__RECORD_ROUTING_REQUEST__ACTION__STOP:
        if (!mm->rec) {
            status = GRPC_STATUS_FAILED_PRECONDITION;
            r = moe_error_set(&err, -ENOENT, "%s is not being recorded", mm->name);
            break;
        }
        r = record_stop_locked(mm, &resp, &err);
        stopped = resp.path;
        if (r < 0)
            status = moed_grpc_status(r);
        break;
    case MOE__V1__RECORD_ROUTING_REQUEST__ACTION__STATUS:
        if (mm->rec) {
            bool full = false;

            resp.recording = true;
            resp.path = mm->rec->path;
            resp.records = moe_trace_writer_records(mm->rec->w, &full, NULL);
            resp.duration_ns = moe_now_ns() - mm->rec->t0;
            resp.full = full;
        }
        break;
    default:
        status = GRPC_STATUS_INVALID_ARGUMENT;
        r = moe_error_set(&err, -EINVAL, "unknown action %d", (int)q->action);
    }
    if (r < 0)
        moe_rpc_fail(call, status == GRPC_STATUS_OK ? moed_grpc_status(r) : status, "%s", err.msg);
    else
        moed_reply_msg(call, &resp.base);
    pthread_mutex_unlock(&d->rec_lock);
    free(stopped);
out:
    if (mm)
        moed_model_put(d, mm);
    if (q)
        moe__v1__record_routing_request__free_unpacked(q, NULL);
}
