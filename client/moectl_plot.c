/*
 * moectl stats --plot FILE.svg: a picture of moed's cache statistics that an
 * operator can read at a glance.  Plain SVG 1.1, no scripts, no external
 * fonts, readable by any browser and by rsvg-convert.
 *
 * Layout, top to bottom, in a figure at most MAX_WIDTH px wide whatever the
 * number of experts:
 *   title       two lines: what it is, then policy, hit rate and calls;
 *   per model   a header line, then two heat maps (rows: MoE layers,
 *               columns: experts): the load of each expert (hits + misses)
 *               and its hit rate, each with a caption, an axis of layers
 *               (left), an axis of experts (below) and its colour scale
 *               (below that, clear of the maps); beside the hit-rate map,
 *               bars of each layer's hit rate on a 0-100% axis.
 * Cells shrink to fit the width; past MIN_CELL px per expert the experts
 * wrap into bands of the same rows (expert axis labelled per band).  A cell
 * that had no requests is grey, never the background's white, and its
 * swatch is in the legend.  Percentages have one decimal, and only an exact
 * 100% (or 0%) is written so: 99.96% is ">99.9%".
 *
 * Each part is a top-level <g id=...> (title, mN-header, mN-load,
 * mN-load-legend, mN-rate, mN-rate-legend, mN-layers), so that a test can
 * render each alone and check that none overlaps another.  Cells and bars
 * carry a <title> (their numbers, shown on hover); nothing else does.
 */
#include "moectl.h"

#include "common.h"
#include "moe.pb-c.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WIDTH 1000 /* px of the figure, at most */
#define MIN_WIDTH 720  /* px: room for the title's second line */
#define MARGIN 16      /* px of white around everything */
#define LEFT 76        /* px left of the maps: axis title and layer labels */
#define MAP_W 640      /* px of a heat map, at most */
#define MAX_CELL_W 40  /* px per expert, at most */
#define MAX_CELL_H 16  /* px per layer, at most */
#define MIN_CELL 3     /* px per expert, at least (else the experts wrap) */
#define ROWS_H 480     /* px a map's rows aim for, all bands together */
#define LEGEND_W 330   /* px of a colour scale with its "no data" swatch */
#define SCALE_W 200    /* px of the colour bar */
#define BAR_GAP 48     /* px between the maps (or legends) and the layer bars */
#define BAR_W 150      /* px of 100% in the layer bars */
#define BAR_LABEL 52   /* px right of the bars for "99.7%" */
#define CAPTION_H 22   /* px above a map for its caption */
#define AXIS_H 30      /* px below a band for ticks and their labels */
#define AXIS_TITLE_H 16
#define LEGEND_H 44 /* px of a colour scale: gap, bar, tick labels */
#define HEADER_H 30 /* px of a model's header line */
#define MAX_ROWS 1024

#define GREY_NONE "rgb(190,190,190)" /* no requests: neither white nor on a scale */
#define AXIS_COLOR "rgb(90,90,90)"
#define BAD_STROKE " stroke=\"black\" stroke-width=\"1.5\"" /* a bad expert's cell */

struct stop {
    double at;
    int r, g, b;
};

/* Load: light green to dark blue (YlGnBu without its near-white end). */
static const struct stop load_stops[] = {
    {0.0, 199, 233, 180}, {0.33, 65, 182, 196}, {0.67, 34, 94, 168}, {1.0, 8, 29, 88}};
/* Hit rate: red (always paged in) to yellow to green (always resident). */
static const struct stop rate_stops[] = {
    {0.0, 215, 48, 39}, {0.5, 254, 224, 139}, {1.0, 26, 152, 80}};

/* One model's geometry. */
struct geom {
    uint32_t n_rows, n_experts;
    uint32_t layer_of[MAX_ROWS]; /* the rows: layers with experts in the table, in order */
    int cell_w, cell_h;
    int per_band, n_bands; /* experts per band, bands */
    int map_w, band_h;     /* px of a band's cells */
    int content_w;         /* px of the maps or their legends, the wider */
    int map_block_h;       /* caption, bands with their axes, axis title, legend */
    int width;             /* px the model needs */
    int height;            /* px of the model's block */
};

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

