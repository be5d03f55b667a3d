/*
 * moectl's remote commands: status, models, stats, load, unload, pin, unpin,
 * evict, retry, drain, placement, peer and forward (without --local) talk to a
 * running moed over gRPC (proto/rpc_client.h), with protobuf-c messages of
 * proto/moe.proto.
 *
 * Every remote command takes the remote options (REMOTE_OPTIONS) after its
 * name.  Output is for people by default; --json prints the daemon's answer
 * as JSON, field names as in moe.proto (64-bit integers as numbers, enums by
 * name, CacheCounters with a derived "hit_rate").
 *
 * Exit status: 0 done; 1 the call failed (the daemon cannot be reached, or
 * answered with an error: its status name and message are printed); 2 bad
 * usage.
 */
#include "moectl.h"

#include "common.h"
#include "dtype.h"
#include "npy.h"
#include "rpc_client.h"

#include "moe.pb-c.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEFAULT_ADDRESS "127.0.0.1:50051"
/* One call's tensors: above this the daemon would refuse them anyway (its
 * cap is 64 MiB by default); split the tokens into several calls. */
#define MAX_TENSOR_BYTES ((size_t)256 << 20)
#define MAX_TOKENS (1 << 20)
#define MAX_TIMEOUT_S 86400.0

/* ---- remote options ----------------------------------------------------- */

/* The option codes, REMOTE_OPTIONS and struct moectl_remote are in moectl.h,
 * shared with bench and top (moectl_bench.c). */

void moectl_remote_usage(FILE *f)
{
    fprintf(f,
            "remote options, after the command name (status, models, stats, load, unload,\n"
            "pin, unpin, evict, retry, drain, resume, placement, peer, forward without\n"
            "--local, bench, top):\n"
            "  --remote HOST:PORT   moed's address (default $MOED_ADDRESS, else %s)\n"
            "  --socket PATH        moed's Unix socket instead: its gRPC socket, or, for\n"
            "                       forward and bench, its shared-memory socket\n"
            "                       (shm_socket; moectl tells them apart), which they use\n"
            "                       through libmoe-client\n"
            "  --tls                use TLS; --tls-ca FILE: the roots to trust (default the\n"
            "                       system's); --tls-cert FILE --tls-key FILE: a client\n"
            "                       certificate\n"
            "  --token T            bearer token for the calls that change things (default\n"
            "                       $MOED_TOKEN)\n"
            "  --timeout SECONDS    per call (default 30)\n"
            "  --json               print the daemon's answer as JSON\n",
            DEFAULT_ADDRESS);
}

void remote_init(struct moectl_remote *r, const char *cmd)
{
    const char *env;

    memset(r, 0, sizeof(*r));
    r->cmd = cmd;
    env = getenv("MOED_ADDRESS");
    r->address = env && *env ? env : DEFAULT_ADDRESS;
    env = getenv("MOED_TOKEN");
    r->cfg.token = env && *env ? env : NULL;
}

/* Handles option c of REMOTE_OPTIONS: 1 when it was one, 0 when it is the
 * command's own, -1 on bad usage (printed). */
int remote_option(struct moectl_remote *r, int c, const char *arg)
{
    char *end;
    double s;

    switch (c) {
    case OPT_REMOTE:
        r->address = arg;
        return 1;
    case OPT_SOCKET:
        r->socket = arg;
        return 1;
    case OPT_TLS:
        r->cfg.tls = true;
        return 1;
    case OPT_TLS_CA:
        r->cfg.tls_ca = arg;
        return 1;
    case OPT_TLS_CERT:
        r->cfg.tls_cert = arg;
        return 1;
    case OPT_TLS_KEY:
        r->cfg.tls_key = arg;
        return 1;
    case OPT_TOKEN:
        r->cfg.token = *arg ? arg : NULL;
        return 1;
    case OPT_TIMEOUT:
        errno = 0;
        s = strtod(arg, &end);
        if (errno || end == arg || *end || !(s > 0) || s > MAX_TIMEOUT_S) {
            errorf("%s: --timeout '%s': expected seconds, more than 0 and at most %.0f", r->cmd,
                   arg, MAX_TIMEOUT_S);
            return -1;
        }
        r->cfg.timeout_ms = (int)ceil(s * 1000.0);
        r->timeout_set = true;
        return 1;
    case OPT_JSON:
        r->json = true;
        return 1;
    }
    return 0;
}

/* Checks the remote options together once parsing is done; -1 on bad usage. */
int remote_check(struct moectl_remote *r, bool remote_given)
{
    if (r->socket && remote_given) {
        errorf("%s: --remote and --socket name two daemons; give one", r->cmd);
        return -1;
    }
    if (!r->cfg.tls && (r->cfg.tls_ca || r->cfg.tls_cert || r->cfg.tls_key)) {
        errorf("%s: --tls-ca, --tls-cert and --tls-key need --tls", r->cmd);
        return -1;
    }
    if (!r->cfg.tls_cert != !r->cfg.tls_key) {
        errorf("%s: a client certificate needs both --tls-cert and --tls-key", r->cmd);
        return -1;
    }
    if (r->socket) {
        if (!*r->socket || strlen(r->socket) >= PATH_MAX) {
            errorf("%s: --socket '%s': expected a socket path", r->cmd, r->socket);
            return -1;
        }
        snprintf(r->target, sizeof(r->target), "unix:%s", r->socket);
        if (moectl_socket_is_shm(r->socket)) {
            if (!r->shm_ok) {
                errorf("%s: %s is moed's shared-memory socket (shm_socket), which serves "
                       "forward and bench only; give its gRPC socket (moed's socket key) or "
                       "--remote",
                       r->cmd, r->socket);
                return -1;
            }
            r->use_shm = true;
            snprintf(r->target, sizeof(r->target), "%s", r->socket);
        }
    } else if (strncmp(r->address, "unix:", 5) == 0 || strncmp(r->address, "dns:", 4) == 0 ||
               strncmp(r->address, "ipv4:", 5) == 0 || strncmp(r->address, "ipv6:", 5) == 0) {
        snprintf(r->target, sizeof(r->target), "%s", r->address);
    } else {
        const char *colon = strrchr(r->address, ':');
        char *end;
        long port;

        errno = 0;
        port = colon ? strtol(colon + 1, &end, 10) : 0;
        if (!colon || colon == r->address || errno || end == colon + 1 || *end || port < 1 ||
            port > 65535 || strlen(r->address) >= sizeof(r->target)) {
            errorf("%s: address '%s': expected HOST:PORT (as 127.0.0.1:50051) or unix:PATH", r->cmd,
                   r->address);
            return -1;
        }
        snprintf(r->target, sizeof(r->target), "%s", r->address);
    }
    r->cfg.target = r->target;
    return 0;
}

void remote_close(struct moectl_remote *r)
{
    moe_rpc_client_close(r->client);
    r->client = NULL;
}

/* What remote_call failed with: kept in r->last_error, and printed unless
 * r->quiet. */
static void call_error(struct moectl_remote *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void call_error(struct moectl_remote *r, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(r->last_error, sizeof(r->last_error), fmt, ap);
    va_end(ap);
    if (!r->quiet)
        errorf("%s", r->last_error);
}

/*
 * Calls method with req and decodes the answer as desc into *ret (free with
 * protobuf_c_message_free_unpacked).  Returns 0, or 1 (the exit status) after
 * printing what failed.
 */
int remote_call(struct moectl_remote *r, const char *method, const ProtobufCMessage *req,
                const ProtobufCMessageDescriptor *desc, ProtobufCMessage **ret)
{
    char msg[1024];
    uint8_t *buf = NULL, *resp = NULL;
    size_t len, resp_len;
    int status;

    r->last_status = -1;
    r->last_error[0] = 0;
    if (!r->client && moe_rpc_client_open(&r->cfg, &r->client, msg, sizeof(msg)) < 0) {
        call_error(r, "%s: cannot connect to moed at %s: %s", r->cmd, r->target, msg);
        return 1;
    }
    len = protobuf_c_message_get_packed_size(req);
    buf = malloc(len ? len : 1);
    if (!buf) {
        call_error(r, "%s: out of memory for a request of %zu bytes", r->cmd, len);
        return 1;
    }
    protobuf_c_message_pack(req, buf);
    status = moe_rpc_client_call(r->client, method, buf, len, &resp, &resp_len, msg, sizeof(msg));
    free(buf);
    r->last_status = status;
    switch (status) {
    case 0:
        break;
    case 14: /* UNAVAILABLE */
        /* moed's own answer while it drains or stops: it was reached. */
        if (strstr(msg, "moed is draining"))
            call_error(r,
                       "%s: moed at %s is draining and takes no new requests (moectl resume serves "
                       "again)",
                       r->cmd, r->target);
        else if (strstr(msg, "moed is stopping"))
            call_error(r, "%s: moed at %s is stopping and takes no new requests", r->cmd,
                       r->target);
        else
            call_error(r, "cannot reach moed at %s: %s", r->target, msg);
        return 1;
    case 4: /* DEADLINE_EXCEEDED */
        call_error(r,
                   "%s: no answer from moed at %s within %.1f s: %s (a longer --timeout gives it "
                   "more time)",
                   r->cmd, r->target, (r->cfg.timeout_ms ? r->cfg.timeout_ms : 30000) / 1000.0,
                   msg);
        return 1;
    case 16: /* UNAUTHENTICATED */
        if (r->cfg.token)
            call_error(r,
                       "%s: %s (moed refused the token given with --token or MOED_TOKEN; check "
                       "it against moed's)",
                       r->cmd, msg);
        else
            call_error(r, "%s: %s (no token given: give moed's token with --token or MOED_TOKEN)",
                       r->cmd, msg);
        return 1;
    case 12: /* UNIMPLEMENTED */
        call_error(r, "%s: %s (is %s a moed of another version?)", r->cmd, msg, r->target);
        return 1;
    default:
        call_error(r, "%s: %s", r->cmd, msg);
        return 1;
    }
    *ret = protobuf_c_message_unpack(desc, NULL, resp_len, resp);
    free(resp);
    if (!*ret) {
        call_error(r,
                   "%s: cannot decode moed's answer to %s (%zu bytes); is %s a moed of another "
                   "version?",
                   r->cmd, method, resp_len, r->target);
        return 1;
    }
    return 0;
}

/* ---- JSON --------------------------------------------------------------- */

static json_t *string_json(const char *s)
{
    json_t *j;
    char *copy;

    if (!s)
        return json_string("");
    j = json_string(s);
    if (j)
        return j;
    /* Not UTF-8 (a path, say): keep the ASCII, mark the rest. */
    copy = strdup(s);
    if (!copy)
        return NULL;
    for (char *p = copy; *p; p++)
        if ((unsigned char)*p >= 0x80)
            *p = '?';
    j = json_string(copy);
    free(copy);
    return j;
}

static json_t *value_json(const ProtobufCFieldDescriptor *f, const void *p)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        return json_integer(*(const int32_t *)p);
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        return json_integer(*(const uint32_t *)p);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        return json_integer(*(const int64_t *)p);
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: {
        uint64_t v = *(const uint64_t *)p;

        return v > (uint64_t)INT64_MAX ? json_real((double)v) : json_integer((json_int_t)v);
    }
    case PROTOBUF_C_TYPE_FLOAT:
        return json_real(*(const float *)p);
    case PROTOBUF_C_TYPE_DOUBLE:
        return json_real(*(const double *)p);
    case PROTOBUF_C_TYPE_BOOL:
        return json_boolean(*(const protobuf_c_boolean *)p);
    case PROTOBUF_C_TYPE_ENUM: {
        int v = *(const int *)p;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);

        return ev ? json_string(ev->name) : json_integer(v);
    }
    case PROTOBUF_C_TYPE_STRING:
        return string_json(*(char *const *)p);
    case PROTOBUF_C_TYPE_BYTES:
        /* Tensor data: its size only. */
        return json_pack("{sI}", "bytes", (json_int_t)((const ProtobufCBinaryData *)p)->len);
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *sub = *(const ProtobufCMessage *const *)p;

        return sub ? message_json(sub) : json_null();
    }
    }
    return json_null();
}

