/*
 * moectl: what the command files share (client/moectl*.c): error output,
 * option parsing, and each command's entry point.
 */
#ifndef MOED_CLIENT_MOECTL_H
#define MOED_CLIENT_MOECTL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

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
int moectl_drain(int argc, char **argv);
/* forward through moed: --model NAME --layer L --in X.npy --out Y.npy
 * [--routing-out R.npz] [--dtype f32|bf16|f16] [-q] and the remote options.
 * Parses argv from the start (resets getopt). */
int moectl_forward_remote(int argc, char **argv);
/* The remote options (--remote, --socket, --tls..., --token, --timeout,
 * --json), for usage texts. */
void moectl_remote_usage(FILE *f);

#endif