/* A name, cut to 40 characters with "..." so that it fits its line. */
static void xml_name(FILE *f, const char *s)
{
    char buf[48];

    if (strlen(s) <= 40) {
        xml_text(f, s);
        return;
    }
    snprintf(buf, sizeof(buf), "%.37s...", s);
    xml_text(f, buf);
}

static void scale_color(const struct stop *st, size_t n, double v, char *buf, size_t len)
{
    size_t i = 0;
    double t;

    v = v < 0 ? 0 : v > 1 ? 1 : v;
    while (i + 2 < n && v > st[i + 1].at)
        i++;
    t = (v - st[i].at) / (st[i + 1].at - st[i].at);
    snprintf(buf, len, "rgb(%d,%d,%d)", (int)(st[i].r + t * (st[i + 1].r - st[i].r) + 0.5),
             (int)(st[i].g + t * (st[i + 1].g - st[i].g) + 0.5),
             (int)(st[i].b + t * (st[i + 1].b - st[i].b) + 0.5));
}

static double rate(uint64_t hits, uint64_t misses)
{
    return hits + misses ? (double)hits / (double)(hits + misses) : 0.0;
}

/* hits of hits + misses as a percentage with one decimal: "100%" and "0%"
 * only when exact, ">99.9%" and "<0.1%" next to them, "n/a" for none. */
static const char *pct(uint64_t hits, uint64_t misses, char *buf, size_t len)
{
    double v = 100.0 * rate(hits, misses);

    if (hits + misses == 0)
        snprintf(buf, len, "n/a");
    else if (misses == 0)
        snprintf(buf, len, "100%%");
    else if (hits == 0)
        snprintf(buf, len, "0%%");
    else if (v >= 99.95)
        snprintf(buf, len, ">99.9%%");
    else if (v < 0.05)
        snprintf(buf, len, "<0.1%%");
    else
        snprintf(buf, len, "%.1f%%", v);
    return buf;
}

/* A step of 1, 2 or 5 x 10^k that cuts [0, max] into at most n parts. */
static uint64_t nice_step(uint64_t max, int n)
{
    uint64_t step = 1;

    for (;;) {
        static const int mult[] = {1, 2, 5};

        for (size_t i = 0; i < MOE_ARRAY_SIZE(mult); i++)
            if (max / (step * (uint64_t)mult[i]) <= (uint64_t)n)
                return step * (uint64_t)mult[i];
        step *= 10;
    }
}

/* The rows and cell sizes of model m; false when it has no expert table. */
static bool layout(const Moe__V1__ModelStats *m, struct geom *g)
{
    memset(g, 0, sizeof(*g));
    for (size_t i = 0; i < m->n_experts; i++) {
        const Moe__V1__ExpertStats *e = m->experts[i];

        if (e->expert >= 65536)
            continue; /* not a real model's: caps the picture */
        g->n_experts = MOE_MAX(g->n_experts, e->expert + 1);
        if (g->n_rows == 0 || g->layer_of[g->n_rows - 1] != e->layer) {
            if (g->n_rows == MAX_ROWS)
                break;
            g->layer_of[g->n_rows++] = e->layer;
        }
    }
    if (!g->n_rows || !g->n_experts)
        return false;
    /* As few bands as keep cells MIN_CELL wide, the experts shared evenly. */
    g->n_bands = ((int)g->n_experts + MAP_W / MIN_CELL - 1) / (MAP_W / MIN_CELL);
    g->per_band = ((int)g->n_experts + g->n_bands - 1) / g->n_bands;
    g->cell_w = MOE_MIN(MAX_CELL_W, MAP_W / g->per_band);
    g->cell_h = MOE_MAX(3, MOE_MIN(MAX_CELL_H, ROWS_H / ((int)g->n_rows * g->n_bands)));
    g->map_w = g->per_band * g->cell_w;
    g->band_h = (int)g->n_rows * g->cell_h;
    g->content_w = MOE_MAX(g->map_w, LEGEND_W);
    g->map_block_h = CAPTION_H + g->n_bands * (g->band_h + AXIS_H) + AXIS_TITLE_H + LEGEND_H;
    g->width = LEFT + g->content_w + BAR_GAP + BAR_W + BAR_LABEL + MARGIN;
    g->height = HEADER_H + 2 * g->map_block_h + 16;
    return true;
}

