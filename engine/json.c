/*
 * Describing JSON values in error messages (see json.h).
 */
#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *moe_json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a real number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
    default:
        return "null";
    }
}

const char *moe_json_text(const json_t *v, char *buf, size_t len)
{
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);

    if (!s) {
        snprintf(buf, len, "(%s)", moe_json_kind(v));
        return buf;
    }
    if (strlen(s) >= len && len > 4)
        snprintf(buf, len, "%.*s...", (int)(len - 4), s);
    else
        snprintf(buf, len, "%s", s);
    free(s);
    return buf;
}
