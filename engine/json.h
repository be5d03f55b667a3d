/*
 * Small helpers for error messages about JSON values (jansson), shared by
 * the parsers of config.json, safetensors headers and the index.
 */
#ifndef MOED_ENGINE_JSON_H
#define MOED_ENGINE_JSON_H

#include <jansson.h>
#include <stddef.h>

/* "an object", "an array", "a string", "an integer", ... */
const char *moe_json_kind(const json_t *v);

/* v as compact JSON in buf, cut to fit with "..."; returns buf. */
const char *moe_json_text(const json_t *v, char *buf, size_t len);

#endif
