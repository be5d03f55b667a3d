/*
 * moectl stats --plot FILE.svg: a picture of moed's cache statistics for
 * people who would rather look than read.  For each model: a heat map of
 * the load of every expert (rows: MoE layers, columns: experts; load =
 * hits + misses, darker is busier), a heat map of each expert's hit rate
 * (red: always paged in, green: always resident), and the per-layer hit
 * rate as bars.  Plain SVG 1.1, no scripts, readable by any browser.
 */
#include "moectl.h"

#include "common.h"
#include "moe.pb-c.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CELL 12    /* px per expert cell, at most */
#define MAX_W 1200 /* px of a heat map, at most */
#define LEFT 70    /* px for the layer labels */

static void xml_text(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '<':
            fputs("&lt;", f);
            break;
        case '>':
            fputs("&gt;", f);
            break;
        case '&':
            fputs("&amp;", f);
            break;
        case '"':
            fputs("&quot;", f);
            break;
        default:
            fputc(*s, f);
        }
    }
}

/* White to dark blue for a load share in [0, 1]. */
static void load_color(double v, char *buf, size_t len)
{
    int c = (int)(255 - 200 * v);

    snprintf(buf, len, "rgb(%d,%d,255)", c, c);
}

/* Red (0) to yellow to green (1); grey when never asked for. */
static void rate_color(double v, bool any, char *buf, size_t len)
{
    if (!any) {
        snprintf(buf, len, "rgb(230,230,230)");
        return;
    }
    if (v < 0.5)
        snprintf(buf, len, "rgb(220,%d,60)", (int)(60 + 340 * v));
    else
        snprintf(buf, len, "rgb(%d,200,60)", (int)(220 - 340 * (v - 0.5)));
}

static double rate(uint64_t hits, uint64_t misses)
{
    return hits + misses ? (double)hits / (double)(hits + misses) : 0.0;
}

/* One model's block at y; returns its height. */
static int plot_model(FILE *f, const Moe__V1__ModelStats *m, int y)
{
    uint32_t n_layers = 0, n_experts = 0;
    uint64_t max_load = 1;
    int cell, x0 = LEFT, h, y0, gap, x1;
    char col[32];
    /* The rows are the layers that have experts in the table, in order. */
    uint32_t layer_of[1024];

    for (size_t i = 0; i < m->n_experts; i++) {
        const Moe__V1__ExpertStats *e = m->experts[i];
        uint64_t load = e->counters ? e->counters->hits + e->counters->misses : 0;

        n_experts = MOE_MAX(n_experts, e->expert + 1);
        max_load = MOE_MAX(max_load, load);
        if (n_layers == 0 || layer_of[n_layers - 1] != e->layer) {
            if (n_layers == 1024)
                break;
            layer_of[n_layers++] = e->layer;
        }
    }
    if (!n_layers || !n_experts) {
        fprintf(f, "<text x=\"10\" y=\"%d\" class=\"t\">model ", y + 20);
        xml_text(f, m->name);
        fprintf(f, ": no per-expert statistics</text>\n");
        return 40;
    }
    cell = (int)MOE_MAX(2, MOE_MIN(CELL, MAX_W / (int)n_experts));
    h = (int)n_layers * cell;
    /* room for each map's caption (about 230 px of text) */
    gap = MOE_MAX(40, 240 - (int)n_experts * cell);
    x1 = x0 + (int)n_experts * cell + gap;
    fprintf(f, "<text x=\"10\" y=\"%d\" class=\"h\">model ", y + 18);
    xml_text(f, m->name);
    fprintf(f, ": %u MoE layers x %u experts, %u bad</text>\n", n_layers, n_experts,
            m->bad_experts);
    y0 = y + 40;
    fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"t\">load (darkest: %llu uses)</text>\n", x0, y0 - 6,
            (unsigned long long)max_load);
    fprintf(
        f,
        "<text x=\"%d\" y=\"%d\" class=\"t\">hit rate (red 0%%, green 100%%, grey unused)</text>\n",
        x1, y0 - 6);
    for (uint32_t r = 0; r < n_layers; r++)
        fprintf(f, "<text x=\"10\" y=\"%d\" class=\"s\">layer %u</text>\n",
                y0 + (int)r * cell + cell - 1, layer_of[r]);
    for (size_t i = 0; i < m->n_experts; i++) {
        const Moe__V1__ExpertStats *e = m->experts[i];
        uint64_t hi = e->counters ? e->counters->hits : 0,
                 mi = e->counters ? e->counters->misses : 0;
        uint32_t r = 0;

        while (r < n_layers && layer_of[r] != e->layer)
            r++;
        if (r == n_layers)
            continue;
        load_color((double)(hi + mi) / (double)max_load, col, sizeof(col));
        fprintf(f,
                "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\"><title>layer %u "
                "expert %u: %llu hits, %llu misses</title></rect>\n",
                x0 + (int)e->expert * cell, y0 + (int)r * cell, cell, cell, col, e->layer,
                e->expert, (unsigned long long)hi, (unsigned long long)mi);
        rate_color(rate(hi, mi), hi + mi > 0, col, sizeof(col));
        fprintf(f,
                "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\"><title>layer %u "
                "expert %u: hit rate %.1f%%</title></rect>\n",
                x1 + (int)e->expert * cell, y0 + (int)r * cell, cell, cell, col, e->layer,
                e->expert, 100.0 * rate(hi, mi));
    }
    /* per-layer hit rate bars */
    {
        int bx = x1 + (int)n_experts * cell + gap;

        fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"t\">layer hit rate</text>\n", bx, y0 - 6);
        for (size_t i = 0; i < m->n_layers; i++) {
            const Moe__V1__LayerStats *l = m->layers[i];
            uint64_t hi = l->counters ? l->counters->hits : 0;
            uint64_t mi = l->counters ? l->counters->misses : 0;
            uint32_t r = 0;

            while (r < n_layers && layer_of[r] != l->layer)
                r++;
            if (r == n_layers)
                continue;
            fprintf(f,
                    "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"rgb(70,130,180)\">"
                    "<title>layer %u: %.1f%%</title></rect>\n",
                    bx, y0 + (int)r * cell + 1, (int)(150 * rate(hi, mi)), MOE_MAX(1, cell - 2),
                    l->layer, 100.0 * rate(hi, mi));
            if (cell >= 8)
                fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"s\">%.0f%%</text>\n", bx + 155,
                        y0 + (int)r * cell + cell - 1, 100.0 * rate(hi, mi));
        }
    }
    return 40 + h + 30;
}

