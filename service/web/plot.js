// The per-frame trace of a movie as plain SVG, drawn here (no plotting library, nothing
// fetched from a network): the mean of every frame with one marker per frame, the std of
// every frame below it, a cursor on the selected frame. Frames whose mean stands apart from
// the rest of the movie (blanked, dropped, a shutter glitch) get a red marker; one whose
// value lies outside the axis of the usual frames is drawn at its value past a visible
// axis break, labelled with that value.

const SVG = "http://www.w3.org/2000/svg";
const MARGIN = {left: 56, right: 12, top: 6, bottom: 28};
const PANELS = [{key: "mean", height: 120, ticks: 4}, {key: "std", height: 44, ticks: 2}];
const GAP = 10;
// An axis break: a strip of STRIP px past a gap of BREAK px holds the values beyond the
// usual range, on a scale of their own, labelled.
const STRIP = 16, BREAK = 10, STRIP_PAD = 3, MAX_LABELS = 12;

const defined = (v) => v !== null && v !== undefined && Number.isFinite(v);

function node(name, attrs, parent) {
  const out = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) out.setAttribute(key, value);
  if (parent) parent.appendChild(out);
  return out;
}

function median(sorted) {
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** About `count` round values (1, 2 or 5 × 10ⁿ apart) covering [lo, hi]. */
export function ticks(lo, hi, count) {
  const raw = (hi - lo) / Math.max(1, count);
  if (!(raw > 0)) return [lo];
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const first = Math.ceil(lo / step) * step;
  const out = [];
  // by index, not by adding steps: no drift, and a bounded loop even where a step is
  // below the resolution of the values (huge means that barely differ)
  for (let i = 0; i <= 2 * count + 2 && first + i * step <= hi + step * 1e-9; i++) {
    out.push(Number((first + i * step).toPrecision(12)));
  }
  return out;
}

/** For each frame: does its mean stand apart? Undefined means do; so does a mean more than
 * 20 % of the median frame mean (or 5 robust standard deviations of the frame means,
 * whichever is wider) from that median. Gradual dose fall-off stays inside. */
export function oddFrames(mean) {
  const known = mean.filter(defined).sort((a, b) => a - b);
  if (!known.length) return mean.map(() => false);
  const centre = median(known);
  const spread = median(known.map((v) => Math.abs(v - centre)).sort((a, b) => a - b));
  const limit = Math.max(5 * 1.4826 * spread, 0.2 * Math.abs(centre));
  return mean.map((v) => !defined(v) || Math.abs(v - centre) > limit);
}

/** Three significant digits, without exponent noise for everyday magnitudes. */
export function number(v) {
  if (!defined(v)) return "–";
  if (v !== 0 && (Math.abs(v) >= 1e6 || Math.abs(v) < 1e-3)) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

/** One line about frame k of a frame-statistics series. */
export function describe(series, k) {
  return `frame ${k}: mean ${number(series.mean[k])} ± ${number(series.std[k])}, ` +
    `min ${number(series.min[k])}, max ${number(series.max[k])}`;
}

/** Runs of consecutive frames where `drawn(k)`: the line breaks at the others. */
function runs(n, drawn) {
  const out = [];
  let run = [];
  for (let k = 0; k < n; k++) {
    if (drawn(k)) { run.push(k); continue; }
    if (run.length) out.push(run);
    run = [];
  }
  if (run.length) out.push(run);
  return out;
}

/** The value range of the frames that do not stand out (else of all), padded by 10 %. */
function range(values, odd) {
  const usual = values.filter((v, k) => defined(v) && !odd[k]);
  const known = usual.length ? usual : values.filter(defined);
  if (!known.length) return [0, 1];
  const lo = known.reduce((a, b) => Math.min(a, b)), hi = known.reduce((a, b) => Math.max(a, b));
  const pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.05 || 1;
  return [lo - pad, hi + pad];
}

/** The panel's vertical scale: the usual range [lo, hi] in the middle band, and for
 * values below lo (above hi) a strip under (over) it past a gap, on a linear scale of
 * those values alone (taller when they differ, so that both ends can be labelled).
 * Returns {y(v), band: [top, bottom] of the usual range, strips}. */
function scale(panel, [lo, hi], outside) {
  const extent = (values) => (values.length ? [values.reduce((a, b) => Math.min(a, b)),
                                               values.reduce((a, b) => Math.max(a, b))] : null);
  const below = extent(outside.filter((v) => v < lo));
  const above = extent(outside.filter((v) => v > hi));
  const height = (ends) => (!ends ? 0 : ends[1] > ends[0] ? 2 * STRIP : STRIP);
  const top = panel.top + (above ? height(above) + BREAK : 0);
  const bottom = panel.top + panel.height - (below ? height(below) + BREAK : 0);
  const usual = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  const strips = [];
  const strip = ([min, max], stripTop, gap) => {
    const inner = height([min, max]) - 2 * STRIP_PAD;
    const at = (v) => (max > min ? stripTop + STRIP_PAD + (1 - (v - min) / (max - min)) * inner
                                 : stripTop + STRIP / 2);
    strips.push({min, max, at, gap});
    return at;
  };
  const under = below && strip(below, panel.top + panel.height - height(below),
                               bottom + BREAK / 2);
  const over = above && strip(above, panel.top, top - BREAK / 2);
  const y = (v) => (v < lo && under ? under(v) : v > hi && over ? over(v)
    : usual(Math.min(hi, Math.max(lo, v))));
  return {y, band: [top, bottom], strips};
}

/** The break between the usual range and a strip: a dashed line across the plot and a
 * double slash on the value axis, and the strip's values as ticks. */
function drawBreak(svg, strip, left, width) {
  node("line", {x1: left, x2: left + width, y1: strip.gap, y2: strip.gap, class: "break"}, svg);
  for (const dx of [-3, 3]) {
    node("line", {x1: left + dx - 4, x2: left + dx + 4, y1: strip.gap + 4, y2: strip.gap - 4,
                  class: "break-mark"}, svg);
  }
  for (const v of strip.max > strip.min ? [strip.min, strip.max] : [strip.min]) {
    node("text", {x: left - 6, y: strip.at(v), class: "tick y outside"}, svg).textContent =
      number(v);
  }
}

/**
 * The plot of `series` ({mean, std, min, max}, one value per frame, null where undefined):
 * the mean of each frame with a marker per frame (the main panel), and the std of each frame
 * below it, both scaled to the frames that do not stand out, so that a dose fall-off of a
 * few percent stays visible beside a blanked frame. A marker whose value is outside that
 * range sits at its value in a strip past an axis break (dashed line, a double slash on
 * the axis, the strip's own ticks), labelled with its value; an undefined one, hollow, at
 * the bottom.
 * `onPick(k)` is called when a frame is clicked, `onHover(k | null)` as the pointer moves.
 * Returns {svg, select(k), odd}: `select` moves the cursor, `odd` lists the flagged frames.
 */
export function framePlot(series, {width = 560, onPick, onHover} = {}) {
  const n = series.mean.length;
  const odd = oddFrames(series.mean);
  const w = width - MARGIN.left - MARGIN.right;
  const x = (k) => MARGIN.left + (n > 1 ? k / (n - 1) : 0.5) * w;
  const panels = PANELS.map((panel, i) => {
    const top = MARGIN.top + PANELS.slice(0, i).reduce((sum, p) => sum + p.height + GAP, 0);
    return {...panel, top, values: series[panel.key], span: range(series[panel.key], odd)};
  });
  // What each panel draws: a marker per frame on the main panel, lines of the frames that
  // do not stand out on the others.
  const drawn = (panel, k) => defined(panel.values[k]) && (panel === panels[0] || !odd[k]);
  const bottom = panels[panels.length - 1].top + panels[panels.length - 1].height;
  const height = bottom + MARGIN.bottom;
  const svg = node("svg", {viewBox: `0 0 ${width} ${height}`, class: "frame-plot", role: "img",
                           "aria-label": `mean and std of each of ${n} frames`});
  // Below the markers, so a click on a marker reaches it; both bubble to the svg.
  node("rect", {x: MARGIN.left, y: MARGIN.top, width: w, height: bottom - MARGIN.top,
                class: "hit"}, svg);
  for (const panel of panels) {
    const [lo, hi] = panel.span;
    const outside = panel.values.filter((v, k) => drawn(panel, k) && (v < lo || v > hi));
    Object.assign(panel, scale(panel, panel.span, outside));
    for (const strip of panel.strips) drawBreak(svg, strip, MARGIN.left, w);
    for (const v of ticks(lo, hi, panel.ticks)) {
      node("line", {x1: MARGIN.left, x2: MARGIN.left + w, y1: panel.y(v), y2: panel.y(v),
                    class: "grid"}, svg);
      const label = node("text", {x: MARGIN.left - 6, y: panel.y(v), class: "tick y"}, svg);
      label.textContent = number(v);
    }
    const middle = panel.top + panel.height / 2;
    node("text", {x: 12, y: middle, transform: `rotate(-90 12 ${middle})`, class: "axis name"},
         svg).textContent = panel.key;
    for (const run of runs(n, (k) => defined(panel.values[k]) && !odd[k])) {
      node("polyline", {points: run.map((k) => `${x(k)},${panel.y(panel.values[k])}`).join(" "),
                        class: `line ${panel.key}`}, svg);
    }
  }
  for (const k of ticks(0, Math.max(0, n - 1), Math.min(8, Math.max(1, n - 1)))) {
    if (!Number.isInteger(k)) continue;
    node("text", {x: x(k), y: bottom + 16, class: "tick x"}, svg).textContent = String(k);
  }
  node("text", {x: MARGIN.left + w, y: height - 2, class: "axis"}, svg).textContent = "frame";
  const cursor = node("line", {y1: MARGIN.top, y2: bottom, class: "cursor"}, svg);
  const main = panels[0];
  const radius = Math.max(1.5, Math.min(4, w / Math.max(1, n) / 2.5));
  const [lo, hi] = main.span;
  const beyond = (v) => defined(v) && (v < lo || v > hi);
  // Each value beyond the break is labelled, once per run of frames that read the same
  // (beside the run's last frame, clear of its markers).
  const labels = series.mean.flatMap((v, k) => (beyond(v) &&
    !(k + 1 < n && beyond(series.mean[k + 1]) && number(series.mean[k + 1]) === number(v))
    ? [k] : []));
  for (const k of labels.length <= MAX_LABELS ? labels : []) {
    const right = x(k) + radius + 3 + 40 <= MARGIN.left + w;
    node("text", {x: right ? x(k) + radius + 3 : x(k) - radius - 3, y: main.y(series.mean[k]),
                  class: `point-label${right ? "" : " left"}`, "data-frame": k}, svg)
      .textContent = number(series.mean[k]);
  }
  const points = series.mean.map((v, k) => {
    const classes = ["pt", odd[k] && "odd", !defined(v) && "missing",
                     beyond(v) && "outside"].filter(Boolean);
    const point = node("circle", {cx: x(k), cy: defined(v) ? main.y(v) : main.top + main.height,
                                  r: radius, class: classes.join(" "), "data-frame": k}, svg);
    node("title", {}, point).textContent = describe(series, k);
    return point;
  });

  const frameAt = (event) => {
    const p = new DOMPoint(event.clientX, event.clientY)
      .matrixTransform(svg.getScreenCTM().inverse());
    const k = n > 1 ? Math.round(((p.x - MARGIN.left) / w) * (n - 1)) : 0;
    return Math.min(n - 1, Math.max(0, k));
  };
  let hovered = null;
  const hover = (k) => {
    if (hovered !== null) points[hovered].classList.remove("hover");
    hovered = k;
    if (k !== null) points[k].classList.add("hover");
    if (onHover) onHover(k);
  };
  if (n) {
    svg.addEventListener("pointermove", (event) => hover(frameAt(event)));
    svg.addEventListener("pointerleave", () => hover(null));
    svg.addEventListener("click", (event) => onPick && onPick(frameAt(event)));
  }
  let selected = null;
  const select = (k) => {
    if (selected !== null && points[selected]) points[selected].classList.remove("sel");
    selected = n ? Math.min(n - 1, Math.max(0, k)) : null;
    if (selected === null) return;
    points[selected].classList.add("sel");
    cursor.setAttribute("x1", x(selected));
    cursor.setAttribute("x2", x(selected));
  };
  return {svg, select, odd: odd.flatMap((flag, k) => (flag ? [k] : []))};
}

const RATE_MARGIN = {left: 40, right: 12, top: 8, bottom: 24};
const MAX_SLOT = 40;   // px of a bucket at most
// more buckets than this are merged (n at a time) so that a bar stays a few pixels wide
const MAX_BARS = 600;

/** Bucket start times from the first listed bucket to the last, every `minutes`, with
 * the movies of each (zero where the timeline leaves a bucket out). When that makes more
 * than MAX_BARS buckets, consecutive ones are merged. Returns {minutes, buckets}. */
export function rateBuckets(timeline, minutes) {
  if (!timeline.length) return {minutes, buckets: []};
  const step = minutes * 60000;
  const t0 = Date.parse(timeline[0].start);
  const span = Math.round((Date.parse(timeline[timeline.length - 1].start) - t0) / step) + 1;
  const merge = Math.ceil(span / MAX_BARS);
  const buckets = Array.from({length: Math.ceil(span / merge)},
                             (_, i) => ({start: t0 + i * merge * step, movies: 0}));
  for (const {start, movies} of timeline) {
    buckets[Math.floor(Math.round((Date.parse(start) - t0) / step) / merge)].movies += movies;
  }
  return {minutes: minutes * merge, buckets};
}

/** A session's acquisition rate as plain SVG: one bar per bucket of `minutes` (movies
 * that arrived in it), empty buckets drawn as zero, time of day (local) below.
 * Returns {svg, minutes, buckets}. */
export function rateBars(timeline, minutes, {width = 720, height = 140} = {}) {
  const merged = rateBuckets(timeline, minutes);
  const {buckets} = merged;
  const n = buckets.length;
  const w = width - RATE_MARGIN.left - RATE_MARGIN.right;
  const bottom = height - RATE_MARGIN.bottom;
  const top = Math.max(1, ...buckets.map((b) => b.movies));
  const y = (v) => bottom - (v / top) * (bottom - RATE_MARGIN.top);
  const slot = Math.min(MAX_SLOT, w / Math.max(1, n));   // a few buckets: narrow bars
  const svg = node("svg", {viewBox: `0 0 ${width} ${height}`, class: "rate-plot", role: "img",
                           "aria-label": `movies per ${merged.minutes} minutes, ${n} buckets`});
  for (const v of ticks(0, top, 3).filter(Number.isInteger)) {
    node("line", {x1: RATE_MARGIN.left, x2: RATE_MARGIN.left + w, y1: y(v), y2: y(v),
                  class: "grid"}, svg);
    node("text", {x: RATE_MARGIN.left - 6, y: y(v), class: "tick y"}, svg).textContent =
      String(v);
  }
  const pad = (v) => String(v).padStart(2, "0");
  const hm = (t) => `${pad(t.getHours())}:${pad(t.getMinutes())}`;
  const days = n && new Date(buckets[0].start).toDateString() !==
    new Date(buckets[n - 1].start).toDateString();
  const label = (t) => (days ? `${pad(t.getMonth() + 1)}-${pad(t.getDate())} ${hm(t)}` : hm(t));
  buckets.forEach((bucket, i) => {
    const start = new Date(bucket.start);
    const end = new Date(bucket.start + merged.minutes * 60000);
    const gap = Math.min(3, slot * 0.1);
    const bar = node("rect", {
      x: RATE_MARGIN.left + i * slot + gap, y: y(bucket.movies),
      width: Math.max(0.5, slot - 2 * gap), height: bottom - y(bucket.movies),
      class: bucket.movies ? "bar" : "bar empty", "data-start": start.toISOString(),
      "data-movies": bucket.movies}, svg);
    node("title", {}, bar).textContent =
      `${label(start)}–${hm(end)}: ${bucket.movies} movie${bucket.movies === 1 ? "" : "s"}`;
  });
  const every = Math.max(1, Math.ceil((days ? 90 : 50) / slot));   // labels apart
  for (let i = 0; i < n; i += every) {
    node("text", {x: RATE_MARGIN.left + i * slot, y: bottom + 16, class: "tick x start"}, svg)
      .textContent = label(new Date(buckets[i].start));
  }
  node("line", {x1: RATE_MARGIN.left, x2: RATE_MARGIN.left + w, y1: bottom, y2: bottom,
                class: "baseline"}, svg);
  return {svg, ...merged};
}
