/*
 * moed: the daemon.  Reads its configuration, loads the models, owns the
 * expert cache, the CPU backend and the scheduler, serves gRPC until told to
 * stop, and reports to systemd when NOTIFY_SOCKET is set.
 *
 * Signals are blocked in every thread and taken by the main thread with
 * sigtimedwait:
 *   SIGTERM, SIGINT  stop: refuse new requests (UNAVAILABLE), let those in
 *                    flight finish for drain_timeout_ms, cancel the rest,
 *                    free everything, exit 0;
 *   SIGHUP           re-read the file: log level and format, host cache
 *                    capacity, policy and prefetch;
 *   SIGUSR1          sent by moed_fatal (forward.c) to this thread when the
 *                    backend's device is lost: health says NOT_SERVING and
 *                    forwards are refused for FATAL_GRACE_MS (so that load
 *                    balancers see it, not a closed port), then stop as for
 *                    SIGTERM, with the drain cut to FATAL_DRAIN_MS (nothing
 *                    can be computed any more), and exit MOED_EXIT_FATAL, for
 *                    systemd to
 *                    restart moed (Restart=on-failure).  The loop also asks
 *                    the backend at each wake-up (moe_backend_lost), so
 *                    that a loss no request met stops moed too.
 * The main loop wakes every second (more often for a short WatchdogSec) to
 * ping the systemd watchdog when it is enabled, and withholds the ping while
 * the scheduler is stuck: requests pending or running and no batch finished
 * for longer than the watchdog interval, so that systemd restarts moed.
 *
 * Socket activation: a listening Unix socket passed by systemd (moed.socket)
 * is served instead of binding the configured socket path.
 */
#include "moed.h"

#include "log.h"
#include "logging.h"
#include "pager.h"

#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

/* After a lost device, requests in flight fail at once: the drain only
 * waits for their answers, and streams clients keep open no longer. */
#define FATAL_DRAIN_MS 2000
/* ... and before that, health checks see NOT_SERVING for this long (a
 * SIGTERM or SIGINT cuts it short). */
#define FATAL_GRACE_MS 1000

static void notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* sd_notify when NOTIFY_SOCKET is set (and nothing when not). */
static void notify(const char *fmt, ...)
{
    char buf[512];
    va_list ap;

    if (!getenv("NOTIFY_SOCKET"))
        return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    sd_notify(0, buf);
}

/* Socket activation: the first listening Unix stream socket systemd
 * passed, or -1 (none passed, or none usable: the configured path is bound
 * instead).  Other passed descriptors are closed. */
static int passed_socket(void)
{
    int n = sd_listen_fds(1), fd = -1;

    if (n < 0) {
        moe_log(MOE_LOG_WARN, "socket activation: sd_listen_fds: %s, ignoring", strerror(-n));
        return -1;
    }
    for (int i = SD_LISTEN_FDS_START; i < SD_LISTEN_FDS_START + n; i++) {
        if (fd < 0 && sd_is_socket_unix(i, SOCK_STREAM, 1, NULL, 0) > 0) {
            fd = i;
            continue;
        }
        moe_log(MOE_LOG_WARN,
                "socket activation: fd %d is not %s listening Unix stream socket; closed, "
                "ignoring (check ListenStream= in moed.socket)",
                i, fd < 0 ? "a" : "a second");
        close(i);
    }
    return fd;
}

/* How long the scheduler has gone without finishing a batch while requests
 * wait or run, when that exceeds limit_ns; 0 when it is moving or idle. */
static uint64_t sched_stuck_ns(struct moed *d, uint64_t limit_ns)
{
    struct moe_sched_stats ss;
    uint64_t now = moe_now_ns();

    moe_sched_get_stats(d->sched, &ss);
    if (!ss.pending && !ss.running)
        return 0;
    if (now < ss.last_progress_ns || now - ss.last_progress_ns <= limit_ns)
        return 0;
    return now - ss.last_progress_ns;
}

