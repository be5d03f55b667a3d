/*
 * libmoe-client (client/moe_client.c) without moed: against the daemon-side
 * protocol server (ipc/server.c) with a fake forward callback, and against a
 * hand-written fake daemon in this file for what a correct server never
 * does (another protocol version, a refusal, a socket closed mid-wait).
 *
 * Covered: connect and models queries; NOP round trips (moe_forward,
 * moe_submit/moe_wait/moe_poll) and completions moe_forward keeps for
 * later; a FORWARD computed in the arena; moed's error completions; the
 * in-flight limit; the arena allocator (exhaustion, reuse, coalescing,
 * bogus frees); buffers outside the arena refused with -EINVAL; a welcome
 * of another version (-EPROTONOSUPPORT, naming both versions) or refusing
 * the uid (-EACCES with moed's reason); moed closing the socket, or
 * stopping, under a waiting client (-ECONNRESET within a second, sticky,
 * reconnect works).
 */
#include "moe_client.h"
#include "server.h"
#include "shm.h"
#include "tests.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static char *dir;

static double now_s(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* ---- the model the fakes serve ---------------------------------------------------------- */

#define HIDDEN 8
#define TOP_K 2

static void fill_model(struct moe_shm_model_info *m, uint32_t id, const char *name)
{
    memset(m, 0, sizeof(*m));
    m->id = id;
    m->dtype = MOE_SHM_DTYPE_BF16;
    m->n_layers = 4;
    m->hidden = HIDDEN;
    m->n_experts = 8;
    m->top_k = TOP_K;
    m->ffn = 16;
    m->n_shared = 0;
    snprintf(m->name, sizeof(m->name), "%s", name);
    snprintf(m->arch, sizeof(m->arch), "mixtral");
    m->moe_layer[0] = (1u << 1) | (1u << 3); /* layers 1 and 3 are MoE */
}

static int models_cb(void *arg, struct moe_shm_model_info *models, int max)
{
    (void)arg;
    if (max < 2)
        return 0;
    fill_model(&models[0], 7, "tiny");
    fill_model(&models[1], 9, "tiny-2");
    return 2;
}

/* out = 2 * in for f32; counters from the request. */
static int forward_cb(void *arg, struct moe_shm_req *req, char *msg, size_t len)
{
    struct moe_shm_cqe counters = {0};

    (void)arg;
    if (req->sqe.dtype != MOE_SHM_DTYPE_F32) {
        snprintf(msg, len, "the test's forward takes f32 only");
        return -EINVAL;
    }
    for (size_t i = 0; i < (size_t)req->sqe.n_tokens * HIDDEN; i++)
        ((float *)req->out)[i] = 2.0f * ((const float *)req->in)[i];
    counters.hits = req->sqe.n_tokens;
    counters.misses = (uint32_t)req->sqe.layer;
    counters.batch_requests = 1;
    counters.batch_tokens = req->sqe.n_tokens;
    moe_shm_complete(req, 0, &counters, NULL);
    return 0;
}

static struct moe_shm_server *server_start(const char *path)
{
    struct moe_shm_server_config cfg = {
        .path = path, .listen_fd = -1, .models = models_cb, .forward = forward_cb};
    struct moe_shm_server *s;
    char err[256];

    if (moe_shm_server_start(&cfg, &s, err, sizeof(err)) < 0)
        FAIL("server: %s", err);
    return s;
}

/* ---- a fake daemon for what the real one never does ------------------------------------- */

enum fake_mode {
    FAKE_WRONG_VERSION, /* a welcome of version 2 */
    FAKE_REFUSE,        /* -EACCES with a reason */
    FAKE_HANG_CLOSE,    /* a good session, no completions, socket closed after 200 ms */
};

struct fake {
    enum fake_mode mode;
    int lfd;
    char path[108];
    pthread_t thread;
};

static void send_welcome(int fd, const struct moe_shm_welcome *w, int memfd)
{
    struct iovec iov = {(void *)w, sizeof(*w)};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    struct cmsghdr *cm;

    if (memfd >= 0) {
        memset(&u, 0, sizeof(u));
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof(u.buf);
        cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &memfd, sizeof(int));
    }
    ASSERT_EQ(sendmsg(fd, &mh, MSG_NOSIGNAL), (ssize_t)sizeof(*w));
}