static size_t value_size(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_FLOAT:
    case PROTOBUF_C_TYPE_ENUM:
        return 4;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE:
        return 8;
    case PROTOBUF_C_TYPE_BOOL:
        return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING:
    case PROTOBUF_C_TYPE_MESSAGE:
        return sizeof(void *);
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    }
    return 0;
}

static double hit_rate(uint64_t hits, uint64_t misses)
{
    return hits + misses ? (double)hits / (double)(hits + misses) : 0.0;
}

/* Any message as a JSON object, field by field through its descriptor.
 * NULL when out of memory. */
json_t *message_json(const ProtobufCMessage *m)
{
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const char *base = (const char *)m;
    json_t *o = json_object();

    if (!o)
        return NULL;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        json_t *v;

        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            if (*(const uint32_t *)(base + f->quantifier_offset) != f->id)
                continue;
        } else if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset &&
                   f->type != PROTOBUF_C_TYPE_MESSAGE && f->type != PROTOBUF_C_TYPE_STRING) {
            if (!*(const protobuf_c_boolean *)(base + f->quantifier_offset))
                continue;
        }
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + f->quantifier_offset);
            const char *arr = *(const char *const *)(base + f->offset);
            size_t sz = value_size(f->type);

            v = json_array();
            for (size_t k = 0; v && k < n; k++)
                if (json_array_append_new(v, value_json(f, arr + k * sz)) < 0) {
                    json_decref(v);
                    v = NULL;
                }
        } else {
            v = value_json(f, base + f->offset);
        }
        if (json_object_set_new(o, f->name, v) < 0) {
            json_decref(o);
            return NULL;
        }
    }
    if (d == &moe__v1__cache_counters__descriptor) {
        const Moe__V1__CacheCounters *c = (const Moe__V1__CacheCounters *)m;

        json_object_set_new(o, "hit_rate", json_real(hit_rate(c->hits, c->misses)));
    }
    return o;
}

/* ---- human output ------------------------------------------------------- */

/* A table of strings printed in aligned columns, the last one unpadded. */
struct table {
    int ncols;
    size_t nrows, cap; /* rows used, allocated */
    char **cells;      /* nrows * ncols strdup'd strings */
    bool oom;
};

static void table_row(struct table *t, ...)
{
    va_list ap;

    if (t->oom)
        return;
    if (t->nrows == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 16;
        char **c = realloc(t->cells, cap * t->ncols * sizeof(*c));

        if (!c) {
            t->oom = true;
            return;
        }
        t->cells = c;
        t->cap = cap;
    }
    va_start(ap, t);
    for (int i = 0; i < t->ncols; i++) {
        const char *s = va_arg(ap, const char *);

        t->cells[t->nrows * t->ncols + i] = strdup(s ? s : "");
        if (!t->cells[t->nrows * t->ncols + i])
            t->oom = true;
    }
    va_end(ap);
    t->nrows++;
}

static void table_print(const struct table *t, const char *indent)
{
    int w[16] = {0};

    if (t->oom) {
        errorf("out of memory printing a table");
        return;
    }
    for (size_t r = 0; r < t->nrows; r++)
        for (int i = 0; i < t->ncols && i < 16; i++) {
            int n = (int)strlen(t->cells[r * t->ncols + i]);

            w[i] = MOE_MAX(w[i], n);
        }
    for (size_t r = 0; r < t->nrows; r++) {
        fputs(indent, stdout);
        for (int i = 0; i < t->ncols; i++) {
            const char *s = t->cells[r * t->ncols + i];

            if (i + 1 < t->ncols)
                printf("%-*s  ", w[i], s);
            else
                printf("%s\n", s);
        }
    }
}

static void table_free(struct table *t)
{
    for (size_t i = 0; i < t->nrows * (size_t)t->ncols; i++)
        free(t->cells[i]);
    free(t->cells);
    memset(t, 0, sizeof(*t));
}

/* "3d 4h 5m", "1h 2m 3s", "4.2 s" */
static const char *duration(uint64_t ns, char *buf, size_t len)
{
    uint64_t s = ns / 1000000000u;

    if (s >= 86400)
        snprintf(buf, len, "%llud %lluh %llum", (unsigned long long)(s / 86400),
                 (unsigned long long)(s / 3600 % 24), (unsigned long long)(s / 60 % 60));
    else if (s >= 3600)
        snprintf(buf, len, "%lluh %llum %llus", (unsigned long long)(s / 3600),
                 (unsigned long long)(s / 60 % 60), (unsigned long long)(s % 60));
    else if (s >= 60)
        snprintf(buf, len, "%llum %llus", (unsigned long long)(s / 60),
                 (unsigned long long)(s % 60));
    else
        snprintf(buf, len, "%.1f s", (double)ns / 1e9);
    return buf;
}

static const char *ms(uint64_t ns, char *buf, size_t len)
{
    snprintf(buf, len, "%.2f ms", (double)ns / 1e6);
    return buf;
}

static const char *u64(uint64_t v, char *buf, size_t len)
{
    snprintf(buf, len, "%llu", (unsigned long long)v);
    return buf;
}

static const char *rate(uint64_t hits, uint64_t misses, char *buf, size_t len)
{
    if (hits + misses == 0)
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.1f%%", 100.0 * hit_rate(hits, misses));
    return buf;
}

static const char *dtype_name(Moe__V1__DType t)
{
    switch (t) {
    case MOE__V1__DTYPE__DTYPE_F32:
        return "f32";
    case MOE__V1__DTYPE__DTYPE_BF16:
        return "bf16";
    case MOE__V1__DTYPE__DTYPE_F16:
        return "f16";
    default:
        return "?";
    }
}

static const Moe__V1__CacheCounters zero_counters = MOE__V1__CACHE_COUNTERS__INIT;

static const Moe__V1__CacheCounters *counters(const Moe__V1__CacheCounters *c)
{
    return c ? c : &zero_counters;
}

/* The peers as this node sees them, one line each; full adds the bytes
 * received and the failed pings (stats). */
static void peers_table(Moe__V1__PeerInfo *const *peers, size_t n, const char *indent, bool full)
{
    struct table t = {.ncols = full ? 12 : 9};

    if (full)
        table_row(&t, "PEER", "ADDRESS", "STATE", "RTT", "CALLS (FAILED)", "TOKENS SENT",
                  "BYTES SENT", "RECEIVED", "PINGS FAILED", "NCCL", "NCCL SENT/SERVED (BYTES)",
                  "LAST ERROR");
    else
        table_row(&t, "PEER", "ADDRESS", "STATE", "RTT", "CALLS (FAILED)", "TOKENS SENT",
                  "BYTES SENT", "NCCL", "LAST ERROR");
    for (size_t i = 0; i < n; i++) {
        const Moe__V1__PeerInfo *p = peers[i];
        char rtt[24], calls[48], tok[24], bs[32], br[32], pf[24], nb[32], nc[64];
        const char *err = p->last_error && *p->last_error ? p->last_error : "-";
        char nccl[32];

        /* The state word here; why, under the table. */
        snprintf(nccl, sizeof(nccl), "%.*s", (int)strcspn(p->nccl ? p->nccl : "", ":"),
                 p->nccl && *p->nccl ? p->nccl : "-");

        snprintf(calls, sizeof(calls), "%llu (%llu)", (unsigned long long)p->calls,
                 (unsigned long long)p->calls_failed);
        if (p->rtt_ns)
            ms(p->rtt_ns, rtt, sizeof(rtt));
        else
            snprintf(rtt, sizeof(rtt), "-");
        u64(p->tokens_sent, tok, sizeof(tok));
        human_bytes(p->bytes_sent, bs, sizeof(bs));
        snprintf(nc, sizeof(nc), "%llu/%llu (%s)", (unsigned long long)p->nccl_calls,
                 (unsigned long long)p->nccl_served, human_bytes(p->nccl_bytes, nb, sizeof(nb)));
        if (full)
            table_row(&t, p->name, p->address, p->state, rtt, calls, tok, bs,
                      human_bytes(p->bytes_received, br, sizeof(br)),
                      u64(p->pings_failed, pf, sizeof(pf)), nccl, nc, err);
        else
            table_row(&t, p->name, p->address, p->state, rtt, calls, tok, bs, nccl, err);
    }
    table_print(&t, indent);
    table_free(&t);
    for (size_t i = 0; i < n; i++)
        if (peers[i]->nccl && strchr(peers[i]->nccl, ':'))
            printf("%sNCCL to %s: %s\n", indent, peers[i]->name, peers[i]->nccl);
}