static void reload(struct moed *d, int argc, char **argv)
{
    struct moed_config nc;
    struct moe_error err;

    if (moed_config_reload(&d->cfg, argc, argv, &nc, &err) < 0) {
        moe_log(MOE_LOG_ERROR, "SIGHUP: configuration not reloaded: %s", err.msg);
        moed_config_clear(&nc);
        return;
    }
    if (nc.log_level != d->cfg.log_level) {
        moe_log_set_level(nc.log_level);
        moe_log(MOE_LOG_INFO, "SIGHUP: log level %s", moe_log_level_name(nc.log_level));
        d->cfg.log_level = nc.log_level;
    }
    if (nc.log_format != d->cfg.log_format) {
        moed_log_start(nc.log_format);
        moe_log(MOE_LOG_INFO, "SIGHUP: log format %s", moed_log_format_name(nc.log_format));
        d->cfg.log_format = nc.log_format;
    }
    if (nc.host_cache_bytes && nc.host_cache_bytes != d->cfg.host_cache_bytes) {
        if (moe_cache_set_capacity(d->cache, moe_cache_tier_count(d->cache) - 1,
                                   nc.host_cache_bytes, &err) < 0)
            moe_log(MOE_LOG_WARN, "SIGHUP: host cache capacity: %s", err.msg);
        else
            moe_log(MOE_LOG_INFO, "SIGHUP: host cache capacity %s",
                    moed_log_bytes(nc.host_cache_bytes, (char[MOED_BYTES_MAX]){0}));
        d->cfg.host_cache_bytes = nc.host_cache_bytes;
    }
    if (nc.policy != d->cfg.policy || nc.prefetch != d->cfg.prefetch) {
        if (moe_cache_set_policy(d->cache, nc.policy, nc.prefetch, &err) < 0) {
            moe_log(MOE_LOG_WARN, "SIGHUP: policy: %s", err.msg);
        } else {
            moe_log(MOE_LOG_INFO, "SIGHUP: policy %s%s", moe_cache_policy_name(nc.policy),
                    nc.prefetch ? "+prefetch" : "");
            /* Under the lock: Status reads them on the gRPC threads. */
            pthread_mutex_lock(&d->lock);
            d->cfg.policy = nc.policy;
            d->cfg.prefetch = nc.prefetch;
            pthread_mutex_unlock(&d->lock);
        }
    }
    moed_config_clear(&nc);
    notify("STATUS=serving %d models, configuration reloaded", d->n_models);
}

#ifdef MOED_HAVE_CUDA
#include "moe_cuda.h"
#endif

/* gpus = "N[,M...]": the CUDA backend on the first (the engine computes on
 * one backend; the others are refused until multi-GPU dispatch lands). */
static int gpu_backend(struct moed *d, struct moe_error *err)
{
    char *end;
    long dev;

    errno = 0;
    dev = strtol(d->cfg.gpus, &end, 10);
    if (errno || end == d->cfg.gpus || *end || dev < 0 || dev > 255)
        return moe_error_set(err, -EINVAL,
                             "expected one CUDA device number (e.g. 0); several GPUs in one "
                             "daemon are not supported yet");
#ifdef MOED_HAVE_CUDA
    struct moe_cuda_config cfg = {.device = (int)dev};
    int rc = moe_backend_cuda_init(&cfg, &d->backend, err);

    if (rc == 0)
        d->gpu = (int)dev;
    return rc;
#else
    return moe_error_set(err, -ENOTSUP,
                         "this moed was built without CUDA (no nvcc at build time): remove "
                         "gpus, or rebuild where the CUDA Toolkit is installed");
#endif
}

/* The GPU tier in front of the host one, gpu_cache_bytes of device memory. */
static int gpu_tier(struct moed *d, struct moe_error *err)
{
#ifdef MOED_HAVE_CUDA
    struct moe_tier *t;
    int rc = moe_tier_cuda_create(d->gpu, d->cfg.gpu_cache_bytes, &t, err);

    if (rc == 0 && (rc = moe_cache_push_tier(d->cache, t, err)) < 0)
        moe_tier_destroy(t);
    if (rc == 0)
        moe_log(MOE_LOG_INFO, "GPU cache tier %s: %s", t->name,
                moed_log_bytes(t->capacity, (char[MOED_BYTES_MAX]){0}));
    return rc;
#else
    (void)d;
    return moe_error_set(err, -ENOTSUP, "built without CUDA");
#endif
}