static void *fake_main(void *arg)
{
    struct fake *f = arg;
    struct moe_shm_welcome w = {.magic = MOE_SHM_MAGIC, .version = MOE_SHM_VERSION};
    struct moe_shm_hello h;
    struct moe_shm_layout l;
    int fd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC);

    ASSERT_TRUE(fd >= 0);
    ASSERT_EQ(recv(fd, &h, sizeof(h), 0), (ssize_t)sizeof(h));
    ASSERT_EQ(h.magic, MOE_SHM_MAGIC);
    if (f->mode == FAKE_WRONG_VERSION) {
        w.version = 2;
        send_welcome(fd, &w, -1);
    } else if (f->mode == FAKE_REFUSE) {
        w.status = -EACCES;
        snprintf(w.msg, sizeof(w.msg), "uid 1000 is not allowed");
        send_welcome(fd, &w, -1);
    } else {
        ASSERT_EQ(moe_shm_layout(h.sq_entries, h.cq_entries, h.arena_bytes, 1u << 20, &l, NULL, 0),
                  0);
        int mfd = memfd_create("fake", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        ASSERT_TRUE(mfd >= 0);
        ASSERT_EQ(ftruncate(mfd, (off_t)l.mapping_bytes), 0);
        void *map = mmap(NULL, l.mapping_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        ASSERT_TRUE(map != MAP_FAILED);
        ASSERT_EQ(moe_shm_init(map, &l, 1), 0);
        ASSERT_EQ(fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), 0);
        w.mapping_bytes = l.mapping_bytes;
        w.session = 1;
        send_welcome(fd, &w, mfd);
        close(mfd);
        usleep(200000); /* the client is waiting for a completion by now */
        munmap(map, l.mapping_bytes);
    }
    close(fd);
    return NULL;
}

