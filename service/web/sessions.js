// What the dashboard shows of sessions (GET /v1/sessions, /v1/sessions/{id}): the columns
// of the sessions list, and the parts of a session's page (its figures, acquisition
// summary and problems). Builders of DOM from API answers only: loading, the URL and live
// refresh are dashboard.js's.
import {number} from "./plot.js";
import {blank, bytes, element, when} from "./format.js";

/** The list's sort keys (GET /v1/sessions?sort=) and the order each starts in. */
export const SESSION_ORDER = {last_movie_at: "desc", first_movie_at: "desc", name: "asc",
                              movies: "desc"};

const count = (n) => element("span", n ? "" : "zero", String(n ?? 0));

/** Received → stored: what arrived, and what is kept for it. */
export const receivedStored = (c) =>
  `${bytes(c.bytes_received) || "0 B"} → ${bytes(c.bytes_stored) || "0 B"}`;

/** The problem kinds a session counts, as words ("" when there are none). */
export function problemWords(p) {
  return [[p.rejected, "rejected"], [p.failed, "failed"],
          [p.standing_out, "odd frames"]]
    .filter(([n]) => n).map(([n, what]) => `${n} ${what}`).join(" · ");
}

function problemBadge(s) {
  const words = problemWords(s.problems);
  if (!words) return "";
  const badge = element("span", "badge", words);
  badge.title = "rejected and failed movies, and movies with frames that stand out";
  return badge;
}

// The list columns: `text` gives a cell's text or node; `sort` names the API sort key.
export const SESSION_COLUMNS = [
  {head: "session", cls: "name", sort: "name", key: "name", text: (s) => s.name},
  {head: "project", key: "project", text: (s) => s.project},
  {head: "microscope", cls: "minor", key: "microscope", text: (s) => s.microscope ?? ""},
  {head: "first movie", cls: "minor", sort: "first_movie_at", key: "first",
   text: (s) => when(s.first_movie_at)},
  {head: "last movie", sort: "last_movie_at", key: "last", text: (s) => when(s.last_movie_at)},
  {head: "movies", cls: "num", sort: "movies", key: "movies", text: (s) => count(s.counts.movies)},
  {head: "ready", cls: "num", key: "ready", text: (s) => count(s.counts.ready)},
  {head: "rejected", cls: "num", key: "rejected", text: (s) => count(s.counts.rejected)},
  {head: "failed", cls: "num", key: "failed", text: (s) => count(s.counts.failed)},
  {head: "in flight", cls: "num", key: "in_flight", text: (s) => count(s.counts.in_flight)},
  {head: "received → stored", cls: "num", key: "bytes", text: (s) => receivedStored(s.counts)},
  {head: "per 10 min", cls: "num", key: "rate",
   text: (s) => (blank(s.rate_per_10_minutes) ? "" : number(s.rate_per_10_minutes))},
  {head: "problems", key: "problems", text: problemBadge},
];

/** A figure over the session's movies: one value when they agree, else min – max. */
function span(range, digits, unit) {
  if (!range) return "unknown";
  const show = (v) => (digits === null ? number(v) : v.toFixed(digits));
  const text = range.min === range.max ? show(range.min)
    : `${show(range.min)} – ${show(range.max)}`;
  return unit ? `${text} ${unit}` : text;
}

/** [name, value] of each acquisition figure, as the session's movies agree on it. */
export function acquisitionRows(a) {
  return [
    ["dose per frame", span(a.dose_per_frame, null, "e⁻/Å²")],
    ["total dose", span(a.total_dose, null, "e⁻/Å²")],
    ["pixel size", span(a.pixel_size_angstrom, 3, "Å/px")],
    ["voltage", span(a.voltage_kv, null, "kV")],
    ["exposure", span(a.exposure_s, null, "s")],
    ["frames", span(a.frames, 0, "")],
  ];
}

/** [name, value] of a session's figures. */
export function figureRows(s) {
  const c = s.counts;
  const cameras = (s.cameras || []).map((k) => `${k.camera} (${k.movies})`).join(", ");
  return [
    ["project", s.project],
    ["microscope", cameras || s.microscope || "unknown"],
    ["movies", `${c.movies}: ${c.ready} ready · ${c.rejected} rejected · ${c.failed} failed` +
               ` · ${c.in_flight} in flight`],
    ["received → stored", receivedStored(c)],
    ["acquired", s.first_movie_at ? `${when(s.first_movie_at)} – ${when(s.last_movie_at)}` : ""],
    ["rate", blank(s.rate_per_10_minutes) ? "" : `${number(s.rate_per_10_minutes)} movies ` +
             "per 10 minutes"],
  ];
}

/** The problems list: each rejected movie with its first finding, each movie with frames
 * that stand out, each failed one, linked (by `link(text, datasetId)`) to its detail;
 * and, where the session counts more than are listed, how many more (`more(text,
 * status)` links to the table filtered to them). */
export function problemItems(s, link, more) {
  const listed = s.problem_movies;
  const items = [];
  const add = (kind, movie, note) => {
    const li = element("li", `problem ${kind}`);
    li.dataset.id = movie.dataset_id;
    li.append(element("span", "kind", kind), " ", link(movie.name, movie.dataset_id));
    if (note) li.append(element("span", "note", ` — ${note}`));
    items.push(li);
  };
  for (const movie of listed.rejected) {
    const f = movie.finding;
    add("rejected", movie, f ? `${f.field}: ${f.message}` : "");
  }
  for (const movie of listed.standing_out) {
    add("odd frames", movie, `${movie.frames} frame${movie.frames === 1 ? "" : "s"} ` +
        `stand${movie.frames === 1 ? "s" : ""} out`);
  }
  for (const movie of listed.failed) add("failed", movie, "");
  for (const [kind, total, status] of [["rejected", s.problems.rejected, "rejected"],
                                        ["failed", s.problems.failed, "failed"],
                                        ["odd frames", s.problems.standing_out, null]]) {
    const shown = listed[kind === "odd frames" ? "standing_out" : kind].length;
    if (total > shown) {
      const li = element("li", "problem more", `… and ${total - shown} more ${kind} `);
      if (status) li.append(more("(show them)", status));
      items.push(li);
    }
  }
  return items;
}