/* ---- status ------------------------------------------------------------- */

void remote_usage(FILE *f, const char *synopsis, const char *text)
{
    fprintf(f, "usage: moectl %s [remote options]\n\n%s\n", synopsis, text);
    moectl_remote_usage(f);
}

static const char status_text[] =
    "Asks moed how it is: version, state, uptime, models, requests and tokens served,\n"
    "requests in flight, cache policy; in a cluster, this node's name and each peer\n"
    "as it sees it: address, state (up, down, refused), last ping round trip, calls\n"
    "sent (failed), tokens and bytes sent, last error.\n";

static int parse_positional(struct moectl_remote *r, int argc, char **argv, int nargs, char **pos,
                            const char *synopsis, const char *text);

/* Parses the options of a command without arguments of its own. */
static int parse_plain(struct moectl_remote *r, int argc, char **argv, const char *synopsis,
                       const char *text)
{
    return parse_positional(r, argc, argv, 0, NULL, synopsis, text);
}

int moectl_status(int argc, char **argv)
{
    Moe__V1__StatusRequest req = MOE__V1__STATUS_REQUEST__INIT;
    Moe__V1__StatusResponse *s = NULL;
    struct moectl_remote r;
    char b1[64];
    int ret;

    remote_init(&r, argv[0]);
    ret = parse_plain(&r, argc, argv, "status", status_text);
    if (ret >= 0)
        return ret;
    ret = remote_call(&r, "/moe.v1.Control/Status", &req.base,
                      &moe__v1__status_response__descriptor, (ProtobufCMessage **)&s);
    if (ret)
        goto out;
    if (r.json) {
        ret = print_json(&r, message_json(&s->base));
        goto out;
    }
    printf("moed %s at %s: %s, up %s\n", s->version, r.target, s->state,
           duration(s->uptime_ns, b1, sizeof(b1)));
    printf("  models     %u\n", s->models);
    printf("  requests   %llu (%llu tokens), %u in flight\n", (unsigned long long)s->requests,
           (unsigned long long)s->tokens, s->in_flight);
    printf("  policy     %s, prefetch %s\n", s->policy, s->prefetch ? "on" : "off");
    /* A daemon without peers prints what it did before clusters. */
    if (s->n_peers) {
        printf("  node       %s\n", s->node && *s->node ? s->node : "-");
        printf("  peers      %zu\n", s->n_peers);
        peers_table(s->peers, s->n_peers, "    ", false);
    }
out:
    if (s)
        protobuf_c_message_free_unpacked(&s->base, NULL);
    remote_close(&r);
    return ret;
}

/* ---- models ------------------------------------------------------------- */

static void models_table(Moe__V1__ModelInfo *const *models, size_t n)
{
    struct table t = {.ncols = 10};

    table_row(&t, "NAME", "ARCH", "LAYERS", "EXPERTS", "TOP-K", "HIDDEN", "DTYPE", "EXPERT",
              "STORE", "DIR");
    for (size_t i = 0; i < n; i++) {
        const Moe__V1__ModelInfo *m = models[i];
        char layers[48], experts[48], topk[16], hidden[16], eb[32];

        snprintf(layers, sizeof(layers), "%u (%u MoE)", m->layers, m->moe_layers);
        if (m->shared_experts)
            snprintf(experts, sizeof(experts), "%u+%u shared", m->experts, m->shared_experts);
        else
            snprintf(experts, sizeof(experts), "%u", m->experts);
        snprintf(topk, sizeof(topk), "%u", m->top_k);
        snprintf(hidden, sizeof(hidden), "%u", m->hidden);
        table_row(&t, m->name, m->arch, layers, experts, topk, hidden, dtype_name(m->dtype),
                  human_bytes(m->expert_bytes, eb, sizeof(eb)), m->packed ? "packed" : "checkpoint",
                  m->dir);
    }
    table_print(&t, "");
    table_free(&t);
}

static const char models_text[] =
    "Lists the models moed has loaded: name, architecture, layers (MoE layers),\n"
    "routed (+shared) experts, top-k, hidden size, weight type, bytes per expert,\n"
    "packed store or checkpoint, and directory.\n";

int moectl_models(int argc, char **argv)
{
    Moe__V1__ListModelsRequest req = MOE__V1__LIST_MODELS_REQUEST__INIT;
    Moe__V1__ListModelsResponse *m = NULL;
    struct moectl_remote r;
    int ret;

    remote_init(&r, argv[0]);
    ret = parse_plain(&r, argc, argv, "models", models_text);
    if (ret >= 0)
        return ret;
    ret = remote_call(&r, "/moe.v1.Control/ListModels", &req.base,
                      &moe__v1__list_models_response__descriptor, (ProtobufCMessage **)&m);
    if (ret)
        goto out;
    if (r.json)
        ret = print_json(&r, message_json(&m->base));
    else if (m->n_models == 0)
        printf("no models loaded (moectl load --dir DIR loads one)\n");
    else
        models_table(m->models, m->n_models);
out:
    if (m)
        protobuf_c_message_free_unpacked(&m->base, NULL);
    remote_close(&r);
    return ret;
}

/* ---- stats -------------------------------------------------------------- */

static const char stats_text[] =
    "Prints moed's cache statistics: per tier its capacity, use, resident experts,\n"
    "hit rate, prefetch hits and wasted prefetches, evictions, bytes paged in and\n"
    "page-in latency; per model, the hit rate of each MoE layer, the 10 experts\n"
    "with the most load (hits + misses) and the experts marked bad.  In a cluster,\n"
    "also this node's cluster counters (requests split across nodes, remote calls,\n"
    "failovers, tokens and bytes sent to other nodes, calls served for them) and\n"
    "its peers.\n"
    "\n"
    "  --experts         every expert of every model, not only the top 10\n"
    "  --plot FILE.svg   instead, write a picture: per model, heat maps of each\n"
    "                    expert's load and hit rate, and each layer's hit rate\n";

static uint64_t load_of(const Moe__V1__ExpertStats *e)
{
    const Moe__V1__CacheCounters *c = counters(e->counters);

    return c->hits + c->misses;
}

static int by_load_desc(const void *a, const void *b)
{
    const Moe__V1__ExpertStats *x = *(Moe__V1__ExpertStats *const *)a;
    const Moe__V1__ExpertStats *y = *(Moe__V1__ExpertStats *const *)b;
    uint64_t lx = load_of(x), ly = load_of(y);

    if (lx != ly)
        return lx < ly ? 1 : -1;
    if (x->layer != y->layer)
        return x->layer < y->layer ? -1 : 1;
    return x->expert < y->expert ? -1 : x->expert > y->expert;
}

static void experts_table(const Moe__V1__StatsResponse *s, Moe__V1__ExpertStats **e, size_t n)
{
    struct table t = {.ncols = 8};

    table_row(&t, "LAYER", "EXPERT", "LOAD", "HITS", "MISSES", "HIT RATE", "TIER", "STATE");
    for (size_t i = 0; i < n; i++) {
        const Moe__V1__CacheCounters *c = counters(e[i]->counters);
        char l[16], x[16], ld[24], h[24], mi[24], hr[16], st[64];
        const char *tier = "-";

        if (e[i]->tier >= 0 && (size_t)e[i]->tier < s->n_tiers)
            tier = s->tiers[e[i]->tier]->name;
        snprintf(l, sizeof(l), "%u", e[i]->layer);
        snprintf(x, sizeof(x), "%u", e[i]->expert);
        snprintf(st, sizeof(st), "%s%s%s", e[i]->bad ? "bad " : "",
                 e[i]->operator_pinned ? "pinned " : "", e[i]->loading ? "loading " : "");
        if (e[i]->refs)
            snprintf(st + strlen(st), sizeof(st) - strlen(st), "%u ref%s", e[i]->refs,
                     e[i]->refs == 1 ? "" : "s");
        table_row(&t, l, x, u64(load_of(e[i]), ld, sizeof(ld)), u64(c->hits, h, sizeof(h)),
                  u64(c->misses, mi, sizeof(mi)), rate(c->hits, c->misses, hr, sizeof(hr)), tier,
                  st[0] ? st : "-");
    }
    table_print(&t, "    ");
    table_free(&t);
}