static void fake_start(struct fake *f, enum fake_mode mode)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};

    f->mode = mode;
    snprintf(f->path, sizeof(f->path), "%s/fake.sock", dir);
    unlink(f->path);
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", f->path);
    f->lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    ASSERT_TRUE(f->lfd >= 0);
    ASSERT_EQ(bind(f->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    ASSERT_EQ(listen(f->lfd, 4), 0);
    ASSERT_EQ(pthread_create(&f->thread, NULL, fake_main, f), 0);
}

static void fake_stop(struct fake *f)
{
    pthread_join(f->thread, NULL);
    close(f->lfd);
    unlink(f->path);
}

/* ---- tests ------------------------------------------------------------------------------ */

static void check_connect_models(const char *path)
{
    struct moe_model_info m[4], one;
    struct moe_session *s = (void *)1;

    ASSERT_EQ(moe_connect(path, NULL, &s), 0);
    ASSERT_TRUE(s != NULL);
    ASSERT_TRUE(moe_session_fd(s) >= 0);
    ASSERT_EQ(moe_arena_size(s), 64u << 20); /* the default */
    ASSERT_EQ(moe_models(s, NULL, 0), 2);
    ASSERT_EQ(moe_models(s, m, 4), 2);
    ASSERT_EQ(moe_models(s, m, 1), 1);
    ASSERT_EQ(m[0].id, 7);
    ASSERT_STREQ(m[0].name, "tiny");
    ASSERT_STREQ(m[0].arch, "mixtral");
    ASSERT_EQ(m[0].weight_dtype, MOE_BF16);
    ASSERT_EQ(m[0].hidden, HIDDEN);
    ASSERT_EQ(m[0].top_k, TOP_K);
    ASSERT_EQ(m[0].n_layers, 4);
    ASSERT_TRUE(!moe_model_is_moe_layer(&m[0], 0) && moe_model_is_moe_layer(&m[0], 1));
    ASSERT_TRUE(moe_model_is_moe_layer(&m[0], 3) && !moe_model_is_moe_layer(&m[0], 4));
    ASSERT_TRUE(!moe_model_is_moe_layer(&m[0], -1));
    ASSERT_EQ(moe_model_find(s, NULL, &one), 0);
    ASSERT_EQ(one.id, 7);
    ASSERT_EQ(moe_model_find(s, "tiny-2", &one), 0);
    ASSERT_EQ(one.id, 9);
    ASSERT_EQ(moe_model_find(s, "huge", &one), -ENOENT);
    ASSERT_CONTAINS(moe_last_error(s), "no model 'huge'");
    ASSERT_CONTAINS(moe_last_error(s), "'tiny', 'tiny-2'");
    moe_close(s);

    /* No daemon at a path. */
    char *nowhere;
    ASSERT_TRUE(asprintf(&nowhere, "%s/nowhere.sock", dir) > 0);
    ASSERT_EQ(moe_connect(nowhere, NULL, &s), -ENOENT);
    ASSERT_TRUE(s == NULL);
    ASSERT_CONTAINS(moe_connect_error(), "no moed listening at");
    /* A stream socket (moed's gRPC socket, say): what it is, and where
     * shared memory is, not "Protocol wrong type for socket". */
    {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

        ASSERT_TRUE(lfd >= 0);
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", nowhere);
        ASSERT_EQ(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
        ASSERT_EQ(listen(lfd, 1), 0);
        ASSERT_EQ(moe_connect(nowhere, NULL, &s), -EPROTOTYPE);
        ASSERT_TRUE(s == NULL);
        ASSERT_CONTAINS(moe_connect_error(), "gRPC socket");
        ASSERT_CONTAINS(moe_connect_error(), "shm_socket (e.g. /run/moed/shm.sock)");
        close(lfd);
        unlink(nowhere);
    }
    free(nowhere);
    /* A bad option: moed's reason comes back. */
    struct moe_session_opts o = {.sq_entries = 3};
    ASSERT_EQ(moe_connect(path, &o, &s), -EINVAL);
    ASSERT_CONTAINS(moe_connect_error(), "power of two");
}

static void check_nop_and_requests(const char *path)
{
    struct moe_session_opts o = {.sq_entries = 4, .arena_bytes = 1 << 20, .name = "test"};
    struct moe_completion c;
    struct moe_model_info m;
    struct moe_session *s;
    struct moe_request nop = {.op = MOE_OP_NOP, .tag = 42};
    int n, seen;

    ASSERT_EQ(moe_connect(path, &o, &s), 0);
    ASSERT_EQ(moe_arena_size(s), 1u << 20);
    ASSERT_EQ(moe_wait(s, &c, -1), -EAGAIN); /* nothing in flight: no hang */
    ASSERT_EQ(moe_poll(s, &c), -EAGAIN);

    /* NOP round trips. */
    ASSERT_EQ(moe_forward(s, &nop, &c), 0);
    ASSERT_EQ(c.tag, 42);
    ASSERT_EQ(c.status, 0);
    ASSERT_EQ(moe_submit(s, &nop), 0);
    ASSERT_EQ(moe_wait(s, &c, 1000), 0);
    ASSERT_EQ(c.tag, 42);
    ASSERT_EQ(moe_submit(s, &nop), 0);
    for (n = 0; moe_poll(s, &c) == -EAGAIN; n++)
        ASSERT_TRUE(n < 10000000);
    ASSERT_EQ(c.tag, 42);

    /* moe_forward keeps the completions of others, for moe_wait, in order. */
    for (uint64_t t = 100; t < 103; t++) {
        nop.tag = t;
        ASSERT_EQ(moe_submit(s, &nop), 0);
    }
    nop.tag = 7;
    ASSERT_EQ(moe_forward(s, &nop, &c), 0);
    ASSERT_EQ(c.tag, 7);
    for (uint64_t t = 100; t < 103; t++) {
        ASSERT_EQ(moe_wait(s, &c, 1000), 0);
        ASSERT_EQ(c.tag, t);
    }
    ASSERT_EQ(moe_poll(s, &c), -EAGAIN);

    /* The in-flight limit: the completion ring's 8 entries.  The submission
     * ring holds 4, so wait for room while below the limit. */
    nop.tag = 1;
    for (n = 0; n < 8;) {
        int rc = moe_submit(s, &nop);

        if (rc == -EAGAIN) {
            ASSERT_CONTAINS(moe_last_error(s), "submission ring is full");
            usleep(1000);
            continue;
        }
        ASSERT_EQ(rc, 0);
        n++;
    }
    ASSERT_EQ(moe_submit(s, &nop), -EAGAIN);
    ASSERT_CONTAINS(moe_last_error(s), "8 requests in flight");
    for (seen = 0; seen < 8; seen++)
        ASSERT_EQ(moe_wait(s, &c, 1000), 0);
    ASSERT_EQ(moe_wait(s, &c, 0), -EAGAIN);

    /* A FORWARD computed in the arena. */
    ASSERT_EQ(moe_model_find(s, "tiny", &m), 0);
    float *in = moe_alloc(s, 3 * HIDDEN * sizeof(float));
    float *out = moe_alloc(s, 3 * HIDDEN * sizeof(float));
    ASSERT_TRUE(in && out);
    ASSERT_EQ((uintptr_t)in % 64, 0);
    for (int i = 0; i < 3 * HIDDEN; i++)
        in[i] = (float)i;
    struct moe_request r = {.op = MOE_OP_FORWARD,
                            .model = m.id,
                            .layer = 3,
                            .dtype = MOE_F32,
                            .n_tokens = 3,
                            .input = in,
                            .output = out,
                            .tag = 5};
    ASSERT_EQ(moe_forward(s, &r, &c), 0);
    ASSERT_EQ(c.tag, 5);
    ASSERT_EQ(c.hits, 3);
    ASSERT_EQ(c.misses, 3);
    ASSERT_EQ(c.batch_tokens, 3);
    ASSERT_TRUE(c.total_ns > 0);
    for (int i = 0; i < 3 * HIDDEN; i++)
        ASSERT_EQ(out[i], 2.0f * (float)i);

    /* moed's checks come back as error completions. */
    r.layer = 0;
    ASSERT_EQ(moe_forward(s, &r, &c), -ENOENT);
    ASSERT_CONTAINS(c.msg, "not a MoE layer");
    ASSERT_CONTAINS(moe_last_error(s), "not a MoE layer");
    r.layer = 1;
    r.dtype = MOE_BF16;
    ASSERT_EQ(moe_forward(s, &r, &c), -EINVAL);
    ASSERT_CONTAINS(c.msg, "f32 only");
    r.dtype = MOE_F32;

    /* Buffers the client refuses before moed sees them. */
    float *heap = calloc(3 * HIDDEN, sizeof(float));
    r.input = heap;
    ASSERT_EQ(moe_submit(s, &r), -EINVAL);
    ASSERT_CONTAINS(moe_last_error(s), "not in this session's arena");
    r.input = in;
    r.output = heap;
    ASSERT_EQ(moe_submit(s, &r), -EINVAL);
    r.output = in + HIDDEN; /* overlaps the input */
    ASSERT_EQ(moe_submit(s, &r), -EINVAL);
    ASSERT_CONTAINS(moe_last_error(s), "overlap");
    r.output = (float *)((char *)out + 2); /* misaligned */
    ASSERT_EQ(moe_submit(s, &r), -EINVAL);
    ASSERT_CONTAINS(moe_last_error(s), "aligned");
    /* in is the first buffer of the arena: its last 64 bytes are too few. */
    r.output = (float *)((uint8_t *)in + moe_arena_size(s) - 64);
    ASSERT_EQ(moe_submit(s, &r), -EINVAL);
    ASSERT_CONTAINS(moe_last_error(s), "runs past the end");
    r.output = out;
    r.ids = (const int32_t *)in;
    ASSERT_EQ(moe_submit(s, &r), -EINVAL); /* ids without weights */
    r.ids = NULL;
    r.n_tokens = 0;
    ASSERT_EQ(moe_submit(s, &r), -EINVAL);
    r.n_tokens = 3;
    r.op = 5;
    ASSERT_EQ(moe_submit(s, &r), -EINVAL);
    ASSERT_CONTAINS(moe_last_error(s), "unknown request op");
    free(heap);
    ASSERT_EQ(moe_poll(s, &c), -EAGAIN); /* nothing was queued by the refusals */
    moe_free(s, in);
    moe_free(s, out);
    moe_close(s);
}

static void check_arena(const char *path)
{
    struct moe_session_opts o = {.arena_bytes = 1 << 20};
    struct moe_session *s;
    void *p[16];
    int i;

    ASSERT_EQ(moe_connect(path, &o, &s), 0);
    /* Exhaustion: 16 blocks of 64 KiB fill 1 MiB. */
    for (i = 0; i < 16; i++) {
        p[i] = moe_alloc(s, 65536);
        ASSERT_TRUE(p[i] != NULL);
        ASSERT_EQ((uintptr_t)p[i] % 64, 0);
        memset(p[i], i, 65536);
    }
    ASSERT_TRUE(moe_alloc(s, 1) == NULL);
    ASSERT_CONTAINS(moe_last_error(s), "no free range");
    /* Fragmented: every other block free, 128 KiB does not fit, 64 KiB does. */
    for (i = 0; i < 16; i += 2)
        moe_free(s, p[i]);
    ASSERT_TRUE(moe_alloc(s, 65537) == NULL);
    for (i = 0; i < 16; i += 2) {
        p[i] = moe_alloc(s, 65536);
        ASSERT_TRUE(p[i] != NULL);
    }
    ASSERT_TRUE(moe_alloc(s, 64) == NULL);
    /* Bogus frees are ignored, not fatal. */
    moe_free(s, (char *)p[3] + 64);
    ASSERT_CONTAINS(moe_last_error(s), "not a buffer moe_alloc returned");
    moe_free(s, &i);
    ASSERT_CONTAINS(moe_last_error(s), "not in this session's arena");
    moe_free(s, NULL);
    /* Everything freed, in a scattered order: the ranges coalesce back
     * into the whole arena. */
    for (i = 1; i < 16; i += 2)
        moe_free(s, p[i]);
    moe_free(s, p[3]); /* twice: ignored */
    for (i = 14; i >= 0; i -= 2)
        moe_free(s, p[i]);
    void *all = moe_alloc(s, 1 << 20);
    ASSERT_TRUE(all != NULL);
    moe_free(s, all);
    /* Small sizes round up to 64 bytes. */
    char *a = moe_alloc(s, 1), *b = moe_alloc(s, 0);
    ASSERT_TRUE(a && b);
    ASSERT_EQ(b - a, 64);
    ASSERT_TRUE(moe_alloc(s, (size_t)2 << 20) == NULL);
    moe_close(s);
}

static void check_handshake_errors(void)
{
    struct moe_session *s = (void *)1;
    struct fake f;

    fake_start(&f, FAKE_WRONG_VERSION);
    ASSERT_EQ(moe_connect(f.path, NULL, &s), -EPROTONOSUPPORT);
    ASSERT_TRUE(s == NULL);
    ASSERT_CONTAINS(moe_connect_error(),
                    "protocol version mismatch: moed speaks 2, this library 1");
    ASSERT_CONTAINS(moe_strerror(-EPROTONOSUPPORT), "another version");
    fake_stop(&f);

    fake_start(&f, FAKE_REFUSE);
    ASSERT_EQ(moe_connect(f.path, NULL, &s), -EACCES);
    ASSERT_CONTAINS(moe_connect_error(), "refused this client: uid 1000 is not allowed");
    fake_stop(&f);
}

static void check_daemon_gone(const char *path)
{
    struct moe_request nop = {.op = MOE_OP_NOP, .tag = 1};
    struct moe_completion c;
    struct moe_session *s;
    struct fake f;
    double t0;

    /* The socket closes while the client sleeps on the completion ring. */
    fake_start(&f, FAKE_HANG_CLOSE);
    ASSERT_EQ(moe_connect(f.path, NULL, &s), 0);
    ASSERT_EQ(moe_submit(s, &nop), 0);
    t0 = now_s();
    ASSERT_EQ(moe_wait(s, &c, -1), -ECONNRESET);
    ASSERT_TRUE(now_s() - t0 < 1.0);
    ASSERT_CONTAINS(moe_last_error(s), "reconnect with moe_connect");
    /* Sticky. */
    ASSERT_EQ(moe_submit(s, &nop), -ECONNRESET);
    ASSERT_EQ(moe_poll(s, &c), -ECONNRESET);
    ASSERT_EQ(moe_forward(s, &nop, &c), -ECONNRESET);
    ASSERT_EQ(moe_models(s, NULL, 0), -ECONNRESET);
    ASSERT_TRUE(moe_alloc(s, 64) == NULL);
    moe_close(s);
    fake_stop(&f);

    /* The same in polling mode. */
    struct moe_session_opts o = {.flags = MOE_SESSION_POLL};
    fake_start(&f, FAKE_HANG_CLOSE);
    ASSERT_EQ(moe_connect(f.path, &o, &s), 0);
    t0 = now_s();
    ASSERT_EQ(moe_forward(s, &nop, &c), -ECONNRESET);
    ASSERT_TRUE(now_s() - t0 < 1.0);
    moe_close(s);
    fake_stop(&f);

    /* moed stops under a connected client, then a new one comes up: the
     * client gets moed's reason and can reconnect. */
    struct moe_shm_server *srv = server_start(path);
    ASSERT_EQ(moe_connect(path, NULL, &s), 0);
    ASSERT_EQ(moe_forward(s, &nop, &c), 0);
    moe_shm_server_stop(srv, "moed is restarting");
    t0 = now_s();
    for (;;) {
        int rc = moe_poll(s, &c);

        if (rc == -ECONNRESET)
            break;
        ASSERT_EQ(rc, -EAGAIN);
        ASSERT_TRUE(now_s() - t0 < 1.0);
        usleep(1000);
    }
    ASSERT_CONTAINS(moe_last_error(s), "moed closed the session: moed is restarting");
    moe_close(s);
    srv = server_start(path);
    ASSERT_EQ(moe_connect(path, NULL, &s), 0);
    ASSERT_EQ(moe_forward(s, &nop, &c), 0);
    moe_close(s);
    moe_shm_server_stop(srv, NULL);
}

int main(void)
{
    struct moe_shm_server *srv;
    char *path;

    dir = test_tmpdir("client");
    ASSERT_TRUE(asprintf(&path, "%s/moed.sock", dir) > 0);
    srv = server_start(path);
    check_connect_models(path);
    check_nop_and_requests(path);
    check_arena(path);
    moe_shm_server_stop(srv, NULL);
    check_handshake_errors();
    check_daemon_gone(path);
    ASSERT_STREQ(moe_strerror(0), "success");
    ASSERT_CONTAINS(moe_strerror(-ENOSPC), "space");
    free(path);
    test_rmtree(dir);
    free(dir);
    printf("test-client: ok\n");
    return 0;
}