int moectl_plot_stats(const Moe__V1__StatsResponse *s, const char *path)
{
    const char *dot = strrchr(path, '.');
    int height = 60, width = 400, y;
    FILE *f;

    if (!dot || strcmp(dot, ".svg") != 0) {
        errorf("stats: --plot %s: only SVG pictures are written (name the file .svg)", path);
        return 2;
    }
    for (size_t i = 0; i < s->n_models; i++) {
        uint32_t n_experts = 0, layers = 0, last = UINT32_MAX;

        for (size_t j = 0; j < s->models[i]->n_experts; j++) {
            n_experts = MOE_MAX(n_experts, s->models[i]->experts[j]->expert + 1);
            if (s->models[i]->experts[j]->layer != last) {
                layers++;
                last = s->models[i]->experts[j]->layer;
            }
        }
        int cell = (int)MOE_MAX(2, MOE_MIN(CELL, MAX_W / (int)MOE_MAX(1, n_experts)));

        height += 70 + (int)layers * cell;
        int gap = MOE_MAX(40, 240 - (int)n_experts * cell);

        width = MOE_MAX(width, LEFT + 2 * (int)n_experts * cell + 2 * gap + 200);
    }
    f = fopen(path, "w");
    if (!f) {
        errorf("stats: --plot %s: %s", path, strerror(errno));
        return 1;
    }
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%d\" "
            "height=\"%d\" viewBox=\"0 0 %d %d\">\n"
            "<style>.h{font:bold 14px sans-serif}.t{font:12px sans-serif}"
            ".s{font:10px sans-serif}</style>\n"
            "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
            width, height, width, height);
    fprintf(f,
            "<text x=\"10\" y=\"20\" class=\"h\">moed expert cache: policy %s%s, hit rate "
            "%.1f%% (%llu hits, %llu misses), %llu requests</text>\n",
            s->policy ? s->policy : "?", s->prefetch ? "+prefetch" : "",
            s->total ? 100.0 * rate(s->total->hits, s->total->misses) : 0.0,
            (unsigned long long)(s->total ? s->total->hits : 0),
            (unsigned long long)(s->total ? s->total->misses : 0), (unsigned long long)s->requests);
    y = 40;
    for (size_t i = 0; i < s->n_models; i++)
        y += plot_model(f, s->models[i], y);
    fprintf(f, "</svg>\n");
    if (fclose(f) != 0) {
        errorf("stats: --plot %s: %s", path, strerror(errno));
        return 1;
    }
    return 0;
}