static int print_model_stats(const Moe__V1__StatsResponse *s, const Moe__V1__ModelStats *m,
                             bool all)
{
    struct table t = {.ncols = 7};
    Moe__V1__ExpertStats **sorted = NULL;
    size_t nbad = 0;

    printf("\nmodel %s: %u bad expert%s\n", m->name, m->bad_experts,
           m->bad_experts == 1 ? "" : "s");
    table_row(&t, "LAYER", "HIT RATE", "HITS", "MISSES", "PREFETCH HITS", "EVICTIONS", "PAGED IN");
    for (size_t i = 0; i < m->n_layers; i++) {
        const Moe__V1__CacheCounters *c = counters(m->layers[i]->counters);
        char l[16], hr[16], h[24], mi[24], ph[24], ev[24], bp[32];

        snprintf(l, sizeof(l), "%u", m->layers[i]->layer);
        table_row(&t, l, rate(c->hits, c->misses, hr, sizeof(hr)), u64(c->hits, h, sizeof(h)),
                  u64(c->misses, mi, sizeof(mi)), u64(c->prefetch_hits, ph, sizeof(ph)),
                  u64(c->evictions, ev, sizeof(ev)), human_bytes(c->bytes_paged, bp, sizeof(bp)));
    }
    table_print(&t, "  ");
    table_free(&t);
    if (m->n_experts == 0)
        return 0;

    sorted = malloc(m->n_experts * sizeof(*sorted));
    if (!sorted) {
        errorf("stats: out of memory sorting %zu experts", m->n_experts);
        return 1;
    }
    memcpy(sorted, m->experts, m->n_experts * sizeof(*sorted));
    if (all) {
        printf("  every expert:\n");
        experts_table(s, m->experts, m->n_experts);
    } else {
        size_t used = 0;

        /* The top 10 of those used: an idle expert is no one's top. */
        qsort(sorted, m->n_experts, sizeof(*sorted), by_load_desc);
        while (used < MOE_MIN(m->n_experts, (size_t)10) && load_of(sorted[used]) > 0)
            used++;
        if (used == 0) {
            printf("  no expert has had any load yet\n");
        } else {
            printf("  top %zu expert%s by load (hits + misses):\n", used, used == 1 ? "" : "s");
            experts_table(s, sorted, used);
        }
    }
    for (size_t i = 0; i < m->n_experts; i++)
        if (m->experts[i]->bad)
            sorted[nbad++] = m->experts[i];
    if (nbad) {
        printf("  bad experts:");
        for (size_t i = 0; i < nbad; i++)
            printf("%s layer %u expert %u", i ? "," : "", sorted[i]->layer, sorted[i]->expert);
        printf("\n");
    }
    free(sorted);
    return 0;
}

static const char *share(uint64_t part, uint64_t whole, char *buf, size_t len)
{
    if (whole == 0)
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.1f%%", 100.0 * (double)part / (double)whole);
    return buf;
}

/* The cluster section of stats: this node's counters and its peers. */
static void print_cluster(const Moe__V1__StatsResponse *s)
{
    static const Moe__V1__ClusterCounters zero = MOE__V1__CLUSTER_COUNTERS__INIT;
    const Moe__V1__ClusterCounters *c = s->cluster ? s->cluster : &zero;
    char b1[32], b2[32], b3[32], sh[16];

    printf("\ncluster: node %s, placement version %llu\n", s->node && *s->node ? s->node : "-",
           (unsigned long long)c->placement_version);
    printf("  forwards      %llu split across nodes (of %llu requests)\n",
           (unsigned long long)c->forwards, (unsigned long long)s->requests);
    printf("  remote calls  %llu, %llu failed over (%llu of them computed here)\n",
           (unsigned long long)c->remote_calls, (unsigned long long)c->failovers,
           (unsigned long long)c->failover_local);
    printf("  tokens        %llu of %llu sent to other nodes (%s)\n",
           (unsigned long long)c->tokens_remote, (unsigned long long)c->tokens_total,
           share(c->tokens_remote, c->tokens_total, sh, sizeof(sh)));
    if (c->tokens_remote)
        snprintf(b3, sizeof(b3), "%.0f B",
                 (double)(c->bytes_sent + c->bytes_received) / (double)c->tokens_remote);
    else
        snprintf(b3, sizeof(b3), "-");
    printf("  bytes         %s sent, %s received; %s per remote token (both ways)\n",
           human_bytes(c->bytes_sent, b1, sizeof(b1)),
           human_bytes(c->bytes_received, b2, sizeof(b2)), b3);
    printf("  served        %llu calls for other nodes\n",
           (unsigned long long)c->peer_calls_served);
    printf("  NCCL          %llu transfers fell back to gRPC\n",
           (unsigned long long)c->nccl_fallbacks);
    printf("  strays        %llu copies of experts held elsewhere given back\n",
           (unsigned long long)c->strays_evicted);
    printf("  peers:\n");
    peers_table(s->peers, s->n_peers, "    ", true);
}

static int print_stats(const struct moectl_remote *r, const Moe__V1__StatsResponse *s, bool all)
{
    const Moe__V1__CacheCounters *tot = counters(s->total);
    struct table t = {.ncols = 15};
    char b1[64], b2[32];
    int ret = 0;

    printf("moed at %s: %llu requests (%llu tokens) in %llu batches, up %s; policy %s, prefetch "
           "%s\n",
           r->target, (unsigned long long)s->requests, (unsigned long long)s->tokens,
           (unsigned long long)s->batches, duration(s->uptime_ns, b1, sizeof(b1)), s->policy,
           s->prefetch ? "on" : "off");
    printf("all tiers: hit rate %s (%llu hits, %llu misses), %s paged in\n\n",
           rate(tot->hits, tot->misses, b1, sizeof(b1)), (unsigned long long)tot->hits,
           (unsigned long long)tot->misses, human_bytes(tot->bytes_paged, b2, sizeof(b2)));
    table_row(&t, "TIER", "CAPACITY", "USED", "RESIDENT", "HIT RATE", "HITS", "MISSES",
              "PREFETCH HITS", "WASTED", "EVICTIONS", "PAGED IN", "ERRORS", "PAGE-IN P50", "P99",
              "MAX");
    for (size_t i = 0; i < s->n_tiers; i++) {
        const Moe__V1__TierStats *ti = s->tiers[i];
        const Moe__V1__CacheCounters *c = counters(ti->counters);
        const Moe__V1__Latency *lat = ti->page_in;
        char cap[32], used[32], res[24], hr[16], h[24], mi[24], ph[48], wa[24], ev[24], bp[32],
            er[24], p50[24], p99[24], mx[24];
        bool have = lat && lat->count;

        snprintf(ph, sizeof(ph), "%llu of %llu", (unsigned long long)c->prefetch_hits,
                 (unsigned long long)c->prefetches);
        table_row(&t, ti->name, human_bytes(ti->capacity, cap, sizeof(cap)),
                  human_bytes(ti->used, used, sizeof(used)), u64(ti->resident, res, sizeof(res)),
                  rate(c->hits, c->misses, hr, sizeof(hr)), u64(c->hits, h, sizeof(h)),
                  u64(c->misses, mi, sizeof(mi)), ph, u64(c->wasted_prefetches, wa, sizeof(wa)),
                  u64(c->evictions, ev, sizeof(ev)), human_bytes(c->bytes_paged, bp, sizeof(bp)),
                  u64(c->page_in_errors, er, sizeof(er)),
                  have ? ms(lat->p50_ns, p50, sizeof(p50)) : "-",
                  have ? ms(lat->p99_ns, p99, sizeof(p99)) : "-",
                  have ? ms(lat->max_ns, mx, sizeof(mx)) : "-");
    }
    table_print(&t, "");
    table_free(&t);
    for (size_t i = 0; i < s->n_tiers; i++) {
        const Moe__V1__TierStats *ti = s->tiers[i];
        const Moe__V1__CacheCounters *c = counters(ti->counters);
        char pr[16], pb[32], wb[32];

        if (c->prefetches)
            printf("prefetch %s: precision %s (%llu used, %llu wasted of %llu), %s prefetched, %s "
                   "wasted\n",
                   ti->name, rate(c->prefetch_hits, c->wasted_prefetches, pr, sizeof(pr)),
                   (unsigned long long)c->prefetch_hits, (unsigned long long)c->wasted_prefetches,
                   (unsigned long long)c->prefetches,
                   human_bytes(c->prefetched_bytes, pb, sizeof(pb)),
                   human_bytes(c->wasted_bytes, wb, sizeof(wb)));
        if (c->warm_loads)
            printf("warm start %s: %llu experts paged in at start, %llu of them used (warm hits)\n",
                   ti->name, (unsigned long long)c->warm_loads, (unsigned long long)c->warm_hits);
    }
    /* Only in a cluster: a daemon without peers prints what it did before. */
    if (s->n_peers)
        print_cluster(s);
    for (size_t i = 0; i < s->n_models && ret == 0; i++)
        ret = print_model_stats(s, s->models[i], all);
    return ret;
}