/* Row of layer, or -1. */
static int row_of(const struct geom *g, uint32_t layer)
{
    for (uint32_t r = 0; r < g->n_rows; r++)
        if (g->layer_of[r] == layer)
            return (int)r;
    return -1;
}

/* Top of band b of a map whose block starts at y. */
static int band_y(const struct geom *g, int y, int b)
{
    return y + CAPTION_H + b * (g->band_h + AXIS_H);
}

/* Axes of a map at y: a frame around each band, layer labels and ticks on
 * the left, expert ticks below each band, the axis titles. */
static void map_axes(FILE *f, const struct geom *g, int y)
{
    int every = (11 + g->cell_h - 1) / g->cell_h; /* rows per layer label: 11 px apart */
    int xstep = (int)nice_step((uint64_t)g->per_band, MOE_MAX(1, g->map_w / 48));

    /* Expert ticks at least 48 px apart, in steps of 1, 2, 5, 10, ... */
    if (xstep * g->cell_w < 48)
        xstep = (int)nice_step((uint64_t)(48 / g->cell_w), 1);
    for (int b = 0; b < g->n_bands; b++) {
        int by = band_y(g, y, b);
        int first = b * g->per_band;
        int n = MOE_MIN(g->per_band, (int)g->n_experts - first);

        fprintf(f,
                "<rect x=\"%.1f\" y=\"%.1f\" width=\"%d\" height=\"%d\" fill=\"none\" "
                "stroke=\"%s\" stroke-width=\"1\"/>\n",
                LEFT - 0.5, by - 0.5, n * g->cell_w + 1, g->band_h + 1, AXIS_COLOR);
        for (uint32_t r = 0; r < g->n_rows; r += (uint32_t)every) {
            int cy = by + (int)r * g->cell_h + g->cell_h / 2;

            fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\"/>\n", LEFT - 4,
                    cy, LEFT - 1, cy, AXIS_COLOR);
            fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"s\" text-anchor=\"end\">%u</text>\n",
                    LEFT - 6, cy + 4, g->layer_of[r]);
        }
        for (int x = 0; x < n; x++) {
            int ex = first + x, cx;

            if (ex % xstep && x != 0)
                continue;
            cx = LEFT + x * g->cell_w + g->cell_w / 2;
            fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\"/>\n", cx,
                    by + g->band_h + 1, cx, by + g->band_h + 5, AXIS_COLOR);
            /* the band's first expert is labelled only on a tick or alone */
            if (ex % xstep == 0 || (x == 0 && (xstep - ex % xstep) * g->cell_w >= 36))
                fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"s\" text-anchor=\"middle\">%d</text>\n",
                        cx, by + g->band_h + 17, ex);
        }
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"t\" text-anchor=\"middle\">expert</text>\n",
            LEFT + g->map_w / 2, band_y(g, y, g->n_bands) + 4);
    fprintf(f,
            "<text class=\"t\" text-anchor=\"middle\" transform=\"translate(%d,%d) "
            "rotate(-90)\">MoE layer</text>\n",
            MARGIN + 6, y + CAPTION_H + g->band_h / 2);
}

/* A colour scale at (x, y): gradient bar, ticks at values tick_at (0..1)
 * labelled tick_text, and the "no data" swatch with its words. */
