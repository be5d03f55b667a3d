/*
 * Fuzz target of the heat file parser (engine/heat.c), for a model of 4
 * layers and 8 experts: anything accepted holds only finite heat >= 0; a
 * refusal says why and leaves the heat zero; nothing may crash or leak.
 */
#include "heat.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    double heat[32];
    struct moe_error err;
    int r = moe_heat_parse((const char *)data, size, "fuzz", 4, 8, heat, &err);

    if (r < 0 && !err.msg[0])
        abort();
    for (int i = 0; i < 32; i++)
        if (!isfinite(heat[i]) || heat[i] < 0.0 || (r < 0 && heat[i] != 0.0))
            abort();
    return 0;
}