/* moed --check-config FILE [FLAGS]: validates and exits, starting nothing.
 * Exit 0 and "FILE: OK" on stdout, 1 and each error on stderr, 2 for usage. */
static int check_config(int argc, char **argv, int at)
{
    struct moed_config_check k;
    const char *path = at + 1 < argc ? argv[at + 1] : NULL;
    int n;

    if (!path || strncmp(path, "--", 2) == 0) {
        fprintf(stderr, "moed: --check-config: expected a file (moed --check-config FILE)\n");
        return 2;
    }
    n = moed_config_check(path, argc - 1, argv + 1, &k);
    for (int i = 0; i < k.n; i++)
        fprintf(stderr, "%s\n", k.errors[i]);
    if (k.dropped)
        fprintf(stderr, "%s: %d more errors not shown\n", path, k.dropped);
    if (n == 0)
        printf("%s: OK\n", path);
    else
        fprintf(stderr, "%s: %d error%s\n", path, n, n == 1 ? "" : "s");
    moed_config_check_clear(&k);
    return n ? 1 : 0;
}

/* One KEY=N setting of a fault-injection variable. */
struct fault_key {
    const char *name;
    uint64_t *field;
};

/*
 * Parses environment variable var, a comma-separated list of KEY=N (keys[],
 * N a decimal count) and flag words (flag, which may be NULL, set by
 * "every"); expected says what is allowed, for the error.  0 (fields left
 * as they are when var is unset or empty), or -EINVAL / -ENOMEM with err.
 */
static int parse_faults(const char *var, const struct fault_key *keys, int n_keys, bool *flag,
                        const char *expected, struct moe_error *err)
{
    const char *v = getenv(var);
    char *copy, *tok, *save = NULL;
    int r = 0;

    if (!v || !*v)
        return 0;
    copy = strdup(v);
    if (!copy)
        return moe_error_set(err, -ENOMEM, "out of memory");
    for (tok = strtok_r(copy, ",", &save); tok && r == 0; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '='), *end;
        uint64_t *field = NULL;
        unsigned long long n;

        if (flag && strcmp(tok, "every") == 0) {
            *flag = true;
            continue;
        }
        if (eq) {
            *eq = 0;
            for (int i = 0; i < n_keys && !field; i++)
                if (strcmp(tok, keys[i].name) == 0)
                    field = keys[i].field;
        }
        errno = 0;
        n = eq && eq[1] != '-' ? strtoull(eq + 1, &end, 10) : 0;
        if (!field || errno || eq[1] == '-' || end == eq + 1 || *end)
            r = moe_error_set(err, -EINVAL, "%s='%s': expected %s, comma-separated", var, v,
                              expected);
        else
            *field = n;
    }
    free(copy);
    return r;
}

/*
 * The test hook MOED_PAGER_FAULTS (moed(8) ENVIRONMENT, pager.h): a comma-
 * separated list of fail=N, short=N, corrupt=N and every, injected into
 * the cache's page-ins for the life of the daemon (scripts/soak.sh).
 * 0 and *ret filled (all zero when unset), or -EINVAL with err.
 */
static int pager_faults(struct moe_pager_faults *ret, struct moe_error *err)
{
    const struct fault_key keys[] = {
        {"fail", &ret->fail_nth}, {"short", &ret->short_nth}, {"corrupt", &ret->corrupt_nth}};

    memset(ret, 0, sizeof(*ret));
    return parse_faults("MOED_PAGER_FAULTS", keys, (int)MOE_ARRAY_SIZE(keys), &ret->every,
                        "fail=N, short=N, corrupt=N and every", err);
}

/*
 * The test hook MOED_BACKEND_FAULTS (moed(8) ENVIRONMENT, backend.h): a
 * comma-separated list of ffn=N, matmul=N and copy=N; the backend's Nth
 * call of that kind loses its device, as a sticky CUDA error does.
 * 0 and *ret filled (all zero when unset), or -EINVAL with err.
 */
