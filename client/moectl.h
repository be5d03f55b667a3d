/*
 * moectl: what the command files share (client/moectl*.c): error output,
 * option parsing (moectl_util.c), and each command's entry point, which
 * moectl.c dispatches to.
 */
#ifndef MOED_CLIENT_MOECTL_H
#define MOED_CLIENT_MOECTL_H

#include "common.h"
#include "rpc_client.h"

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct ProtobufCMessage;
struct ProtobufCMessageDescriptor;
struct json_t;

#define MOECTL_VERSION "0.1.0"

/* "moectl: " + the message + newline, on stderr. */
void moectl_errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define errorf moectl_errorf

/* Parse a whole decimal integer in [min, max] for option opt; on error print
 * what is wrong and return -EINVAL. */
int moectl_parse_long(const char *opt, const char *s, long min, long max, long *ret);
int moectl_parse_int(const char *opt, const char *s, int min, int max, int *ret);
/* A non-negative integer (decimal, 0x hex). */
int moectl_parse_u64(const char *opt, const char *s, uint64_t *ret);
/* A byte count with an optional K/M/G/T suffix (powers of 1024). */
int moectl_parse_bytes(const char *opt, const char *s, uint64_t *ret);
#define parse_long moectl_parse_long
#define parse_int moectl_parse_int
#define parse_u64 moectl_parse_u64
#define parse_bytes moectl_parse_bytes

/* "1.5 GiB" */
const char *moectl_human_bytes(uint64_t n, char *buf, size_t len);
#define human_bytes moectl_human_bytes

/* Commands: argv[0] is the command name; return the exit status
 * (0 done, 1 failed, 2 bad usage). */
int moectl_gen_model(int argc, char **argv);
int moectl_inspect(int argc, char **argv);
int moectl_forward(int argc, char **argv);
int moectl_gen_trace(int argc, char **argv);
int moectl_cache_sim(int argc, char **argv);
int moectl_trace(int argc, char **argv);
int moectl_pack(int argc, char **argv);
int moectl_verify(int argc, char **argv);

/* Remote commands (client/moectl_remote.c), calls to a running moed. */
int moectl_status(int argc, char **argv);
int moectl_models(int argc, char **argv);
int moectl_stats(int argc, char **argv);
int moectl_load(int argc, char **argv);
int moectl_unload(int argc, char **argv);
int moectl_pin(int argc, char **argv);
int moectl_unpin(int argc, char **argv);
int moectl_evict(int argc, char **argv);
/* retry MODEL LAYER EXPERT|all: clear bad marks (Control Retry). */
int moectl_retry(int argc, char **argv);
/* record MODEL [start|stop|status]: live routing recording (Control
 * RecordRouting). */
int moectl_record(int argc, char **argv);
int moectl_drain(int argc, char **argv);
/* resume: serving again after a drain (Drain with resume set). */
int moectl_resume(int argc, char **argv);
/* placement --model NAME [--experts]: the cluster's placement of a model. */
int moectl_placement(int argc, char **argv);
/* peer add NAME HOST:PORT, peer remove NAME: the cluster's membership. */
int moectl_peer(int argc, char **argv);
/* forward through moed: --model NAME --layer L --in X.npy --out Y.npy
 * [--routing-out R.npz] [--dtype f32|bf16|f16] [-q] and the remote options.
 * Parses argv from the start (resets getopt). */
int moectl_forward_remote(int argc, char **argv);
/* The remote options (--remote, --socket, --tls..., --token, --timeout,
 * --json), for usage texts. */
void moectl_remote_usage(FILE *f);
/* moectl bench and moectl top (client/moectl_bench.c). */
int moectl_bench(int argc, char **argv);
int moectl_top(int argc, char **argv);

/* ---- the remote options, shared by the remote commands ------------------ */

/* getopt_long codes of the remote options, above any short option. */
enum {
    OPT_REMOTE = 0x100,
    OPT_SOCKET,
    OPT_TLS,
    OPT_TLS_CA,
    OPT_TLS_CERT,
    OPT_TLS_KEY,
    OPT_TOKEN,
    OPT_TIMEOUT,
    OPT_JSON,
    OPT_COMMAND, /* first free code for a command's own long options */
};

