#!/usr/bin/python3
"""moectl stats --plot, rendered and looked at.

A stand-in for moed (Python's grpcio, answering moe.v1.Control/Stats with
statistics made here) gives moectl a DeepSeek-V3-sized model (58 MoE layers x
256 experts, most experts never used) and a small one (3 x 8).  The SVG
moectl writes is rendered to PNG by rsvg-convert (librsvg2-bin) and read
with PIL (python3-pil), and checked as an operator would look at it:

- the figure is at most 1000 px wide for 256 experts, and nothing of it is
  cut at an edge (no ink in the outer 4 px);
- each part (title, model headers, heat maps with their axes, colour scales,
  layer bars) is a group that, rendered alone, lies inside the figure and
  overlaps no other part;
- each map has its axes: layer labels, expert ticks, axis titles; each
  colour scale has ticks and the "no data" swatch;
- cells of experts that had no requests are grey, not the white of the
  background, and unlike any colour on the scales;
- percentages have one decimal where it matters: 997 of 1000 is 99.7%,
  9996 of 10000 is ">99.9%", never 100%, which only an exact 100% reads.

Exit 0 pass, 1 fail, 77 skip (grpcio, numpy, PIL or rsvg-convert missing).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent import futures

try:
    import grpc
    import numpy as np
    from PIL import Image
    from moedtest import check, finish, stubs
except ImportError as e:
    print(f"SKIP: {e} (scripts/deps.sh installs python3-grpcio, python3-grpc-tools, "
          f"python3-numpy and python3-pil)")
    sys.exit(77)

SVG = "{http://www.w3.org/2000/svg}"


def make_stats(pb):
    """Two models: 58 x 256 with most experts unused, and 3 x 8."""
    s = pb.StatsResponse(policy="routing", prefetch=True, requests=123456)
    rng = np.random.default_rng(5)
    big = s.models.add(name="deepseek-v3", bad_experts=1)
    layers = list(range(3, 61))
    rates = {3: (997, 3), 4: (9996, 4), 5: (1000, 0), 6: (0, 0), 7: (0, 25)}
    for layer in layers:
        hits, misses = rates.get(layer, (int(rng.integers(100, 1000)), int(rng.integers(1, 50))))
        big.layers.add(layer=layer, counters=pb.CacheCounters(hits=hits, misses=misses))
        for e in range(256):
            used = (e * 7 + layer) % 5 == 0 and layer != 6
            load = int(rng.integers(1, 400)) if used else 0
            miss = min(load, int(rng.integers(0, 20)))
            big.experts.add(layer=layer, expert=e, bad=(layer, e) == (10, 10),
                            counters=pb.CacheCounters(hits=load - miss, misses=miss))
    small = s.models.add(name="mix")
    for layer, (hits, misses) in enumerate([(997, 3), (9996, 4), (50, 0)]):
        small.layers.add(layer=layer, counters=pb.CacheCounters(hits=hits, misses=misses))
        for e in range(8):
            load = 0 if e == 5 else 10 * (e + 1)
            small.experts.add(layer=layer, expert=e,
                              counters=pb.CacheCounters(hits=load - load // 10,
                                                        misses=load // 10))
    s.total.hits = sum(x.counters.hits for m in s.models for x in m.layers)
    s.total.misses = sum(x.counters.misses for m in s.models for x in m.layers)
    return s


def serve(pb, pbg, stats):
    class Control(pbg.ControlServicer):
        def Stats(self, request, context):
            if not request.experts:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "--plot must ask for experts")
            return stats
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pbg.add_ControlServicer_to_server(Control(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def render(svg, png):
    p = subprocess.run(["rsvg-convert", "-o", png, svg], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"rsvg-convert {svg}: {p.stderr}")
    return np.asarray(Image.open(png).convert("RGBA")).astype(int)


def ink_box(img):
    """(x0, y0, x1, y1) of the pixels drawn (alpha > 0), or None."""
    ys, xs = np.nonzero(img[:, :, 3] > 16)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    w = a.workdir
    if not shutil.which("rsvg-convert"):
        print("SKIP: rsvg-convert is not installed (scripts/deps.sh installs librsvg2-bin)")
        return 77
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    protos = stubs(a.source, w)
    if not protos:
        return finish()
    pb, pbg = protos[0], protos[1]
    stats = make_stats(pb)
    server, port = serve(pb, pbg, stats)
    try:
        svg = f"{w}/stats.svg"
        p = subprocess.run([a.moectl, "stats", "--plot", svg, "--remote", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
        check("moectl stats --plot against a stand-in moed", p.returncode == 0
              and f"wrote {svg}" in p.stdout, p.stdout + p.stderr)
        if p.returncode != 0:
            return finish()
    finally:
        server.stop(0)

    tree = ET.parse(svg)
    root = tree.getroot()
    width, height = int(root.get("width")), int(root.get("height"))
    check("256 experts: the figure is at most 1000 px wide", width <= 1000, f"{width} px")
    img = render(svg, f"{w}/stats.png")
    check("rsvg-convert renders it at its size", img.shape[:2] == (height, width),
          f"{img.shape} for {width}x{height}")
    rgb = img[:, :, :3]
    bg = np.array([255, 255, 255])
    ink = np.any(np.abs(rgb - bg) > 24, axis=2)
    edge = np.concatenate([ink[:4].ravel(), ink[-4:].ravel(), ink[:, :4].ravel(),
                           ink[:, -4:].ravel()])
    check("nothing cut at the edges: no ink in the outer 4 px", not edge.any(),
          f"{int(edge.sum())} px")

    # Each part alone: inside the figure, overlapping no other part.
    groups = [g.get("id") for g in root if g.tag == f"{SVG}g" and g.get("id")]
    want = {"title"} | {f"m{i}-{part}" for i in range(2)
                        for part in ("header", "load", "load-legend", "rate", "rate-legend",
                                     "layers")}
    check("the parts: title, and per model its header, maps, colour scales, layer bars",
          want <= set(groups), f"{groups}")
    if not want <= set(groups):
        return finish()
    boxes = {}
    for gid in groups:
        alone = ET.parse(svg)
        r = alone.getroot()
        for child in list(r):
            if child.tag in (f"{SVG}g", f"{SVG}rect") and child.get("id") != gid:
                r.remove(child)
        alone.write(f"{w}/part.svg")
        boxes[gid] = ink_box(render(f"{w}/part.svg", f"{w}/part.png"))
    inside = {g: b for g, b in boxes.items()
              if not b or b[0] < 4 or b[1] < 4 or b[2] > width - 4 or b[3] > height - 4}
    check("every part drawn, and inside the figure (the title not cut)", not inside,
          f"{inside} in {width}x{height}")
    clash = [(x, y, boxes[x], boxes[y]) for i, x in enumerate(groups) for y in groups[i + 1:]
             if boxes[x] and boxes[y] and overlap(boxes[x], boxes[y])]
    check("no part overlaps another (legends clear of the charts)", not clash, f"{clash}")

    # Axes, ticks and scales.
    for i in range(2):
        for part in ("load", "rate"):
            g = root.find(f"{SVG}g[@id='m{i}-{part}']")
            texts = [t.text or "" for t in g.iter(f"{SVG}text")]
            ticks = [t for t in texts if re.fullmatch(r"\d+", t)]
            check(f"model {i} {part} map: axis titles and tick labels",
                  "expert" in texts and "MoE layer" in texts and len(ticks) >= 4
                  and len(g.findall(f"{SVG}line")) >= 4, f"{texts[:12]}")
            leg = root.find(f"{SVG}g[@id='m{i}-{part}-legend']")
            ltexts = [t.text or "" for t in leg.iter(f"{SVG}text")]
            check(f"model {i} {part} colour scale: gradient, ticks, no-data swatch",
                  leg.find(f".//{SVG}linearGradient") is not None and len(ltexts) >= 4
                  and any(t.startswith("no ") for t in ltexts), f"{ltexts}")
    g = root.find(f"{SVG}g[@id='m1-layers']")
    texts = [t.text or "" for t in g.iter(f"{SVG}text")]
    check("layer bars: a 0-100% axis", {"0%", "50%", "100%", "hit rate"} <= set(texts), texts)

    # Empty cells: grey, visible on white, off both colour scales.
    def cell_color(model, part, pattern):
        g = root.find(f"{SVG}g[@id='m{model}-{part}']")
        for rect in g.iter(f"{SVG}rect"):
            t = rect.find(f"{SVG}title")
            if t is not None and re.search(pattern, t.text):
                x = float(rect.get("x")) + float(rect.get("width")) / 2
                y = float(rect.get("y")) + float(rect.get("height")) / 2
                return rgb[int(y), int(x)], rect.get("fill")
        return None, None
    for model, layer, expert in ((0, 6, 0), (1, 1, 5)):
        empty, fill = cell_color(model, "load", rf"^layer {layer} expert {expert}: 0 uses")
        busy, _ = cell_color(model, "load", r": [1-9]\d* uses")
        nodata, _ = cell_color(model, "rate", rf"^layer {layer} expert {expert}: hit rate n/a")
        low, _ = cell_color(model, "rate", r"hit rate 0%")
        ok = (empty is not None and busy is not None and nodata is not None
              and np.abs(empty - bg).max() >= 48 and np.abs(empty - busy).max() >= 24
              and np.all(np.abs(empty - nodata) <= 2)
              and max(empty) - min(empty) <= 4)  # grey
        check(f"model {model}: a cell without requests is grey, distinct from the background "
              "and the scales", ok, f"empty {empty} ({fill}), used {busy}, n/a {nodata}, "
              f"0% {low}")

    # Percentages.
    def bar_title(model, layer):
        g = root.find(f"{SVG}g[@id='m{model}-layers']")
        for t in g.iter(f"{SVG}title"):
            if t.text.startswith(f"layer {layer}: "):
                return t.text
        return ""
    for model, layer, want in ((0, 3, "hit rate 99.7%"), (0, 4, "hit rate >99.9%"),
                               (0, 5, "hit rate 100%"), (0, 6, "hit rate n/a"),
                               (0, 7, "hit rate 0%"), (1, 0, "hit rate 99.7%"),
                               (1, 2, "hit rate 100%")):
        check(f"model {model} layer {layer}: '{want}'", want in bar_title(model, layer),
              bar_title(model, layer))
    labels = [t.text for t in root.find(f"{SVG}g[@id='m1-layers']").iter(f"{SVG}text")
              if t.text and t.text.endswith("%") and t.get("text-anchor") is None]
    check("small model: the layer bars labelled 99.7%, >99.9%, 100%",
          labels == ["99.7%", ">99.9%", "100%"], f"{labels}")
    title = " ".join(t.text for t in root.find(f"{SVG}g[@id='title']").iter(f"{SVG}text"))
    check("the title says the policy and the overall hit rate with one decimal",
          "routing+prefetch" in title and re.search(r"hit rate \d+\.\d%", title), title)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