static void legend(FILE *f, const char *id, int x, int y, const char *caption,
                   const struct stop *st, size_t n_st, const double *tick_at, char tick_text[][24],
                   int n_ticks, const char *none)
{
    char col[32];

    fprintf(f, "<g id=\"%s\">\n<defs><linearGradient id=\"%s-g\">", id, id);
    for (size_t i = 0; i < n_st; i++) {
        scale_color(st, n_st, st[i].at, col, sizeof(col));
        fprintf(f, "<stop offset=\"%g\" stop-color=\"%s\"/>", st[i].at, col);
    }
    fprintf(f, "</linearGradient></defs>\n");
    fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"s\">", x, y + 10);
    xml_text(f, caption);
    fprintf(f, "</text>\n");
    fprintf(f,
            "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"10\" fill=\"url(#%s-g)\" "
            "stroke=\"%s\" stroke-width=\"0.5\"/>\n",
            x, y + 15, SCALE_W, id, AXIS_COLOR);
    for (int i = 0; i < n_ticks; i++) {
        int tx = x + (int)(tick_at[i] * SCALE_W + 0.5);

        fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\"/>\n", tx, y + 25,
                tx, y + 29, AXIS_COLOR);
        fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"s\" text-anchor=\"middle\">%s</text>\n", tx,
                y + 40, tick_text[i]);
    }
    fprintf(f,
            "<rect x=\"%d\" y=\"%d\" width=\"10\" height=\"10\" fill=\"%s\" stroke=\"%s\" "
            "stroke-width=\"0.5\"/>\n",
            x + SCALE_W + 24, y + 15, GREY_NONE, AXIS_COLOR);
    fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"s\">%s</text>\n", x + SCALE_W + 40, y + 24, none);
    fprintf(f, "</g>\n");
}

/* Cell of expert e in row r of a map at y. */
static void cell_xy(const struct geom *g, int y, uint32_t expert, int r, int *x, int *cy)
{
    int b = (int)expert / g->per_band;

    *x = LEFT + ((int)expert % g->per_band) * g->cell_w;
    *cy = band_y(g, y, b) + r * g->cell_h;
}

