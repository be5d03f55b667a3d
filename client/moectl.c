/*
 * moectl: the operator's command line for moed.
 *
 * Offline commands, linked against the engine, that work without a daemon:
 *   gen-model   write a deterministic synthetic checkpoint (Hugging Face layout)
 *   inspect     describe a checkpoint: architecture, layers, experts, bytes
 *   forward     run one MoE layer in process (--local) on a .npy of hidden states
 *   gen-trace   route a synthetic token stream with a model's routers into a trace
 *   cache-sim   replay a routing trace through the expert cache, next to Belady's optimum
 *   trace       import routing recorded by other tools (csv, jsonl) as a routing trace
 *   pack        write a packed store (experts.bin + moe-pack.json) from a checkpoint
 *   verify      check a packed store's checksums, and against its checkpoint
 *
 * Remote commands, calls to a running moed over gRPC (moectl_remote.c), each
 * taking the remote options (--remote HOST:PORT or --socket PATH, --tls...,
 * --token, --timeout, --json) after its name:
 *   status      version, state, uptime, requests served (and peers, in a cluster)
 *   models      the loaded models
 *   stats       cache statistics per tier, layer and expert
 *   load, unload, pin, unpin, evict, retry, drain, resume
 *   placement   the cluster's placement of a model: experts, bytes, load per node
 *   peer        add or remove a node of moed's cluster at run time
 *   forward     without --local: one MoE layer in moed
 *   bench       N callers send forward requests through a model's MoE layers
 *               (moectl_bench.c): throughput, latency, moed's timings, hit rate
 *   top         a live view from Status and Stats: rates, tiers, expert heat map
 *
 * This file only dispatches to the commands; the helpers they share are in
 * moectl_util.c, so that no command file depends on this one.
 *
 * Exit status: 0 success, 1 the command failed (the message says why),
 * 2 bad usage.
 */
#include "moectl.h"

#include "common.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- main --------------------------------------------------------------- */

static const struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} commands[] = {
    {"gen-model", moectl_gen_model, "write a deterministic synthetic checkpoint"},
    {"inspect", moectl_inspect, "describe a checkpoint (architecture, layers, experts, bytes)"},
    {"forward", moectl_forward, "run MoE layers on a .npy of hidden states (in moed, or --local)"},
    {"gen-trace", moectl_gen_trace, "write a routing trace of a synthetic token stream"},
    {"cache-sim", moectl_cache_sim, "replay a routing trace through the cache policies"},
    {"trace", moectl_trace, "import routing recorded by other tools as a trace (trace import)"},
    {"pack", moectl_pack, "write a packed store of a checkpoint's experts, for fast paging"},
    {"verify", moectl_verify, "check a packed store's checksums (and against its checkpoint)"},
    {"status", moectl_status, "moed's version, state, uptime, requests served, peers"},
    {"models", moectl_models, "the models moed has loaded"},
    {"stats", moectl_stats, "moed's cache statistics per tier, layer and expert; cluster"},
    {"load", moectl_load, "load a checkpoint or packed store into moed"},
    {"unload", moectl_unload, "unload a model from moed"},
    {"pin", moectl_pin, "keep an expert resident in moed's cache"},
    {"unpin", moectl_unpin, "let moed's cache evict a pinned expert again"},
    {"evict", moectl_evict, "evict an expert from moed's cache"},
    {"retry", moectl_retry, "clear an expert's bad mark once its file is whole again"},
    {"record", moectl_record, "record the routing moed serves, live, to a trace (start|stop)"},
    {"drain", moectl_drain, "stop taking requests and finish those in flight"},
    {"resume", moectl_resume, "take requests again after a drain"},
    {"placement", moectl_placement, "the cluster's placement of a model: experts, bytes, load"},
    {"peer", moectl_peer, "add or remove a node of moed's cluster (peer add|remove)"},
    {"bench", moectl_bench, "load moed with forward requests; throughput, latency, hit rate"},
    {"top", moectl_top, "a live view of moed: rates, cache tiers, per-expert load"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: moectl COMMAND [options]\n\ncommands:\n");
    for (size_t i = 0; i < MOE_ARRAY_SIZE(commands); i++)
        fprintf(f, "  %-10s  %s\n", commands[i].name, commands[i].summary);
    fputc('\n', f);
    moectl_remote_usage(f);
    fprintf(f, "\n`moectl COMMAND --help` describes each command.  moectl %s\n", MOECTL_VERSION);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("moectl %s\n", MOECTL_VERSION);
        return 0;
    }
    for (size_t i = 0; i < MOE_ARRAY_SIZE(commands); i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            optind = 1;
            return commands[i].run(argc - 1, argv + 1);
        }
    }
    errorf("unknown command '%s' (see moectl --help)", argv[1]);
    return 2;
}
