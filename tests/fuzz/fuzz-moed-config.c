/*
 * Fuzz target of moed's configuration file parser (daemon/config.c): any
 * text is either refused with a message or gives values within the ranges
 * the daemon relies on; nothing leaks.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moed_config c;
    struct moe_error err = {0};
    char *text = malloc(size + 1);

    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = 0;
    moed_config_init(&c);
    if (moed_config_parse(&c, text, "fuzz.conf", &err) == 0) {
        if ((unsigned)c.policy >= MOE_POLICY_COUNT || c.workers < 1 || c.workers > 256 ||
            c.max_batch_tokens < 1 || c.rpc_threads < 1 || c.n_models < 0 ||
            c.n_models > MOED_MAX_MODELS || !(c.half_life >= 0))
            abort();
        for (int i = 0; i < c.n_models; i++)
            if (!c.models[i].name || !c.models[i].dir || !*c.models[i].dir)
                abort();
    } else if (!err.msg[0]) {
        abort(); /* a refusal always says why */
    }
    moed_config_clear(&c);
    free(text);
    return 0;
}
