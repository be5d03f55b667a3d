/*
 * moed's log lines: the sink it installs under engine/log.h, so that every
 * line, the engine's included, has one prefix.
 *
 *   text       2025-06-01T12:00:00.123+02:00 moed[1234] info: message
 *   text, stderr is the systemd journal (which stamps lines itself):
 *              <6>info: message           (the journal takes <6> as the priority)
 *   json       {"ts":"2025-06-01T12:00:00.123+02:00","level":"info","pid":1234,"msg":"message"}
 *              (prefixed with <6> too under the journal)
 *
 * stderr is the journal when JOURNAL_STREAM holds the device and inode of
 * stderr, as systemd documents (systemd.exec(5)): a child whose stderr was
 * redirected elsewhere sees a mismatch and stamps its lines.
 *
 * Threads: moed_log_start and the format may change at any time (SIGHUP);
 * lines are written with one write(2) each, from any thread.
 */
#ifndef MOED_DAEMON_LOGGING_H
#define MOED_DAEMON_LOGGING_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <strings.h>

enum moed_log_format { MOED_LOG_TEXT = 0, MOED_LOG_JSON };

/* "text" or "json" -> 0 and *ret, or -EINVAL.  Inline: the configuration
 * library (config.c) parses it without the sink. */
static inline int moed_log_format_parse(const char *s, enum moed_log_format *ret)
{
    if (s && strcasecmp(s, "text") == 0) {
        *ret = MOED_LOG_TEXT;
        return 0;
    }
    if (s && strcasecmp(s, "json") == 0) {
        *ret = MOED_LOG_JSON;
        return 0;
    }
    return -EINVAL;
}

static inline const char *moed_log_format_name(enum moed_log_format f)
{
    return f == MOED_LOG_JSON ? "json" : "text";
}

/* Installs the sink (again, to change the format); checks JOURNAL_STREAM
 * once. */
void moed_log_start(enum moed_log_format f);

/* Whether stderr is the systemd journal (see above). */
bool moed_log_to_journal(void);

#define MOED_BYTES_MAX 16

/* n bytes for people: "512 B", "352 MiB", "1.5 GiB" (powers of 1024, three
 * significant digits at most).  Returns buf. */
const char *moed_log_bytes(uint64_t n, char buf[MOED_BYTES_MAX]);

/*
 * At debug level, one line per answered forward: its model (NULL: none
 * loaded by that name), layer (-1: not known), token rows, transport ("grpc", "shm"),
 * gRPC status name ("OK", "INVALID_ARGUMENT", ...) and the time from receipt
 * to answer.  In json, each of these is also a field of its own.  Nothing
 * below debug.
 */
void moed_log_request(const char *model, int layer, int tokens, const char *transport,
                      const char *status, uint64_t duration_ns);

#endif