/* The remote options and --help, for a command's struct option table. */
#define REMOTE_OPTIONS                                                                             \
    {"remote", required_argument, NULL, OPT_REMOTE},                                               \
        {"socket", required_argument, NULL, OPT_SOCKET}, {"tls", no_argument, NULL, OPT_TLS},      \
        {"tls-ca", required_argument, NULL, OPT_TLS_CA},                                           \
        {"tls-cert", required_argument, NULL, OPT_TLS_CERT},                                       \
        {"tls-key", required_argument, NULL, OPT_TLS_KEY},                                         \
        {"token", required_argument, NULL, OPT_TOKEN},                                             \
        {"timeout", required_argument, NULL, OPT_TIMEOUT}, {"json", no_argument, NULL, OPT_JSON},  \
    {                                                                                              \
        "help", no_argument, NULL, 'h'                                                             \
    }

/* One remote command's connection settings and client. */
struct moectl_remote {
    const char *cmd;     /* argv[0], names the command in messages */
    const char *address; /* --remote, else $MOED_ADDRESS, else the default */
    const char *socket;  /* --socket */
    char target[PATH_MAX + 8];
    struct moe_rpc_client_config cfg; /* cfg.target points at target */
    bool timeout_set;                 /* --timeout given */
    bool json;                        /* --json */
    struct moe_rpc_client *client;    /* opened by the first call */
    bool shm_ok;                      /* set by the command before remote_check: it can use the
                                       * shared-memory transport (forward, bench) */
    bool use_shm;                     /* set by remote_check: --socket is moed's shm_socket */
    bool quiet;                       /* remote_call keeps its failure in last_error, unprinted */
    int last_status;                  /* of the last remote_call: the gRPC status, 0 done, -1 no
                                       * client could be opened or the answer was unusable */
    char last_error[1280];            /* what the last remote_call failed with */
};

/* Defaults from $MOED_ADDRESS and $MOED_TOKEN. */
void moectl_remote_init(struct moectl_remote *r, const char *cmd);
/* Handles option c of REMOTE_OPTIONS: 1 when it was one, 0 when it is the
 * command's own, -1 on bad usage (printed). */
int moectl_remote_option(struct moectl_remote *r, int c, const char *arg);
/* Checks the remote options together once parsing is done and sets
 * cfg.target; -1 on bad usage (printed). */
int moectl_remote_check(struct moectl_remote *r, bool remote_given);
/* Calls method with req and decodes the answer as desc into *ret (free with
 * protobuf_c_message_free_unpacked).  Returns 0, or 1 (the exit status) after
 * printing what failed. */
int moectl_remote_call(struct moectl_remote *r, const char *method,
                       const struct ProtobufCMessage *req,
                       const struct ProtobufCMessageDescriptor *desc,
                       struct ProtobufCMessage **ret);
/* True when path is a SOCK_SEQPACKET socket that accepts a connection:
 * moed's shared-memory socket (its gRPC socket is a stream socket). */
bool moectl_socket_is_shm(const char *path);
/* forward through libmoe-client (moectl_shm.c): x is float32 [T, H]; writes
 * out as float32 .npy.  Returns the exit status after printing. */
struct moe_npy;
int moectl_forward_shm(struct moectl_remote *r, const char *model, int layer,
                       const struct moe_npy *x, enum moe_dtype dt, const char *outp, bool quiet);
/* Closes the client; r can be used again. */
void moectl_remote_close(struct moectl_remote *r);
/* "usage: moectl SYNOPSIS [remote options]", text and the remote options. */
void moectl_remote_usage_of(FILE *f, const char *synopsis, const char *text);
/* Any message as JSON (moe.proto's field names); NULL when out of memory. */
struct json_t *moectl_message_json(const struct ProtobufCMessage *m);
/* Prints j (taking it) on stdout; 0, or 1 when it could not be built. */
int moectl_print_json(struct moectl_remote *r, struct json_t *j);
#define remote_init moectl_remote_init
#define remote_option moectl_remote_option
#define remote_check moectl_remote_check
#define remote_call moectl_remote_call
#define remote_close moectl_remote_close
#define remote_usage moectl_remote_usage_of
#define message_json moectl_message_json
#define print_json moectl_print_json

/* moectl stats --plot: writes s as an SVG picture to path.  0, or the exit
 * status with a message printed. */
struct Moe__V1__StatsResponse;
int moectl_plot_stats(const struct Moe__V1__StatsResponse *s, const char *path);

#endif
