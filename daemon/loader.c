/*
 * LoadModel's two guards: where a model may be loaded from, and a thread of
 * its own to load on.
 *
 * Where: a caller of LoadModel names a directory on moed's host.  moed opens
 * only directories it was told about: those of the configured models
 * ([models], --model), trusted as the operator named them, and those inside
 * a directory of [server] model_dirs (none unless set).  The name must be
 * absolute; it is resolved (realpath: `..` and symlinks followed) and the
 * result must be one of the configured models' directories or inside a
 * model_dirs entry (itself resolved at start).  Inside model_dirs, no entry
 * of the directory may be a symlink that leads outside model_dirs (the
 * checkpoint's files are read by name from the directory), and once the
 * model is open each data file it holds open is checked again by its file
 * descriptor (/proc/self/fd), which no later rename can change.  What is
 * not checked: a config.json or index swapped for a symlink between the
 * scan and its read by someone who can write in model_dirs (who could then
 * write a checkpoint anyway).
 *
 * Thread: a load reads headers and indexes from disk (a DeepSeek-V3 index
 * is 9 MB, on a slow or hung filesystem much longer), which must not hold a
 * gRPC completion-queue thread: with rpc_threads loads pending, nothing else
 * would be answered.  Loads queue (at most MOED_MAX_PENDING_LOADS) for one
 * loader thread, started at the first LoadModel, which answers each call
 * when its load ends.  Loads run one at a time, in the order received.
 *
 * Locks: loader.lock guards the queue and the flags; d->lock guards the
 * creation of d->loader (once).  The job runs without either held.
 */
#include "moed.h"

#include "log.h"

#include <errno.h>
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct load_job {
    struct load_job *next;
    void (*run)(struct moed *d, void *arg);    /* the load, on the loader thread */
    void (*cancel)(struct moed *d, void *arg); /* instead of run, when stopping */
    void *arg;
};

struct moed_loader {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    pthread_t thread;
    struct load_job *head, **tail; /* guarded by lock */
    int n_pending;                 /* queued, not running; guarded by lock */
    bool quit;                     /* guarded by lock */
};

static void *loader_main(void *arg)
{
    struct moed *d = arg;
    struct moed_loader *l = d->loader;

    pthread_mutex_lock(&l->lock);
    for (;;) {
        struct load_job *j;

        while (!l->head && !l->quit)
            pthread_cond_wait(&l->cv, &l->lock);
        if (!l->head)
            break;
        j = l->head;
        l->head = j->next;
        if (!l->head)
            l->tail = &l->head;
        l->n_pending--;
        pthread_mutex_unlock(&l->lock);
        j->run(d, j->arg);
        free(j);
        pthread_mutex_lock(&l->lock);
    }
    pthread_mutex_unlock(&l->lock);
    return NULL;
}

int moed_loader_submit(struct moed *d, void (*run)(struct moed *, void *),
                       void (*cancel)(struct moed *, void *), void *arg, struct moe_error *err)
{
    struct load_job *j = calloc(1, sizeof(*j));
    struct moed_loader *l;
    int r = 0;

    if (!j)
        return moe_error_set(err, -ENOMEM, "out of memory");
    j->run = run;
    j->cancel = cancel;
    j->arg = arg;
    pthread_mutex_lock(&d->lock);
    if (!d->loader) {
        l = calloc(1, sizeof(*l));
        if (!l) {
            r = moe_error_set(err, -ENOMEM, "out of memory");
        } else {
            pthread_mutex_init(&l->lock, NULL);
            pthread_cond_init(&l->cv, NULL);
            l->tail = &l->head;
            d->loader = l;
            r = -pthread_create(&l->thread, NULL, loader_main, d);
            if (r < 0) {
                moe_error_set(err, r, "cannot start the loader thread: %s", strerror(-r));
                d->loader = NULL;
                pthread_cond_destroy(&l->cv);
                pthread_mutex_destroy(&l->lock);
                free(l);
            }
        }
    }
    l = d->loader;
    pthread_mutex_unlock(&d->lock);
    if (r < 0) {
        free(j);
        return r;
    }
    pthread_mutex_lock(&l->lock);
    if (l->quit)
        r = moe_error_set(err, -ESHUTDOWN, "moed is stopping: no new loads");
    else if (l->n_pending >= MOED_MAX_PENDING_LOADS)
        r = moe_error_set(err, -EAGAIN,
                          "%d loads are waiting already: try again when they have finished",
                          l->n_pending);
    if (r == 0) {
        *l->tail = j;
        l->tail = &j->next;
        l->n_pending++;
        pthread_cond_signal(&l->cv);
    }
    pthread_mutex_unlock(&l->lock);
    if (r < 0)
        free(j);
    return r;
}