int moectl_stats(int argc, char **argv)
{
    static const struct option opts[] = {
        REMOTE_OPTIONS,
        {"experts", no_argument, NULL, 'e'},
        {"plot", required_argument, NULL, 'p'},
        {0},
    };
    const char *plot = NULL;
    Moe__V1__StatsRequest req = MOE__V1__STATS_REQUEST__INIT;
    Moe__V1__StatsResponse *s = NULL;
    bool all = false, remote_given = false;
    struct moectl_remote r;
    int c, k, ret;

    remote_init(&r, argv[0]);
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(&r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        switch (c) {
        case 'e':
            all = true;
            break;
        case 'p':
            plot = optarg;
            break;
        case 'h':
            remote_usage(stdout, "stats [--experts] [--plot FILE.svg]", stats_text);
            return 0;
        default:
            remote_usage(stderr, "stats [--experts] [--plot FILE.svg]", stats_text);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("stats: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (remote_check(&r, remote_given) < 0)
        return 2;
    /* The top 10 and the bad experts come from the per-expert table; with
     * --json it is sent only for --experts, as it is large. */
    req.experts = all || !r.json || plot;
    ret = remote_call(&r, "/moe.v1.Control/Stats", &req.base, &moe__v1__stats_response__descriptor,
                      (ProtobufCMessage **)&s);
    if (ret)
        goto out;
    if (plot) {
        ret = moectl_plot_stats(s, plot);
        if (ret == 0 && !r.json)
            printf("wrote %s\n", plot);
    } else if (r.json) {
        ret = print_json(&r, message_json(&s->base));
    } else {
        ret = print_stats(&r, s, all);
    }
out:
    if (s)
        protobuf_c_message_free_unpacked(&s->base, NULL);
    remote_close(&r);
    return ret;
}

/* ---- load, unload ------------------------------------------------------- */

static const char load_text[] =
    "Loads the checkpoint or packed store in DIR, a directory on moed's host, under\n"
    "the name N (default: the directory's name).  A relative DIR is resolved here,\n"
    "where moectl runs, and refused when it does not exist; an absolute one is sent\n"
    "as it is.\n";

int moectl_load(int argc, char **argv)
{
    static const struct option opts[] = {
        REMOTE_OPTIONS,
        {"dir", required_argument, NULL, 'd'},
        {"name", required_argument, NULL, 'n'},
        {0},
    };
    static const char synopsis[] = "load --dir DIR [--name N]";
    Moe__V1__LoadModelRequest req = MOE__V1__LOAD_MODEL_REQUEST__INIT;
    Moe__V1__LoadModelResponse *resp = NULL;
    const char *dir = NULL, *name = NULL;
    char *abs = NULL;
    bool remote_given = false;
    struct moectl_remote r;
    int c, k, ret;

    remote_init(&r, argv[0]);
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(&r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        switch (c) {
        case 'd':
            dir = optarg;
            break;
        case 'n':
            name = optarg;
            break;
        case 'h':
            remote_usage(stdout, synopsis, load_text);
            return 0;
        default:
            remote_usage(stderr, synopsis, load_text);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("load: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!dir || !*dir) {
        errorf("load: --dir is required (see moectl load --help)");
        return 2;
    }
    if (name && !*name) {
        errorf("load: --name '': expected a name");
        return 2;
    }
    if (remote_check(&r, remote_given) < 0)
        return 2;
    /* moed resolves paths against its own working directory: a relative DIR
     * means the one the user sees here, or nothing. */
    if (dir[0] != '/') {
        abs = realpath(dir, NULL);
        if (!abs) {
            char cwd[PATH_MAX];

            errorf("load: --dir '%s': %s in %s; give an existing directory, or an absolute "
                   "path for one on moed's host",
                   dir, strerror(errno), getcwd(cwd, sizeof(cwd)) ? cwd : "this directory");
            return 1;
        }
    }
    req.dir = abs ? abs : (char *)dir;
    req.name = (char *)(name ? name : "");
    ret = remote_call(&r, "/moe.v1.Control/LoadModel", &req.base,
                      &moe__v1__load_model_response__descriptor, (ProtobufCMessage **)&resp);
    if (ret)
        goto out;
    if (r.json) {
        ret = print_json(&r, message_json(&resp->base));
    } else if (resp->model) {
        printf("loaded %s from %s\n", resp->model->name, resp->model->dir);
        models_table(&resp->model, 1);
    } else {
        printf("loaded %s\n", req.dir);
    }
out:
    if (resp)
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    free(abs);
    remote_close(&r);
    return ret;
}

/* Parses a command whose arguments are nargs positional ones (in *pos). */
static int parse_positional(struct moectl_remote *r, int argc, char **argv, int nargs, char **pos,
                            const char *synopsis, const char *text)
{
    static const struct option opts[] = {REMOTE_OPTIONS, {0}};
    bool remote_given = false;
    int c, k;

    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        if (c == 'h') {
            remote_usage(stdout, synopsis, text);
            return 0;
        }
        remote_usage(stderr, synopsis, text);
        return 2;
    }
    if (argc - optind != nargs) {
        if (argc - optind > nargs)
            errorf("%s: unexpected argument '%s'", r->cmd, argv[optind + nargs]);
        else
            errorf("%s: expected %s (see moectl %s --help)", r->cmd, strchr(synopsis, ' ') + 1,
                   r->cmd);
        return 2;
    }
    for (int i = 0; i < nargs; i++)
        pos[i] = argv[optind + i];
    return remote_check(r, remote_given) < 0 ? 2 : -1;
}

static const char unload_text[] = "Unloads the model called NAME: requests for it are refused from "
                                  "now on, its\nexperts leave the cache.\n";

int moectl_unload(int argc, char **argv)
{
    Moe__V1__UnloadModelRequest req = MOE__V1__UNLOAD_MODEL_REQUEST__INIT;
    Moe__V1__UnloadModelResponse *resp = NULL;
    struct moectl_remote r;
    char *pos[1];
    int ret;

    remote_init(&r, argv[0]);
    ret = parse_positional(&r, argc, argv, 1, pos, "unload NAME", unload_text);
    if (ret >= 0)
        return ret;
    req.name = pos[0];
    ret = remote_call(&r, "/moe.v1.Control/UnloadModel", &req.base,
                      &moe__v1__unload_model_response__descriptor, (ProtobufCMessage **)&resp);
    if (ret)
        goto out;
    if (r.json)
        ret = print_json(&r, message_json(&resp->base));
    else
        printf("unloaded %s\n", pos[0]);
out:
    if (resp)
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    remote_close(&r);
    return ret;
}

/* ---- pin, unpin, evict -------------------------------------------------- */

static int expert_command(int argc, char **argv, const char *method,
                          const ProtobufCMessageDescriptor *desc, const char *synopsis,
                          const char *text, const char *done)
{
    Moe__V1__ExpertRef req = MOE__V1__EXPERT_REF__INIT;
    ProtobufCMessage *resp = NULL;
    struct moectl_remote r;
    char *pos[3], what[64];
    int layer, expert, ret;

    remote_init(&r, argv[0]);
    ret = parse_positional(&r, argc, argv, 3, pos, synopsis, text);
    if (ret >= 0)
        return ret;
    snprintf(what, sizeof(what), "%s: LAYER", r.cmd);
    if (parse_int(what, pos[1], 0, INT_MAX, &layer) < 0)
        return 2;
    snprintf(what, sizeof(what), "%s: EXPERT", r.cmd);
    if (parse_int(what, pos[2], 0, INT_MAX, &expert) < 0)
        return 2;
    req.model = pos[0];
    req.layer = (uint32_t)layer;
    req.expert = (uint32_t)expert;
    ret = remote_call(&r, method, &req.base, desc, &resp);
    if (ret)
        goto out;
    if (r.json)
        ret = print_json(&r, message_json(resp));
    else if (resp->descriptor == &moe__v1__unpin_response__descriptor &&
             !((Moe__V1__UnpinResponse *)resp)->was_pinned)
        printf("layer %d expert %d of %s was not pinned; nothing changed\n", layer, expert, pos[0]);
    else if (resp->descriptor == &moe__v1__evict_response__descriptor &&
             !((Moe__V1__EvictResponse *)resp)->was_resident)
        printf("layer %d expert %d of %s is not resident, nothing to evict\n", layer, expert,
               pos[0]);
    else
        printf("%s layer %d expert %d of %s\n", done, layer, expert, pos[0]);
out:
    if (resp)
        protobuf_c_message_free_unpacked(resp, NULL);
    remote_close(&r);
    return ret;
}

int moectl_pin(int argc, char **argv)
{
    return expert_command(argc, argv, "/moe.v1.Control/Pin", &moe__v1__pin_response__descriptor,
                          "pin MODEL LAYER EXPERT",
                          "Pins an expert in moed's cache: it is paged in now if it is not "
                          "resident, and\nnever evicted until unpinned.\n",
                          "pinned");
}

int moectl_unpin(int argc, char **argv)
{
    return expert_command(argc, argv, "/moe.v1.Control/Unpin", &moe__v1__unpin_response__descriptor,
                          "unpin MODEL LAYER EXPERT",
                          "Unpins an expert pinned with moectl pin: the cache may evict it "
                          "again.\n",
                          "unpinned");
}

int moectl_evict(int argc, char **argv)
{
    return expert_command(argc, argv, "/moe.v1.Control/Evict", &moe__v1__evict_response__descriptor,
                          "evict MODEL LAYER EXPERT",
                          "Evicts an expert from moed's cache (once no request in flight uses "
                          "it); the\nnext request for it pages it in again.\n",
                          "evicted");
}

/* ---- retry -------------------------------------------------------------- */

int moectl_retry(int argc, char **argv)
{
    Moe__V1__RetryRequest req = MOE__V1__RETRY_REQUEST__INIT;
    Moe__V1__RetryResponse *resp = NULL;
    struct moectl_remote r;
    char *pos[3], what[64];
    int layer, expert = -1, ret;

    remote_init(&r, argv[0]);
    ret = parse_positional(
        &r, argc, argv, 3, pos, "retry MODEL LAYER EXPERT|all",
        "Clears the bad mark of an expert whose page-in failed (I/O error, file modified\n"
        "since load) once its file is whole again; `all`: every expert of the layer.\n"
        "moed first takes the model's files as they are now, and checks experts paged\n"
        "in before against their first checksums.  moed also retries a bad expert by\n"
        "itself on its next use after a back-off (10 s, doubling), or at once when its\n"
        "file is put back unchanged.\n");
    if (ret >= 0)
        return ret;
    snprintf(what, sizeof(what), "%s: LAYER", r.cmd);
    if (parse_int(what, pos[1], 0, INT_MAX, &layer) < 0)
        return 2;
    snprintf(what, sizeof(what), "%s: EXPERT (a number or all)", r.cmd);
    if (strcmp(pos[2], "all") != 0 && parse_int(what, pos[2], 0, INT_MAX, &expert) < 0)
        return 2;
    req.model = pos[0];
    req.layer = (uint32_t)layer;
    req.expert = expert < 0 ? 0 : (uint32_t)expert;
    req.all = expert < 0;
    ret = remote_call(&r, "/moe.v1.Control/Retry", &req.base, &moe__v1__retry_response__descriptor,
                      (ProtobufCMessage **)&resp);
    if (ret)
        goto out;
    if (r.json)
        ret = print_json(&r, message_json(&resp->base));
    else if (expert >= 0)
        printf(resp->cleared ? "layer %d expert %d of %s: bad mark cleared, retried on its next "
                               "use\n"
                             : "layer %d expert %d of %s was not marked bad; nothing changed\n",
               layer, expert, pos[0]);
    else
        printf("layer %d of %s: %u bad mark%s cleared\n", layer, pos[0], resp->cleared,
               resp->cleared == 1 ? "" : "s");
out:
    if (resp)
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    remote_close(&r);
    return ret;
}

/* ---- drain -------------------------------------------------------------- */

static const char drain_text[] =
    "Drains moed: it stops taking new forward requests and waits for those in\n"
    "flight, at most N ms with --timeout-ms (default: until all are done).  The call\n"
    "waits as long: without --timeout, N ms + 30 s, or an hour without --timeout-ms.\n"
    "\n"
    "  --timeout-ms N   how long moed waits for the requests in flight\n";

int moectl_drain(int argc, char **argv)
{
    static const struct option opts[] = {
        REMOTE_OPTIONS,
        {"timeout-ms", required_argument, NULL, 'T'},
        {0},
    };
    static const char synopsis[] = "drain [--timeout-ms N]";
    Moe__V1__DrainRequest req = MOE__V1__DRAIN_REQUEST__INIT;
    Moe__V1__DrainResponse *resp = NULL;
    bool remote_given = false;
    struct moectl_remote r;
    long tmo = 0;
    int c, k, ret;

    remote_init(&r, argv[0]);
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(&r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        switch (c) {
        case 'T':
            if (parse_long("drain: --timeout-ms", optarg, 0, (long)(MAX_TIMEOUT_S * 1000), &tmo) <
                0)
                return 2;
            break;
        case 'h':
            remote_usage(stdout, synopsis, drain_text);
            return 0;
        default:
            remote_usage(stderr, synopsis, drain_text);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("drain: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (remote_check(&r, remote_given) < 0)
        return 2;
    req.timeout_ms = (uint64_t)tmo;
    if (!r.timeout_set)
        r.cfg.timeout_ms =
            tmo ? (int)MOE_MIN(tmo + 30000, (long)(MAX_TIMEOUT_S * 1000)) : 3600 * 1000;
    ret = remote_call(&r, "/moe.v1.Control/Drain", &req.base, &moe__v1__drain_response__descriptor,
                      (ProtobufCMessage **)&resp);
    if (ret)
        goto out;
    if (r.json)
        ret = print_json(&r, message_json(&resp->base));
    else
        printf("drained moed at %s: %u requests finished while draining\n", r.target,
               resp->finished);
out:
    if (resp)
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    remote_close(&r);
    return ret;
}

/* ---- resume ------------------------------------------------------------- */

static const char resume_text[] =
    "Ends a drain (moectl drain): moed takes forward requests again.  A moed that\n"
    "is not draining is left as it is.\n";

int moectl_resume(int argc, char **argv)
{
    Moe__V1__StatusRequest sreq = MOE__V1__STATUS_REQUEST__INIT;
    Moe__V1__StatusResponse *st = NULL;
    Moe__V1__DrainRequest req = MOE__V1__DRAIN_REQUEST__INIT;
    Moe__V1__DrainResponse *resp = NULL;
    struct moectl_remote r;
    bool was_draining;
    int ret;

    remote_init(&r, argv[0]);
    ret = parse_plain(&r, argc, argv, "resume", resume_text);
    if (ret >= 0)
        return ret;
    ret = remote_call(&r, "/moe.v1.Control/Status", &sreq.base,
                      &moe__v1__status_response__descriptor, (ProtobufCMessage **)&st);
    if (ret)
        goto out;
    was_draining = strcmp(st->state, "draining") == 0;
    /* Drain with resume set: serving again (moe.proto, DrainRequest). */
    req.resume = true;
    ret = remote_call(&r, "/moe.v1.Control/Drain", &req.base, &moe__v1__drain_response__descriptor,
                      (ProtobufCMessage **)&resp);
    if (ret)
        goto out;
    if (r.json)
        ret = print_json(&r, json_pack("{sb}", "was_draining", was_draining));
    else if (was_draining)
        printf("moed at %s serves again\n", r.target);
    else
        printf("moed at %s was not draining (%s); nothing changed\n", r.target, st->state);
out:
    if (st)
        protobuf_c_message_free_unpacked(&st->base, NULL);
    if (resp)
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    remote_close(&r);
    return ret;
}

/* ---- placement ---------------------------------------------------------- */

static const char placement_text[] =
    "Shows the cluster's placement of the loaded model NAME as this node sees it:\n"
    "the map's version, and per node its state, the experts it owns, the replicas it\n"
    "holds, the bytes of the experts it owns and its share of the load (token rows\n"
    "routed through this node, decayed).\n"
    "\n"
    "  --model NAME   the model (required)\n"
    "  --experts      also one line per expert: layer, expert, owner, replicas, load\n";

static int by_layer_expert(const void *a, const void *b)
{
    const Moe__V1__PlacementEntry *x = *(Moe__V1__PlacementEntry *const *)a;
    const Moe__V1__PlacementEntry *y = *(Moe__V1__PlacementEntry *const *)b;

    if (x->layer != y->layer)
        return x->layer < y->layer ? -1 : 1;
    return x->expert < y->expert ? -1 : x->expert > y->expert;
}

/* "a,b,c" into buf, "-" for none, "..." at the end when it does not fit. */
static const char *join_names(char *const *names, size_t n, char *buf, size_t len)
{
    size_t used = 0;

    if (n == 0) {
        snprintf(buf, len, "-");
        return buf;
    }
    buf[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        int w = snprintf(buf + used, len - used, "%s%s", i ? "," : "", names[i]);

        if (w < 0 || (size_t)w >= len - used) {
            snprintf(buf + MOE_MIN(used, len - 4), 4, "...");
            break;
        }
        used += (size_t)w;
    }
    return buf;
}

static int print_placement(const struct moectl_remote *r, const Moe__V1__PlacementResponse *p,
                           bool all)
{
    Moe__V1__PlacementEntry **sorted;
    struct table t = {.ncols = 6};
    uint64_t total = 0;

    printf("placement of %s at %s: version %llu, %zu node%s, %zu expert%s\n", p->model, r->target,
           (unsigned long long)p->version, p->n_nodes, p->n_nodes == 1 ? "" : "s", p->n_entries,
           p->n_entries == 1 ? "" : "s");
    for (size_t i = 0; i < p->n_nodes; i++)
        total += p->nodes[i]->load;
    table_row(&t, "NODE", "STATE", "EXPERTS", "REPLICAS", "BYTES", "LOAD");
    for (size_t i = 0; i < p->n_nodes; i++) {
        const Moe__V1__NodeLoad *n = p->nodes[i];
        char ex[16], rep[16], by[32], ld[16];

        snprintf(ex, sizeof(ex), "%u", n->experts);
        snprintf(rep, sizeof(rep), "%u", n->replicas);
        table_row(&t, n->name, n->state, ex, rep, human_bytes(n->bytes, by, sizeof(by)),
                  share(n->load, total, ld, sizeof(ld)));
    }
    table_print(&t, "  ");
    table_free(&t);
    if (!all || p->n_entries == 0)
        return 0;

    sorted = malloc(p->n_entries * sizeof(*sorted));
    if (!sorted) {
        errorf("placement: out of memory sorting %zu experts", p->n_entries);
        return 1;
    }
    memcpy(sorted, p->entries, p->n_entries * sizeof(*sorted));
    qsort(sorted, p->n_entries, sizeof(*sorted), by_layer_expert);
    t = (struct table){.ncols = 5};
    table_row(&t, "LAYER", "EXPERT", "OWNER", "REPLICAS", "LOAD");
    for (size_t i = 0; i < p->n_entries; i++) {
        const Moe__V1__PlacementEntry *e = sorted[i];
        char l[16], x[16], rep[256], ld[24];

        snprintf(l, sizeof(l), "%u", e->layer);
        snprintf(x, sizeof(x), "%u", e->expert);
        table_row(&t, l, x, e->owner, join_names(e->replicas, e->n_replicas, rep, sizeof(rep)),
                  u64(e->load, ld, sizeof(ld)));
    }
    printf("\n");
    table_print(&t, "  ");
    table_free(&t);
    free(sorted);
    return 0;
}

int moectl_placement(int argc, char **argv)
{
    static const struct option opts[] = {
        REMOTE_OPTIONS,
        {"model", required_argument, NULL, 'm'},
        {"experts", no_argument, NULL, 'e'},
        {0},
    };
    static const char synopsis[] = "placement --model NAME [--experts]";
    Moe__V1__PlacementRequest req = MOE__V1__PLACEMENT_REQUEST__INIT;
    Moe__V1__PlacementResponse *p = NULL;
    const char *model = NULL;
    bool all = false, remote_given = false;
    struct moectl_remote r;
    int c, k, ret;

    remote_init(&r, argv[0]);
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(&r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 'e':
            all = true;
            break;
        case 'h':
            remote_usage(stdout, synopsis, placement_text);
            return 0;
        default:
            remote_usage(stderr, synopsis, placement_text);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("placement: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!model) {
        errorf("placement: --model is required (see moectl placement --help)");
        return 2;
    }
    if (!*model) {
        errorf("placement: --model '': expected a model name");
        return 2;
    }
    if (remote_check(&r, remote_given) < 0)
        return 2;
    req.model = (char *)model;
    ret = remote_call(&r, "/moe.v1.Control/Placement", &req.base,
                      &moe__v1__placement_response__descriptor, (ProtobufCMessage **)&p);
    if (ret)
        goto out;
    if (r.json)
        ret = print_json(&r, message_json(&p->base));
    else
        ret = print_placement(&r, p, all);
out:
    if (p)
        protobuf_c_message_free_unpacked(&p->base, NULL);
    remote_close(&r);
    return ret;
}

/* ---- peer add, peer remove ---------------------------------------------- */

/* As moed's configuration takes them (daemon/config.c moed_config_add_peer). */
#define MAX_PEER_NAME 127
#define MAX_PEER_ADDRESS 255

static const char peer_synopsis[] = "peer add NAME HOST:PORT\n"
                                    "       moectl peer remove NAME";
static const char peer_text[] =
    "Adds a node to moed's cluster at run time, as a peer = NAME HOST:PORT line of\n"
    "its configuration would (HOST:PORT is the peer's gRPC address, as 10.0.0.2:50051\n"
    "or [fd00::2]:50051), or removes the peer called NAME.  The cluster's placement\n"
    "then moves experts to the new node or away from the removed one.  Needs moed's\n"
    "token (--token or MOED_TOKEN) where it has one.\n";

/* 0 when name is a peer name moed accepts; else prints why, -1. */
static int check_peer_name(const char *cmd, const char *name)
{
    size_t n = strlen(name);

    if (n == 0 || n > MAX_PEER_NAME) {
        errorf("%s: NAME '%s': expected 1 to %d characters", cmd, name, MAX_PEER_NAME);
        return -1;
    }
    for (const char *p = name; *p; p++)
        if ((unsigned char)*p <= ' ' || *p == 0x7f) {
            errorf("%s: NAME '%s': expected no spaces or control characters", cmd, name);
            return -1;
        }
    return 0;
}

/* 0 when addr is HOST:PORT (HOST not empty, PORT 1 to 65535); else prints
 * why, -1. */
static int check_peer_address(const char *cmd, const char *addr)
{
    const char *colon = strrchr(addr, ':');
    char *end;
    long port = 0;

    if (colon) {
        errno = 0;
        port = strtol(colon + 1, &end, 10);
        if (errno || end == colon + 1 || *end || colon[1] == '+' || colon[1] == '-')
            port = 0;
    }
    if (!colon || colon == addr || port < 1 || port > 65535 || strlen(addr) > MAX_PEER_ADDRESS ||
        strpbrk(addr, " \t\r\n")) {
        errorf("%s: address '%s': expected the peer's HOST:PORT (as 10.0.0.2:50051), port 1 "
               "to 65535",
               cmd, addr);
        return -1;
    }
    return 0;
}

int moectl_peer(int argc, char **argv)
{
    static const struct option opts[] = {REMOTE_OPTIONS, {0}};
    Moe__V1__AddPeerRequest add = MOE__V1__ADD_PEER_REQUEST__INIT;
    Moe__V1__RemovePeerRequest rm = MOE__V1__REMOVE_PEER_REQUEST__INIT;
    ProtobufCMessage *resp = NULL;
    bool remote_given = false, adding;
    struct moectl_remote r;
    const char *cmd;
    char **pos;
    int c, k, npos, ret;

    remote_init(&r, argv[0]);
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(&r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        if (c == 'h') {
            remote_usage(stdout, peer_synopsis, peer_text);
            return 0;
        }
        remote_usage(stderr, peer_synopsis, peer_text);
        return 2;
    }
    pos = argv + optind;
    npos = argc - optind;
    if (npos == 0) {
        errorf("peer: expected add NAME HOST:PORT or remove NAME (see moectl peer --help)");
        return 2;
    }
    if (strcmp(pos[0], "add") == 0) {
        adding = true;
        cmd = "peer add";
    } else if (strcmp(pos[0], "remove") == 0) {
        adding = false;
        cmd = "peer remove";
    } else {
        errorf("peer: unknown action '%s': expected add or remove (see moectl peer --help)",
               pos[0]);
        return 2;
    }
    r.cmd = cmd;
    if (npos > (adding ? 3 : 2)) {
        errorf("%s: unexpected argument '%s'", cmd, pos[adding ? 3 : 2]);
        return 2;
    }
    if (npos < (adding ? 3 : 2)) {
        errorf("%s: expected %s (see moectl peer --help)", cmd, adding ? "NAME HOST:PORT" : "NAME");
        return 2;
    }
    if (check_peer_name(cmd, pos[1]) < 0 || (adding && check_peer_address(cmd, pos[2]) < 0))
        return 2;
    if (remote_check(&r, remote_given) < 0)
        return 2;
    if (adding) {
        add.name = pos[1];
        add.address = pos[2];
        ret = remote_call(&r, "/moe.v1.Control/AddPeer", &add.base,
                          &moe__v1__add_peer_response__descriptor, &resp);
    } else {
        rm.name = pos[1];
        ret = remote_call(&r, "/moe.v1.Control/RemovePeer", &rm.base,
                          &moe__v1__remove_peer_response__descriptor, &resp);
    }
    if (ret)
        goto out;
    if (r.json)
        ret = print_json(&r, message_json(resp));
    else if (adding)
        printf("added peer %s at %s\n", pos[1], pos[2]);
    else
        printf("removed peer %s\n", pos[1]);
out:
    if (resp)
        protobuf_c_message_free_unpacked(resp, NULL);
    remote_close(&r);
    return ret;
}

/* ---- forward through moed ----------------------------------------------- */

static void forward_remote_usage(FILE *f)
{
    remote_usage(f,
                 "forward --model NAME --layer L --in X.npy --out Y.npy\n"
                 "                      [--routing-out R.npz] [--dtype f32|bf16|f16] [-q]",
                 "Runs MoE layer L of the loaded model NAME in moed on the hidden states in X.npy\n"
                 "(float32 [tokens, hidden]) and writes its output to Y.npy (float32).  --dtype\n"
                 "picks the type on the wire (default f32; bf16 and f16 round the input and the\n"
                 "output).  --routing-out writes the routing moed used (arrays 'ids' int32 and\n"
                 "'weights' float32, [tokens, top_k]).  Unless -q, prints the time of the call\n"
                 "and the cache hits and misses of its experts.  (--local runs the layer in\n"
                 "this process instead: moectl forward --local --help.)  With --socket naming\n"
                 "moed's shared-memory socket, the call goes through libmoe-client: the hidden\n"
                 "states are written into the shared arena and no bytes cross the socket.\n");
}

static Moe__V1__DType wire_dtype(enum moe_dtype t)
{
    switch (t) {
    case MOE_DTYPE_BF16:
        return MOE__V1__DTYPE__DTYPE_BF16;
    case MOE_DTYPE_F16:
        return MOE__V1__DTYPE__DTYPE_F16;
    default:
        return MOE__V1__DTYPE__DTYPE_F32;
    }
}

/* Converts moed's output tensor to float32 [T, H] into y; -1 after printing
 * what is wrong with it. */
static int output_to_f32(const Moe__V1__Tensor *o, int64_t T, int64_t H, float *y)
{
    size_t n = (size_t)T * (size_t)H, esz;

    if (!o || o->n_shape != 2 || o->shape[0] != T || o->shape[1] != H) {
        errorf("forward: moed answered an output of another shape than the input's [%lld, %lld]",
               (long long)T, (long long)H);
        return -1;
    }
    switch (o->dtype) {
    case MOE__V1__DTYPE__DTYPE_F32:
        esz = 4;
        break;
    case MOE__V1__DTYPE__DTYPE_BF16:
    case MOE__V1__DTYPE__DTYPE_F16:
        esz = 2;
        break;
    default:
        errorf("forward: moed answered an output of unknown type %d", (int)o->dtype);
        return -1;
    }
    if (o->data.len != n * esz) {
        errorf("forward: moed's output holds %zu bytes, not the %zu of [%lld, %lld] %s",
               o->data.len, n * esz, (long long)T, (long long)H, dtype_name(o->dtype));
        return -1;
    }
    if (esz == 4) {
        memcpy(y, o->data.data, n * 4);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t h;

        memcpy(&h, o->data.data + 2 * i, 2);
        y[i] = o->dtype == MOE__V1__DTYPE__DTYPE_BF16 ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);
    }
    return 0;
}

static int write_routing(const char *path, const Moe__V1__Routing *rt, int64_t T)
{
    struct moe_error err = {0};
    int64_t shape[2];

    if (!rt || rt->top_k == 0 || rt->n_expert_ids != (size_t)T * rt->top_k ||
        rt->n_weights != rt->n_expert_ids) {
        errorf("forward: moed answered no routing or one of the wrong size for %lld tokens",
               (long long)T);
        return -1;
    }
    shape[0] = T;
    shape[1] = rt->top_k;
    {
        struct moe_npz_entry ent[2] = {
            {"ids", MOE_NPY_I32, 2, shape, rt->expert_ids},
            {"weights", MOE_NPY_F32, 2, shape, rt->weights},
        };

        if (moe_npz_write(path, ent, 2, &err) < 0) {
            errorf("forward: %s", err.msg);
            return -1;
        }
    }
    return 0;
}

int moectl_forward_remote(int argc, char **argv)
{
    static const struct option opts[] = {
        REMOTE_OPTIONS,
        {"model", required_argument, NULL, 'm'},
        {"layer", required_argument, NULL, 'L'},
        {"in", required_argument, NULL, 'i'},
        {"out", required_argument, NULL, 'o'},
        {"routing-out", required_argument, NULL, 'R'},
        {"dtype", required_argument, NULL, 'D'},
        {"quiet", no_argument, NULL, 'q'},
        {0},
    };
    Moe__V1__ForwardRequest req = MOE__V1__FORWARD_REQUEST__INIT;
    Moe__V1__Tensor hidden = MOE__V1__TENSOR__INIT;
    Moe__V1__ForwardResponse *resp = NULL;
    const char *model = NULL, *in = NULL, *outp = NULL, *rout = NULL;
    enum moe_dtype dt = MOE_DTYPE_F32;
    struct moe_error err = {0};
    struct moe_npy x = {0};
    bool remote_given = false, quiet = false;
    uint16_t *half = NULL;
    float *y = NULL;
    int64_t shape[2];
    struct moectl_remote r;
    int layer = -1, c, k, ret = 1;
    uint64_t t0, rtt;
    size_t n, esz;

    remote_init(&r, argv[0]);
    /* 0 restarts glibc's getopt from scratch, whatever parsed argv before. */
    optind = 0;
    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(&r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 'L':
            if (parse_int("forward: --layer", optarg, 0, INT_MAX, &layer) < 0)
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
        case 'D':
            if (moe_dtype_parse_user(optarg, &dt) < 0 || !moe_dtype_is_compute(dt)) {
                errorf("forward: --dtype '%s': expected f32, bf16 or f16", optarg);
                return 2;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'h':
            forward_remote_usage(stdout);
            return 0;
        default:
            forward_remote_usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        errorf("forward: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!model || !*model || layer < 0 || !in || !outp) {
        errorf("forward: --model, --layer, --in and --out are required (see moectl forward "
               "--help)");
        return 2;
    }
    r.shm_ok = true;
    if (remote_check(&r, remote_given) < 0)
        return 2;
    if (r.use_shm && rout) {
        errorf("forward: --routing-out needs gRPC: the shared-memory transport returns no "
               "routing (give moed's gRPC socket or --remote)");
        return 2;
    }

    if (moe_npy_read(in, &x, &err) < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    if (x.type != MOE_NPY_F32 || x.ndim != 2 || x.shape[0] < 1 || x.shape[0] > MAX_TOKENS ||
        x.shape[1] < 1) {
        errorf("forward: %s: expected float32 hidden states of shape [tokens, hidden], 1 to %d "
               "tokens",
               in, MAX_TOKENS);
        goto out;
    }
    if (r.use_shm) {
        ret = moectl_forward_shm(&r, model, layer, &x, dt, outp, quiet);
        goto out;
    }
    shape[0] = x.shape[0];
    shape[1] = x.shape[1];
    n = x.count;
    esz = dt == MOE_DTYPE_F32 ? 4 : 2;
    if (n > MAX_TENSOR_BYTES / 4) {
        errorf("forward: %s: %zu values are too many for one call (at most %zu MiB); split the "
               "tokens",
               in, n, MAX_TENSOR_BYTES >> 20);
        goto out;
    }
    hidden.n_shape = 2;
    hidden.shape = shape;
    hidden.dtype = wire_dtype(dt);
    if (dt == MOE_DTYPE_F32) {
        hidden.data.data = x.data;
    } else {
        const float *xf = x.data;

        half = malloc(n * sizeof(*half));
        if (!half) {
            errorf("forward: out of memory for %zu values", n);
            goto out;
        }
        for (size_t i = 0; i < n; i++)
            half[i] = dt == MOE_DTYPE_BF16 ? moe_f32_to_bf16(xf[i]) : moe_f32_to_f16(xf[i]);
        hidden.data.data = (uint8_t *)half;
    }
    hidden.data.len = n * esz;
    req.model = (char *)model;
    req.layer = (uint32_t)layer;
    req.hidden = &hidden;
    req.return_routing = rout != NULL;

    t0 = moe_now_ns();
    ret = remote_call(&r, "/moe.v1.Experts/Forward", &req.base,
                      &moe__v1__forward_response__descriptor, (ProtobufCMessage **)&resp);
    rtt = moe_now_ns() - t0;
    if (ret)
        goto out;
    ret = 1;
    y = malloc(n * sizeof(*y));
    if (!y) {
        errorf("forward: out of memory for %zu values", n);
        goto out;
    }
    if (output_to_f32(resp->output, shape[0], shape[1], y) < 0)
        goto out;
    if (moe_npy_write(outp, MOE_NPY_F32, 2, shape, y, &err) < 0) {
        errorf("forward: %s", err.msg);
        goto out;
    }
    if (rout && write_routing(rout, resp->routing, shape[0]) < 0)
        goto out;
    ret = 0;
    if (r.json) {
        json_t *j = json_pack("{ss si sI sI ss sI so* sI sI ss ss*}", "model", model, "layer",
                              layer, "tokens", (json_int_t)shape[0], "hidden", (json_int_t)shape[1],
                              "dtype", moe_dtype_user_name(dt), "round_trip_ns", (json_int_t)rtt,
                              "timing", resp->timing ? message_json(&resp->timing->base) : NULL,
                              "cache_hits", (json_int_t)resp->cache_hits, "cache_misses",
                              (json_int_t)resp->cache_misses, "out", outp, "routing_out", rout);

        ret = print_json(&r, j);
    } else if (!quiet) {
        const Moe__V1__Timing *tm = resp->timing;
        static const Moe__V1__Timing zero = MOE__V1__TIMING__INIT;

        if (!tm)
            tm = &zero;
        printf("layer %d of %s: %lld tokens, %.3f ms round trip; in moed %.3f ms: queue %.3f ms, "
               "route %.3f ms, waiting for experts %.3f ms, compute %.3f ms (batch of %u "
               "requests, %u tokens)\n",
               layer, model, (long long)shape[0], (double)rtt / 1e6, (double)tm->total_ns / 1e6,
               (double)tm->queue_ns / 1e6, (double)tm->route_ns / 1e6, (double)tm->load_ns / 1e6,
               (double)tm->compute_ns / 1e6, tm->batch_requests, tm->batch_tokens);
        printf("cache: %u hits, %u misses of this call's experts\n", resp->cache_hits,
               resp->cache_misses);
    }
out:
    if (resp)
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    remote_close(&r);
    moe_npy_clear(&x);
    free(half);
    free(y);
    return ret;
}

/* ---- record ------------------------------------------------------------- */

static const char record_text[] =
    "Records the routing moed serves for MODEL, live, to a trace in moed's state\n"
    "directory (STATE_DIR/traces/NAME; [server] state_dir, or systemd's\n"
    "StateDirectory=), the format `moectl cache-sim --trace` replays: every\n"
    "forward of every client, each token's experts at each MoE layer and the\n"
    "lookahead routing moed's prefetcher sees.  One recording per model at a time.\n"
    "\n"
    "  start   begin a recording (refused while one runs, or when NAME exists)\n"
    "  stop    end it; prints the file, its records and how long it ran\n"
    "  status  what is being recorded (the default)\n"
    "\n"
    "  --name NAME         the trace's file name (letters, digits, . _ -); default\n"
    "                      MODEL-YYYYMMDD-HHMMSS.trace\n"
    "  --max-records N     records at most (one token at one layer each; default\n"
    "                      10 million, about 200 MB for top-8); later steps are dropped\n"
    "  --seconds S         with start: record for S seconds, then stop and print\n";

static void print_recording(const char *model, const Moe__V1__RecordRoutingResponse *s,
                            const char *verb)
{
    char b[64];

    if (!s->recording && !*verb) {
        printf("%s is not being recorded\n", model);
        return;
    }
    printf("%s %s %s: %llu records in %s%s\n", model, verb, s->path, (unsigned long long)s->records,
           duration(s->duration_ns, b, sizeof(b)),
           s->full ? " (full: --max-records reached, later steps dropped)" : "");
}

int moectl_record(int argc, char **argv)
{
    static const struct option opts[] = {
        REMOTE_OPTIONS,
        {"name", required_argument, NULL, 'n'},
        {"max-records", required_argument, NULL, 'm'},
        {"seconds", required_argument, NULL, 's'},
        {0},
    };
    static const char synopsis[] =
        "record MODEL [start|stop|status] [--name NAME] [--max-records N] [--seconds S]";
    Moe__V1__RecordRoutingRequest req = MOE__V1__RECORD_ROUTING_REQUEST__INIT;
    Moe__V1__RecordRoutingResponse *resp = NULL;
    bool remote_given = false;
    struct moectl_remote r;
    const char *action = "status", *name = NULL;
    long max = 0, secs = 0;
    int c, k, ret;

    remote_init(&r, argv[0]);
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == OPT_REMOTE)
            remote_given = true;
        k = remote_option(&r, c, optarg);
        if (k < 0)
            return 2;
        if (k > 0)
            continue;
        switch (c) {
        case 'n':
            name = optarg;
            break;
        case 'm':
            if (parse_long("record: --max-records", optarg, 1, LONG_MAX, &max) < 0)
                return 2;
            break;
        case 's':
            if (parse_long("record: --seconds", optarg, 1, 7 * 24 * 3600, &secs) < 0)
                return 2;
            break;
        case 'h':
            remote_usage(stdout, synopsis, record_text);
            return 0;
        default:
            remote_usage(stderr, synopsis, record_text);
            return 2;
        }
    }
    if (optind >= argc) {
        errorf("record: MODEL missing (moectl record --help)");
        return 2;
    }
    req.model = argv[optind++];
    if (optind < argc)
        action = argv[optind++];
    if (optind < argc) {
        errorf("record: unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (strcmp(action, "start") == 0)
        req.action = MOE__V1__RECORD_ROUTING_REQUEST__ACTION__START;
    else if (strcmp(action, "stop") == 0)
        req.action = MOE__V1__RECORD_ROUTING_REQUEST__ACTION__STOP;
    else if (strcmp(action, "status") == 0)
        req.action = MOE__V1__RECORD_ROUTING_REQUEST__ACTION__STATUS;
    else {
        errorf("record: unknown action '%s' (start, stop or status)", action);
        return 2;
    }
    if ((name || max || secs) && req.action != MOE__V1__RECORD_ROUTING_REQUEST__ACTION__START) {
        errorf("record: --name, --max-records and --seconds go with start");
        return 2;
    }
    if (remote_check(&r, remote_given) < 0)
        return 2;
    req.name = (char *)(name ? name : "");
    req.max_records = (uint64_t)max;
    ret = remote_call(&r, "/moe.v1.Control/RecordRouting", &req.base,
                      &moe__v1__record_routing_response__descriptor, (ProtobufCMessage **)&resp);
    if (ret)
        goto out;
    if (secs) {
        if (!r.json)
            printf("%s: recording to %s for %ld s\n", req.model, resp->path, secs);
        fflush(stdout);
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        resp = NULL;
        sleep((unsigned)secs);
        req.action = MOE__V1__RECORD_ROUTING_REQUEST__ACTION__STOP;
        req.name = "";
        req.max_records = 0;
        ret =
            remote_call(&r, "/moe.v1.Control/RecordRouting", &req.base,
                        &moe__v1__record_routing_response__descriptor, (ProtobufCMessage **)&resp);
        if (ret)
            goto out;
    }
    if (r.json)
        ret = print_json(&r, message_json(&resp->base));
    else if (req.action == MOE__V1__RECORD_ROUTING_REQUEST__ACTION__START)
        printf("%s: recording to %s (moectl record %s stop ends it)\n", req.model, resp->path,
               req.model);
    else if (req.action == MOE__V1__RECORD_ROUTING_REQUEST__ACTION__STOP)
        print_recording(req.model, resp, "recorded to");
    else
        print_recording(req.model, resp, resp->recording ? "is being recorded to" : "");
out:
    if (resp)
        protobuf_c_message_free_unpacked(&resp->base, NULL);
    remote_close(&r);
    return ret;
}