/* One model's block at y (g from layout()). */
static void plot_model(FILE *f, int idx, const Moe__V1__ModelStats *m, const struct geom *g, int y)
{
    uint64_t max_load = 0, hits = 0, misses = 0;
    int y_load = y + HEADER_H, y_rate = y_load + g->map_block_h + 16;
    char col[32], p[16], id[32];

    for (size_t i = 0; i < m->n_experts; i++) {
        const Moe__V1__ExpertStats *e = m->experts[i];

        if (e->counters)
            max_load = MOE_MAX(max_load, e->counters->hits + e->counters->misses);
    }
    for (size_t i = 0; i < m->n_layers; i++)
        if (m->layers[i]->counters) {
            hits += m->layers[i]->counters->hits;
            misses += m->layers[i]->counters->misses;
        }

    fprintf(f, "<g id=\"m%d-header\">\n<text x=\"%d\" y=\"%d\" class=\"h\">model ", idx, MARGIN,
            y + 18);
    xml_name(f, m->name);
    fprintf(f, ": %u MoE layers x %u experts, hit rate %s", g->n_rows, g->n_experts,
            pct(hits, misses, p, sizeof(p)));
    if (m->bad_experts)
        fprintf(f, ", %u bad (outlined)", m->bad_experts);
    fprintf(f, "</text>\n</g>\n");

    /* load map */
    fprintf(f, "<g id=\"m%d-load\">\n", idx);
    fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"t\">Load of each expert (hits + misses)</text>\n",
            LEFT, y_load + 14);
    for (size_t i = 0; i < m->n_experts; i++) {
        const Moe__V1__ExpertStats *e = m->experts[i];
        uint64_t hi = e->counters ? e->counters->hits : 0,
                 mi = e->counters ? e->counters->misses : 0;
        int r = row_of(g, e->layer), x, cy;

        if (r < 0 || e->expert >= g->n_experts)
            continue;
        cell_xy(g, y_load, e->expert, r, &x, &cy);
        if (hi + mi)
            scale_color(load_stops, MOE_ARRAY_SIZE(load_stops),
                        (double)(hi + mi) / (double)max_load, col, sizeof(col));
        else
            snprintf(col, sizeof(col), GREY_NONE);
        fprintf(f,
                "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\"%s><title>layer "
                "%u expert %u: %llu uses (%llu hits, %llu misses)%s</title></rect>\n",
                x, cy, g->cell_w, g->cell_h, col, e->bad ? BAD_STROKE : "", e->layer, e->expert,
                (unsigned long long)(hi + mi), (unsigned long long)hi, (unsigned long long)mi,
                e->bad ? ", bad" : "");
    }
    map_axes(f, g, y_load);
    fprintf(f, "</g>\n");
    {
        uint64_t step = nice_step(MOE_MAX(1, max_load), 4);
        double at[9];
        char text[9][24];
        int n = 0;

        for (uint64_t v = 0; v <= max_load && n < 7; v += step, n++) {
            at[n] = max_load ? (double)v / (double)max_load : 0;
            snprintf(text[n], sizeof(text[n]), "%llu", (unsigned long long)v);
        }
        /* The busiest expert's load at the end, where the ticks stop short. */
        if (max_load && at[n - 1] <= 0.8) {
            at[n] = 1;
            snprintf(text[n++], sizeof(text[0]), "%llu", (unsigned long long)max_load);
        }
        snprintf(id, sizeof(id), "m%d-load-legend", idx);
        legend(f, id, LEFT, band_y(g, y_load, g->n_bands) + AXIS_TITLE_H,
               "uses per expert (darker: busier)", load_stops, MOE_ARRAY_SIZE(load_stops), at, text,
               n, "no uses");
    }

    /* hit-rate map */
    fprintf(f, "<g id=\"m%d-rate\">\n", idx);
    fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"t\">Hit rate of each expert</text>\n", LEFT,
            y_rate + 14);
    for (size_t i = 0; i < m->n_experts; i++) {
        const Moe__V1__ExpertStats *e = m->experts[i];
        uint64_t hi = e->counters ? e->counters->hits : 0,
                 mi = e->counters ? e->counters->misses : 0;
        int r = row_of(g, e->layer), x, cy;

        if (r < 0 || e->expert >= g->n_experts)
            continue;
        cell_xy(g, y_rate, e->expert, r, &x, &cy);
        if (hi + mi)
            scale_color(rate_stops, MOE_ARRAY_SIZE(rate_stops), rate(hi, mi), col, sizeof(col));
        else
            snprintf(col, sizeof(col), GREY_NONE);
        fprintf(f,
                "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\"%s><title>layer "
                "%u expert %u: hit rate %s%s</title></rect>\n",
                x, cy, g->cell_w, g->cell_h, col, e->bad ? BAD_STROKE : "", e->layer, e->expert,
                pct(hi, mi, p, sizeof(p)), e->bad ? ", bad" : "");
    }
    map_axes(f, g, y_rate);
    fprintf(f, "</g>\n");
    {
        static const double at[] = {0, 0.25, 0.5, 0.75, 1};
        char text[5][24] = {"0%", "25%", "50%", "75%", "100%"};

        snprintf(id, sizeof(id), "m%d-rate-legend", idx);
        legend(f, id, LEFT, band_y(g, y_rate, g->n_bands) + AXIS_TITLE_H,
               "hit rate: red always paged in, green always resident", rate_stops,
               MOE_ARRAY_SIZE(rate_stops), at, text, 5, "no requests");
    }

    /* per-layer hit rate, beside the hit-rate map, on its rows */
    {
        int bx = LEFT + g->content_w + BAR_GAP, by = band_y(g, y_rate, 0);

        fprintf(f, "<g id=\"m%d-layers\">\n", idx);
        fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"t\">Hit rate per layer</text>\n", bx,
                y_rate + 14);
        for (int t = 0; t <= 4; t++) {
            int tx = bx + t * BAR_W / 4;

            fprintf(f,
                    "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"rgb(225,225,225)\"/>\n",
                    tx, by, tx, by + g->band_h);
            fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\"/>\n", tx,
                    by + g->band_h + 1, tx, by + g->band_h + 5, AXIS_COLOR);
            fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"s\" text-anchor=\"middle\">%d%%</text>\n",
                    tx, by + g->band_h + 17, 25 * t);
        }
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"%s\"/>\n"
                "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"%s\"/>\n",
                bx - 0.5, by, bx - 0.5, by + g->band_h + 1, AXIS_COLOR, bx, by + g->band_h + 0.5,
                bx + BAR_W, by + g->band_h + 0.5, AXIS_COLOR);
        for (size_t i = 0; i < m->n_layers; i++) {
            const Moe__V1__LayerStats *l = m->layers[i];
            uint64_t hi = l->counters ? l->counters->hits : 0;
            uint64_t mi = l->counters ? l->counters->misses : 0;
            int r = row_of(g, l->layer), ry, bh;

            if (r < 0)
                continue;
            ry = by + r * g->cell_h + (g->cell_h >= 5 ? 1 : 0);
            bh = MOE_MAX(1, g->cell_h - (g->cell_h >= 5 ? 2 : 0));
            pct(hi, mi, p, sizeof(p));
            fprintf(f,
                    "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\">"
                    "<title>layer %u: hit rate %s (%llu hits, %llu misses)</title></rect>\n",
                    bx, ry, hi + mi ? (int)(BAR_W * rate(hi, mi) + 0.5) : 3, bh,
                    hi + mi ? "rgb(70,130,180)" : GREY_NONE, l->layer, p, (unsigned long long)hi,
                    (unsigned long long)mi);
            if (g->cell_h >= 10)
                fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"s\">%s</text>\n", bx + BAR_W + 6,
                        by + r * g->cell_h + g->cell_h / 2 + 4, p);
        }
        fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"t\" text-anchor=\"middle\">hit rate</text>\n",
                bx + BAR_W / 2, by + g->band_h + AXIS_H + 4);
        fprintf(f, "</g>\n");
    }
}