void moed_loader_stop(struct moed *d)
{
    struct moed_loader *l = d->loader;
    struct load_job *j;

    if (!l)
        return;
    pthread_mutex_lock(&l->lock);
    l->quit = true;
    j = l->head;
    l->head = NULL;
    l->tail = &l->head;
    l->n_pending = 0;
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->lock);
    while (j) {
        struct load_job *next = j->next;

        j->cancel(d, j->arg);
        free(j);
        j = next;
    }
    /* The load running now ends first (its opens never block). */
    pthread_join(l->thread, NULL);
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->lock);
    free(l);
    d->loader = NULL;
}

/* ---- where models may be loaded from --------------------------------------------------- */

/* Whether path (resolved) is root or inside it (resolved). */
static bool path_within(const char *path, const char *root)
{
    size_t n = strlen(root);

    if (strcmp(root, "/") == 0)
        return true;
    return strncmp(path, root, n) == 0 && (path[n] == 0 || path[n] == '/');
}

static bool within_model_dirs(const struct moed *d, const char *path)
{
    for (int i = 0; i < d->n_model_roots; i++)
        if (path_within(path, d->model_roots[i]))
            return true;
    return false;
}

/* "a, b" of model_dirs, for messages. */
static void roots_text(const struct moed *d, char *buf, size_t len)
{
    size_t at = 0;

    buf[0] = 0;
    for (int i = 0; i < d->n_model_roots && at < len; i++)
        at += (size_t)snprintf(buf + at, len - at, "%s%s", i ? ", " : "", d->model_roots[i]);
}

int moed_model_dirs_init(struct moed *d, struct moe_error *err)
{
    const char *s = d->cfg.model_dirs;
    int r = 0;

    for (int i = 0; i < d->cfg.n_models && i < MOED_MAX_MODELS; i++)
        d->model_trusted[i] = realpath(d->cfg.models[i].dir, NULL);
    while (s && *s) {
        size_t n = strcspn(s, ",");
        char one[PATH_MAX], *real;
        struct stat st;

        while (n && (*s == ' ' || *s == '\t'))
            s++, n--;
        while (n && (s[n - 1] == ' ' || s[n - 1] == '\t'))
            n--;
        if (n >= sizeof(one))
            return moe_error_set(err, -ENAMETOOLONG, "model_dirs: an entry is too long");
        memcpy(one, s, n);
        one[n] = 0;
        s += strcspn(s, ",");
        if (*s == ',')
            s++;
        if (!n)
            continue;
        if (one[0] != '/')
            return moe_error_set(err, -EINVAL,
                                 "model_dirs: '%s' is relative: expected absolute directories, "
                                 "comma-separated",
                                 one);
        if (d->n_model_roots == MOED_MAX_MODEL_DIRS)
            return moe_error_set(err, -E2BIG, "model_dirs: more than %d directories",
                                 MOED_MAX_MODEL_DIRS);
        real = realpath(one, NULL);
        if (!real)
            return moe_error_set(err, -errno, "model_dirs: '%s': %s", one, strerror(errno));
        if (stat(real, &st) < 0 || !S_ISDIR(st.st_mode)) {
            r = moe_error_set(err, -ENOTDIR, "model_dirs: '%s' is not a directory", one);
            free(real);
            return r;
        }
        d->model_roots[d->n_model_roots++] = real;
    }
    return 0;
}