static int backend_faults(struct moe_backend_faults *ret, struct moe_error *err)
{
    const struct fault_key keys[] = {
        {"ffn", &ret->ffn_nth}, {"matmul", &ret->matmul_nth}, {"copy", &ret->copy_nth}};

    memset(ret, 0, sizeof(*ret));
    return parse_faults("MOED_BACKEND_FAULTS", keys, (int)MOE_ARRAY_SIZE(keys), NULL,
                        "ffn=N, matmul=N and copy=N", err);
}

/* Bytes of physical memory (the budget's default is a share of it). */
static uint64_t host_memory(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);

    return pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 4ull << 30;
}

int main(int argc, char **argv)
{
    struct moed d = {0};
    struct moe_error err = {0};
    struct moe_cpu_config cpu = {0};
    struct moe_cache_config cc = {0};
    struct moe_sched_config sc = {0};
    struct moe_rpc_config rc = {0};
    const struct moe_rpc_method *methods;
    uint64_t watchdog_usec = 0, last_ping = 0, drain_ms;
    bool withheld = false;
    struct moe_model *opened[MOED_MAX_MODELS] = {0};
    sigset_t sigs;
    int r, n_methods, ret = 1;

    /* Requests and answers are megabytes each: keep freed buffers in the
     * heap for the next call rather than unmapping them, whose page faults
     * on every call cost more than the copy (see bench-grpc).  What a burst
     * leaves in the heap goes back to the kernel once the scheduler has been
     * idle a while (scheduler.h, membudget.h: malloc_trim). */
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--check-config") == 0)
            return check_config(argc, argv, i);
    /* Every line has moed's prefix, a bad configuration's too. */
    moed_log_start(MOED_LOG_TEXT);
    moed_config_init(&d.cfg);
    r = moed_config_load(&d.cfg, argc - 1, argv + 1, &err);
    if (r != 0) {
        if (r < 0)
            moe_log(MOE_LOG_ERROR, "%s", err.msg);
        moed_config_clear(&d.cfg);
        return r > 0 ? 0 : 2;
    }
    moe_log_set_level(d.cfg.log_level);
    moed_log_start(d.cfg.log_format);
    pthread_mutex_init(&d.lock, NULL);
    pthread_mutex_init(&d.rec_lock, NULL);
    d.main_thread = pthread_self();
    if (moed_model_dirs_init(&d, &err) < 0 || moed_state_init(&d, &err) < 0) {
        moe_log(MOE_LOG_ERROR, "%s", err.msg);
        goto out;
    }
    d.t_start = moe_now_ns();
    d.gpu = -1;

    /* Every thread created from here on inherits the blocked signals. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (d.cfg.gpus && strcmp(d.cfg.gpus, "none") != 0) {
        if (gpu_backend(&d, &err) < 0) {
            moe_log(MOE_LOG_ERROR, "gpus = %s: %s", d.cfg.gpus, err.msg);
            goto out;
        }
    } else {
        cpu.n_threads = d.cfg.threads;
        cpu.kernel = d.cfg.kernel;
        cpu.act_int8 = d.cfg.int8_activations;
        if (moe_backend_cpu_init(&cpu, &d.backend, &err) < 0) {
            moe_log(MOE_LOG_ERROR, "%s", err.msg);
            goto out;
        }
    }
    {
        struct moe_backend_faults f;

        if (backend_faults(&f, &err) < 0) {
            moe_log(MOE_LOG_ERROR, "%s", err.msg);
            goto out;
        }
        if (f.ffn_nth || f.matmul_nth || f.copy_nth) {
            struct moe_backend *inner = d.backend;

            d.backend = NULL;
            if (moe_backend_faults_wrap(inner, &f, &d.backend, &err) < 0) {
                moe_log(MOE_LOG_ERROR, "%s", err.msg);
                goto out;
            }
            moe_log(MOE_LOG_WARN,
                    "MOED_BACKEND_FAULTS=%s: the %s backend will lose its device (a test hook)",
                    getenv("MOED_BACKEND_FAULTS"), d.backend->ops->name);
        }
    }
    /* The models are opened once, before the cache, whose default size is
     * every expert of them. */
    cc.host_bytes = d.cfg.host_cache_bytes;
    for (int i = 0; i < d.cfg.n_models; i++) {
        if (moe_model_open(d.cfg.models[i].dir, &opened[i], &err) < 0) {
            moe_log(MOE_LOG_ERROR, "model %s: %s", d.cfg.models[i].name, err.msg);
            goto out;
        }
        opened[i]->precision = moed_config_model_precision(&d.cfg, i);
        if (!d.cfg.host_cache_bytes)
            cc.host_bytes += moe_engine_all_experts_bytes(opened[i]);
    }
    if (!cc.host_bytes)
        cc.host_bytes = 256ull << 20;
    cc.policy = d.cfg.policy;
    cc.prefetch = d.cfg.prefetch;
    cc.half_life = d.cfg.half_life;
    cc.register_buffers = d.cfg.register_buffers;
    cc.pager.buffered = d.cfg.buffered;
    if (moe_cache_create(&cc, &d.cache, &err) < 0) {
        moe_log(MOE_LOG_ERROR, "expert cache: %s", err.msg);
        goto out;
    }
    {
        struct moe_pager_faults f;

        if (pager_faults(&f, &err) < 0) {
            moe_log(MOE_LOG_ERROR, "%s", err.msg);
            goto out;
        }
        if (f.fail_nth || f.short_nth || f.corrupt_nth) {
            moe_log(MOE_LOG_WARN, "MOED_PAGER_FAULTS=%s: page-in faults injected (a test hook)",
                    getenv("MOED_PAGER_FAULTS"));
            moe_pager_set_faults(moe_cache_pager(d.cache), &f);
        }
    }
    if (d.gpu >= 0 && gpu_tier(&d, &err) < 0) {
        moe_log(MOE_LOG_ERROR, "GPU cache: %s", err.msg);
        goto out;
    }
    for (int i = 0; i < d.cfg.n_models; i++) {
        struct moe_model *m = opened[i];

        opened[i] = NULL; /* taken by moed_add_model, even when it fails */
        if (moed_add_model(&d, d.cfg.models[i].name, m, &err) < 0) {
            moe_log(MOE_LOG_ERROR, "model %s: %s", d.cfg.models[i].name, err.msg);
            goto out;
        }
    }
    sc.n_workers = d.cfg.workers;
    sc.window_ns = d.cfg.batch_window_us * 1000;
    sc.max_batch_tokens = d.cfg.max_batch_tokens;
    sc.mem_limit = d.cfg.request_memory_bytes ? d.cfg.request_memory_bytes : host_memory() / 4;
    sc.backend = d.backend;
    if (moe_sched_create(&sc, &d.sched, &err) < 0) {
        moe_log(MOE_LOG_ERROR, "%s", err.msg);
        goto out;
    }
    if (moed_cluster_start(&d, &err) < 0) {
        moe_log(MOE_LOG_ERROR, "cluster: %s", err.msg);
        goto out;
    }
    rc.listen = d.cfg.listen;
    rc.unix_path = d.cfg.socket;
    rc.listen_fd = passed_socket();
    rc.has_listen_fd = rc.listen_fd >= 0;
    if (rc.has_listen_fd)
        moe_log(MOE_LOG_INFO,
                "socket activation: serving the Unix socket systemd passed (fd %d)%s%s%s",
                rc.listen_fd, d.cfg.socket ? " instead of binding '" : "",
                d.cfg.socket ? d.cfg.socket : "", d.cfg.socket ? "'" : "");
    else if (d.cfg.socket)
        moe_log(MOE_LOG_INFO, "no socket passed by systemd: binding '%s'", d.cfg.socket);
    rc.tls_cert = d.cfg.tls_cert;
    rc.tls_key = d.cfg.tls_key;
    rc.tls_client_ca = d.cfg.tls_client_ca;
    rc.require_client_cert = d.cfg.tls_require_client_cert;
    rc.token = d.cfg.token;
    rc.max_message_bytes = d.cfg.max_message_bytes;
    rc.n_threads = d.cfg.rpc_threads;
    if (moed_metrics_create(&d, &d.metrics) < 0) {
        moe_log(MOE_LOG_ERROR, "metrics: out of memory");
        goto out;
    }
    n_methods = moed_methods(&d, &methods);
    if (moe_rpc_server_start(&rc, methods, n_methods, &d.rpc, &err) < 0) {
        moe_log(MOE_LOG_ERROR, "gRPC: %s", err.msg);
        goto out;
    }
    if (moed_shm_start(&d, &err) < 0) {
        moe_log(MOE_LOG_ERROR, "shared memory: %s", err.msg);
        goto out;
    }
    if (d.cfg.metrics) {
        if (moed_metrics_listen(d.metrics, d.cfg.metrics, &err) < 0) {
            moe_log(MOE_LOG_ERROR, "%s", err.msg);
            goto out;
        }
        moe_log(MOE_LOG_INFO, "metrics on http://%s/metrics (port %d)", d.cfg.metrics,
                moed_metrics_port(d.metrics));
    }
    moe_log(MOE_LOG_INFO,
            "moed %s serving %d model(s) on %s%s%s (port %d), host cache %s, policy %s%s",
            MOED_VERSION, d.n_models, d.cfg.listen ? d.cfg.listen : "",
            d.cfg.listen && d.cfg.socket ? " and " : "", d.cfg.socket ? d.cfg.socket : "",
            moe_rpc_server_port(d.rpc), moed_log_bytes(cc.host_bytes, (char[MOED_BYTES_MAX]){0}),
            moe_cache_policy_name(cc.policy), cc.prefetch ? "+prefetch" : "");
    /* Scripts and tests read the port from this line (with --listen HOST:0). */
    printf("moed: listening on port %d\n", moe_rpc_server_port(d.rpc));
    if (d.cfg.metrics)
        printf("moed: metrics on port %d\n", moed_metrics_port(d.metrics));
    if (d.shm)
        printf("moed: shared memory on %s\n", d.cfg.shm_socket);
    fflush(stdout);
    notify("READY=1\nSTATUS=serving %d models\nMAINPID=%d", d.n_models, (int)getpid());
    if (sd_watchdog_enabled(0, &watchdog_usec) <= 0)
        watchdog_usec = 0;

    for (;;) {
        struct timespec ts = {1, 0};
        int sig;

        /* A loss no request has met yet (moed_fatal does nothing twice). */
        if (moe_backend_lost(d.backend))
            moed_fatal(&d, "found by the main loop");
        /* Acquire: pairs with moed_fatal's release, after its reason. */
        if (atomic_load_explicit(&d.state, memory_order_acquire) == MOED_FAILED)
            break;

        if (watchdog_usec && moe_now_ns() - last_ping >= watchdog_usec * 1000 / 2) {
            uint64_t stuck = sched_stuck_ns(&d, watchdog_usec * 1000);

            if (!stuck) {
                notify("WATCHDOG=1");
                if (withheld)
                    moe_log(MOE_LOG_INFO, "watchdog: the scheduler moves again, pinging again");
                withheld = false;
            } else if (!withheld) {
                struct moe_sched_stats ss;

                moe_sched_get_stats(d.sched, &ss);
                moe_log(MOE_LOG_ERROR,
                        "watchdog: the scheduler is stuck: %d requests pending and %d running, "
                        "no batch finished for %.3g s (watchdog %.3g s); not pinging the "
                        "watchdog, systemd will restart moed",
                        ss.pending, ss.running, stuck / 1e9, watchdog_usec / 1e6);
                withheld = true;
            }
            last_ping = moe_now_ns();
        }
        /* Wake at least 4 times per watchdog interval (WatchdogSec= below 4 s). */
        if (watchdog_usec && watchdog_usec < 4000000) {
            ts.tv_sec = 0;
            ts.tv_nsec = (long)(watchdog_usec / 4 * 1000);
        }
        sig = sigtimedwait(&sigs, NULL, &ts);
        if (sig < 0 || sig == SIGUSR1) /* SIGUSR1: see fatal at the top */
            continue;
        if (sig == SIGHUP) {
            reload(&d, argc - 1, argv + 1);
            continue;
        }
        moe_log(MOE_LOG_INFO, "%s: stopping: finishing requests in flight (up to %llu ms)",
                strsignal(sig), (unsigned long long)d.cfg.drain_timeout_ms);
        break;
    }
    drain_ms = d.cfg.drain_timeout_ms;
    if (atomic_load_explicit(&d.state, memory_order_acquire) == MOED_FAILED) {
        uint64_t end = moe_now_ns() + FATAL_GRACE_MS * 1000000ull, now;

        /* MOED_FAILED stays: new requests are refused with the reason. */
        notify("STOPPING=1\nSTATUS=failed: %s", moed_fatal_reason(&d));
        while ((now = moe_now_ns()) < end) {
            struct timespec ts = {(time_t)((end - now) / 1000000000u),
                                  (long)((end - now) % 1000000000u)};
            int sig = sigtimedwait(&sigs, NULL, &ts);

            if (sig == SIGTERM || sig == SIGINT)
                break;
        }
        drain_ms = MOE_MIN(drain_ms, FATAL_DRAIN_MS);
    } else {
        int st = atomic_load(&d.state);

        notify("STOPPING=1\nSTATUS=stopping");
        /* Not over a failure that came meanwhile: MOED_FAILED stays. */
        while (st != MOED_FAILED && !atomic_compare_exchange_weak(&d.state, &st, MOED_STOPPING))
            ;
    }
    /* gRPC first, the scheduler still taking requests: no new call starts,
     * and the calls in flight finish, streams open now included (each
     * message their client sends is answered) until the client ends them or
     * drain_ms passes; then they are cancelled. */
    moe_rpc_server_shutdown(d.rpc, (int)MOE_MIN(drain_ms, INT32_MAX));
    /* Split forwards in flight still submit their local share: let them. */
    if (moed_cluster_drain(&d, drain_ms) < 0)
        moe_log(MOE_LOG_WARN, "cluster: forwards still in flight after %llu ms",
                (unsigned long long)drain_ms);
    moe_sched_stop(d.sched);
    ret = atomic_load(&d.fatal) ? MOED_EXIT_FATAL : 0;
out:
    moed_metrics_stop(d.metrics); /* first: a scrape reads everything below */
    /* While the scheduler still runs: sessions end after their requests. */
    moed_shm_stop(&d, "moed stopped");
    moe_rpc_server_free(d.rpc);
    /* After the last call: split forwards finish first. */
    if (moed_cluster_stop(&d) < 0) {
        /* NCCL work stuck on the device: freeing GPU memory below would
         * wait for it too.  The process exit frees everything. */
        moe_log(MOE_LOG_WARN, "moed exits without freeing its models and caches (NCCL work "
                              "still running on the device)");
        moe_log(ret == 0 ? MOE_LOG_INFO : MOE_LOG_ERROR, "moed %s",
                ret == 0 ? "stopped" : "failed");
        fflush(NULL);
        _exit(ret);
    }
    moe_sched_free(d.sched);
    moed_metrics_free(d.metrics); /* after the last request is answered */
    moed_free_models(&d);
    for (int i = 0; i < MOED_MAX_MODELS; i++)
        moe_model_free(opened[i]);
    moe_cache_free(d.cache);
    moe_backend_free(d.backend);
    if (ret == MOED_EXIT_FATAL)
        moe_log(MOE_LOG_ERROR, "moed failed: %s; exiting with status %d to be restarted",
                moed_fatal_reason(&d), ret);
    else
        moe_log(ret == 0 ? MOE_LOG_INFO : MOE_LOG_ERROR, "moed %s",
                ret == 0 ? "stopped" : "failed");
    moed_model_dirs_clear(&d);
    moed_state_clear(&d);
    moed_config_clear(&d.cfg);
    pthread_mutex_destroy(&d.lock);
    pthread_mutex_destroy(&d.rec_lock);
    return ret;
}