int moectl_plot_stats(const Moe__V1__StatsResponse *s, const char *path)
{
    const char *dot = strrchr(path, '.');
    struct geom *g = NULL;
    int height = MARGIN + 44, width = MIN_WIDTH, y, r = 0;
    char p[16];
    FILE *f;

    if (!dot || strcmp(dot, ".svg") != 0) {
        errorf("stats: --plot %s: only SVG pictures are written (name the file .svg)", path);
        return 2;
    }
    g = calloc(MOE_MAX(1, s->n_models), sizeof(*g));
    if (!g) {
        errorf("stats: --plot %s: out of memory", path);
        return 1;
    }
    for (size_t i = 0; i < s->n_models; i++) {
        if (layout(s->models[i], &g[i])) {
            height += g[i].height;
            width = MOE_MAX(width, g[i].width);
        } else {
            height += HEADER_H;
        }
    }
    width = MOE_MIN(width, MAX_WIDTH);
    height += MARGIN;
    f = fopen(path, "w");
    if (!f) {
        errorf("stats: --plot %s: %s", path, strerror(errno));
        free(g);
        return 1;
    }
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%d\" "
            "height=\"%d\" viewBox=\"0 0 %d %d\">\n"
            "<style>text{fill:rgb(30,30,30)}.h{font:bold 15px sans-serif}"
            ".t{font:12px sans-serif}.s{font:10px sans-serif}</style>\n"
            "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
            width, height, width, height);
    fprintf(f, "<g id=\"title\">\n<text x=\"%d\" y=\"%d\" class=\"h\">moed expert cache</text>\n",
            MARGIN, MARGIN + 14);
    fprintf(f, "<text x=\"%d\" y=\"%d\" class=\"t\">policy ", MARGIN, MARGIN + 32);
    xml_name(f, s->policy ? s->policy : "?");
    fprintf(f, "%s, hit rate %s (%llu hits, %llu misses), %llu layer calls</text>\n</g>\n",
            s->prefetch ? "+prefetch" : "",
            pct(s->total ? s->total->hits : 0, s->total ? s->total->misses : 0, p, sizeof(p)),
            (unsigned long long)(s->total ? s->total->hits : 0),
            (unsigned long long)(s->total ? s->total->misses : 0), (unsigned long long)s->requests);
    y = MARGIN + 44;
    for (size_t i = 0; i < s->n_models; i++) {
        if (g[i].n_rows) {
            plot_model(f, (int)i, s->models[i], &g[i], y);
            y += g[i].height;
        } else {
            fprintf(f, "<g id=\"m%zu-header\">\n<text x=\"%d\" y=\"%d\" class=\"t\">model ", i,
                    MARGIN, y + 18);
            xml_name(f, s->models[i]->name);
            fprintf(f, ": no per-expert statistics</text>\n</g>\n");
            y += HEADER_H;
        }
    }
    fprintf(f, "</svg>\n");
    if (fclose(f) != 0) {
        errorf("stats: --plot %s: %s", path, strerror(errno));
        r = 1;
    }
    free(g);
    return r;
}