void moed_model_dirs_clear(struct moed *d)
{
    for (int i = 0; i < MOED_MAX_MODELS; i++) {
        free(d->model_trusted[i]);
        d->model_trusted[i] = NULL;
    }
    for (int i = 0; i < d->n_model_roots; i++)
        free(d->model_roots[i]);
    d->n_model_roots = 0;
}

int moed_model_dir_check(struct moed *d, const char *dir, char **ret_real, bool *ret_trusted,
                         struct moe_error *err)
{
    char roots[1024], *real;
    DIR *dh;
    struct dirent *de;
    int r = 0;

    if (dir[0] != '/')
        return moe_error_set(err, -EINVAL,
                             "dir '%s' is relative: give an absolute path on moed's host "
                             "(moectl load resolves --dir where it runs)",
                             dir);
    real = realpath(dir, NULL);
    if (!real)
        return moe_error_set(err, errno == ENOENT ? -ENOENT : -errno, "dir '%s': %s", dir,
                             strerror(errno));
    for (int i = 0; i < d->cfg.n_models && i < MOED_MAX_MODELS; i++)
        if (d->model_trusted[i] && strcmp(real, d->model_trusted[i]) == 0) {
            *ret_real = real;
            *ret_trusted = true;
            return 0;
        }
    roots_text(d, roots, sizeof(roots));
    if (!d->n_model_roots) {
        r = moe_error_set(err, -EPERM,
                          "dir '%s' is not the directory of a configured model, and model_dirs "
                          "is not set: moed loads other models only from inside the "
                          "directories [server] model_dirs names",
                          dir);
        goto fail;
    }
    if (!within_model_dirs(d, real)) {
        if (strcmp(real, dir) != 0)
            r = moe_error_set(err, -EPERM, "dir '%s' resolves to '%s', outside model_dirs (%s)",
                              dir, real, roots);
        else
            r = moe_error_set(err, -EPERM, "dir '%s' is outside model_dirs (%s)", dir, roots);
        goto fail;
    }
    /* Every name in the directory that is a symlink must stay inside. */
    dh = opendir(real);
    if (!dh) {
        r = moe_error_set(err, -errno, "dir '%s': %s", dir, strerror(errno));
        goto fail;
    }
    while (r == 0 && (de = readdir(dh))) {
        char p[PATH_MAX], *to;
        struct stat st;

        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (snprintf(p, sizeof(p), "%s/%s", real, de->d_name) >= (int)sizeof(p))
            continue; /* too long to open as a checkpoint's file anyway */
        if (lstat(p, &st) < 0 || !S_ISLNK(st.st_mode))
            continue;
        to = realpath(p, NULL);
        if (!to) /* dangling: opening it fails with its own error */
            continue;
        if (!within_model_dirs(d, to))
            r = moe_error_set(err, -EPERM,
                              "dir '%s': '%s' is a symlink that leads outside model_dirs (%s): "
                              "refused",
                              dir, de->d_name, roots);
        free(to);
    }
    closedir(dh);
    if (r < 0)
        goto fail;
    *ret_real = real;
    *ret_trusted = false;
    return 0;
fail:
    free(real);
    return r;
}

int moed_model_files_check(struct moed *d, const struct moe_model *m, struct moe_error *err)
{
    char roots[1024];

    for (size_t i = 0; i < m->n_files; i++) {
        char fdp[64], to[PATH_MAX];
        ssize_t n;

        if (m->files[i].fd < 0)
            continue;
        snprintf(fdp, sizeof(fdp), "/proc/self/fd/%d", m->files[i].fd);
        n = readlink(fdp, to, sizeof(to) - 1);
        if (n < 0)
            return moe_error_set(err, -errno, "%s: cannot check where it is: %s",
                                 m->files[i].path, strerror(errno));
        to[n] = 0;
        if (!within_model_dirs(d, to)) {
            roots_text(d, roots, sizeof(roots));
            return moe_error_set(err, -EPERM, "%s: outside model_dirs (%s): refused",
                                 m->files[i].path, roots);
        }
    }
    return 0;
}
