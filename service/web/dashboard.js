// The mrc-ingest dashboard. Three pages, each at its own URL (reload, share, back and
// forward keep them):
//   ./                      the sessions, newest activity first (?project=, ?sort=, ?order=)
//   ./?session=<id>         one session: its figures, rate timeline, acquisition summary,
//                           problems, and the table of its datasets (with the filters below)
//   ./?view=datasets        every dataset, as a table whose filters and sort live in the URL
//                           (?status=…, ?voltage_kv=…; any filter implies this page)
// and one dataset's detail beside a table at ?dataset=<id> (&frame=k). Live progress of
// uploads and jobs in flight, without a reload. Plain JS modules, no build step, nothing
// from a network but this server; the API is read with the token kept in this browser's
// local storage.
import {describe, framePlot, number, rateBars} from "./plot.js";
import {blank, bytes, clock, element, fixed, pageLink, percent, plain, when} from "./format.js";
import {SESSION_COLUMNS, SESSION_ORDER, acquisitionRows, figureRows, problemItems}
  from "./sessions.js";

const $ = (id) => document.getElementById(id);
const IN_FLIGHT = new Set(["receiving", "queued", "processing"]);
const UNFINISHED_JOBS = new Set(["queued", "running"]);
const LIVE_MS = 1000;    // refresh period while something shown is in flight
const IDLE_MS = 10000;   // otherwise: only to notice new arrivals
const PAGE = 50;
const FAR_ROWS = 10;     // in-flight rows beyond the first page refreshed one by one
const DEFAULT_ORDER = {created_at: "desc", name: "asc", size_bytes: "desc"};

// The list filters. Each key is both this page's URL parameter and the list API's
// parameter, so the page URL maps one to one onto GET /v1/datasets.
const FILTERS = [
  {key: "name", label: "name contains", type: "search", size: 14},
  {key: "status", label: "status",
   options: ["receiving", "queued", "processing", "ready", "rejected", "failed"]},
  {key: "mode", label: "mode", options: ["0", "1", "2", "3", "4", "6", "12", "101"]},
  {key: "source", label: "source", options: ["upload", "registration"]},
  {key: "voltage_kv", label: "kV", type: "number", size: 4, choices: ["80", "120", "200", "300"]},
  {key: "camera", label: "camera", type: "text", size: 10},
  {range: ["min_pixel_size", "max_pixel_size"], label: "Å/px"},
  {range: ["min_exposure", "max_exposure"], label: "exposure s"},
  {range: ["min_frames", "max_frames"], label: "frames", step: "1"},
  {range: ["min_dose", "max_dose"], label: "dose e⁻/Å²"},
];
const FILTER_KEYS = FILTERS.flatMap((f) => f.range || [f.key]);

/** A progress bar and its percentage (or, with no total known, the amount so far). */
function progressBar(fraction, label, title) {
  const box = element("span", "progress");
  box.title = title;
  const bar = element("span", "bar" + (blank(fraction) ? " unknown" : ""));
  bar.append(element("span", "fill"));
  if (!blank(fraction)) bar.firstChild.style.width = `${(100 * fraction).toFixed(1)}%`;
  box.append(bar, element("span", "pct", label));
  return box;
}

/** A dataset's status, with its progress while it is received or processed (`verbose`:
 * and the amounts in words). */
function statusView(status, progress, verbose = false) {
  const box = element("span", `state status-${status}`);
  box.append(element("span", "label", status));
  if (!progress) return box;
  const {phase, done, total, unit} = progress;
  const amount = (v) => (unit === "bytes" ? bytes(v) : `${v} ${unit}`);
  const fraction = total ? Math.min(1, done / total) : null;
  const label = blank(fraction) ? amount(done) : percent(fraction);
  const title = `${phase}: ${amount(done)}${total ? ` of ${amount(total)}` : ""}`;
  box.append(progressBar(fraction, label, title));
  if (verbose) box.append(element("span", "amount", title));
  return box;
}

/** Bytes received so far: while an upload streams, what has arrived. */
const received = (d) => (d.status === "receiving" && d.progress && d.progress.unit === "bytes"
  ? d.progress.done : d.size_bytes);

const ratio = (d) => (d.compression_ratio ? `${d.compression_ratio.toFixed(2)}×` : null);

function modeText(d) {  // as received → as stored (the archive of a 4-bit movie is mode 0)
  if (blank(d.mode)) return "";
  return d.stored_bytes ? `${d.mode} → ${d.mode === 101 ? 0 : d.mode}` : String(d.mode);
}

// The list columns: `text` gives a cell's text or node; `sort` names the API sort key.
const COLUMNS = [
  {head: "", cls: "thumb", paint: paintThumb},
  {head: "name", cls: "name", sort: "name", text: (d) => d.name},
  {head: "status", cls: "status", text: (d) => statusView(d.status, d.progress)},
  {head: "x × y × frames", cls: "minor",
   text: (d) => (d.nx ? `${d.nx}×${d.ny}×${d.frames}` : "")},
  {head: "mode", text: modeText},
  {head: "kV", cls: "num", text: (d) => plain(d.voltage_kv)},
  {head: "Å/px", cls: "num", text: (d) => fixed(d.pixel_size_angstrom || null, 3)},  // 0: unknown
  {head: "exposure s", cls: "num minor", text: (d) => plain(d.exposure_s)},
  {head: "camera", cls: "minor", text: (d) => d.camera},
  {head: "dose e⁻/Å²", cls: "num minor", text: (d) => fixed(d.total_dose, 1)},
  {head: "received", cls: "num", sort: "size_bytes", text: (d) => bytes(received(d))},
  {head: "stored", cls: "num", text: (d) => bytes(d.stored_bytes)},
  {head: "ratio", cls: "num", text: (d) => ratio(d) || ""},
  {head: "created", cls: "minor", sort: "created_at", text: (d) => when(d.created_at)},
];

// -- state: what the URL says (view), what was loaded (lists, session, detail) -------------

// page: "sessions" (the list), "session" (one, with its datasets) or "datasets" (all).
// The sessions list keeps its own sort (ssort, sorder); both lists read ?sort= and ?order=
// of the URL, each on its own page.
const view = {page: "sessions", project: null, ssort: "last_movie_at", sorder: "desc",
              session: null, filters: {}, sort: "created_at", order: "desc", dataset: null,
              frame: 0};
const list = {key: null, items: [], cursor: null};          // datasets
const sessionList = {key: null, items: [], cursor: null};   // sessions
let session = null;  // the open session as last loaded
let detail = null;   // the open dataset as last loaded
let series = null;   // its per-frame statistics
let plot = null;
let listedSessions = {};   // the URL parameters of the sessions list last shown

function readUrl() {
  const p = new URLSearchParams(location.search);
  const filters = {};
  for (const key of FILTER_KEYS) if (p.get(key)) filters[key] = p.get(key);
  const dataset = p.get("dataset") || null;
  const sessionId = p.get("session") || null;
  const page = sessionId ? "session"
    : p.get("view") === "datasets" || dataset || Object.keys(filters).length ? "datasets"
    : "sessions";
  const order = (table, fallback) => {
    const sort = Object.hasOwn(table, p.get("sort")) ? p.get("sort") : fallback;
    return [sort, ["asc", "desc"].includes(p.get("order")) ? p.get("order") : table[sort]];
  };
  const [sort, sortOrder] = page === "sessions" ? ["created_at", "desc"]
    : order(DEFAULT_ORDER, "created_at");
  const [ssort, sorder] = page === "sessions" ? order(SESSION_ORDER, "last_movie_at")
    : ["last_movie_at", "desc"];
  return {page, project: page === "sessions" ? p.get("project") || null : null, ssort, sorder,
          session: sessionId, filters, sort, order: sortOrder, dataset,
          frame: Math.max(0, parseInt(p.get("frame"), 10) || 0)};
}

/** The URL parameters of a sessions list. */
function sessionsParams({project, ssort, sorder}) {
  const p = {};
  if (project) p.project = project;
  if (ssort !== "last_movie_at") p.sort = ssort;
  if (sorder !== SESSION_ORDER[ssort]) p.order = sorder;
  return p;
}

function pageUrl() {
  let p;
  if (view.page === "sessions") {
    p = new URLSearchParams(sessionsParams(view));
  } else {
    p = new URLSearchParams(view.session ? {session: view.session} : {});
    // the all-datasets page says so unless a filter or an open dataset implies it
    if (view.page === "datasets" && !view.dataset && !Object.keys(view.filters).length) {
      p.set("view", "datasets");
    }
    for (const [key, value] of Object.entries(view.filters)) p.set(key, value);
    if (view.sort !== "created_at") p.set("sort", view.sort);
    if (view.order !== DEFAULT_ORDER[view.sort]) p.set("order", view.order);
    if (view.dataset) p.set("dataset", view.dataset);
    if (view.dataset && view.frame) p.set("frame", view.frame);
  }
  const query = p.toString();
  return location.pathname + (query ? `?${query}` : "");
}

/** Change the view: a new history entry (or, with replace, the same one), then show it. */
function go(changes, replace = false) {
  Object.assign(view, changes);
  const url = pageUrl();
  if (url !== location.pathname + location.search) {
    history[replace ? "replaceState" : "pushState"](null, "", url);
  }
  if (!replace) applyView();
}

/** Open another page, given by its URL parameters (a new history entry). */
function navigate(query) {
  const search = new URLSearchParams(query).toString();
  history.pushState(null, "", location.pathname + (search ? `?${search}` : ""));
  Object.assign(view, readUrl());
  applyView();
}

/** The datasets API query of the current view (without cursor); null on the sessions
 * list. On a session's page, its datasets only. */
function listQuery() {
  if (view.page === "sessions") return null;
  const p = new URLSearchParams(view.session ? {session: view.session} : {});
  for (const [key, value] of Object.entries(view.filters)) p.set(key, value);
  p.set("sort", view.sort);
  p.set("order", view.order);
  p.set("limit", PAGE);
  return p.toString();
}

/** The sessions API query of the current view; null on the other pages. */
function sessionsQuery() {
  if (view.page !== "sessions") return null;
  const p = new URLSearchParams(view.project ? {project: view.project} : {});
  p.set("sort", view.ssort);
  p.set("order", view.sorder);
  p.set("limit", PAGE);
  return p.toString();
}

function applyView() {
  syncControls();
  if (view.page === "sessions") {
    listedSessions = sessionsParams(view);
    list.key = null;   // a list not on screen is not refreshed: reloaded when shown again
    if (sessionsQuery() !== sessionList.key) enqueue(loadSessions);
  } else {
    sessionList.key = null;
    if (listQuery() !== list.key) enqueue(loadList);
  }
  showSession();
  showDetail();
}

// -- the API --------------------------------------------------------------------------------

const tokenBox = $("token");
tokenBox.value = localStorage.getItem("mrc-ingest-token") || "";
const headers = () => (tokenBox.value ? {Authorization: `Bearer ${tokenBox.value}`} : {});

async function api(path) {
  let response;
  try {
    response = await fetch(path, {headers: headers()});
  } catch (e) {
    throw new Error(`the server does not answer (${e.message})`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.detail;
    const text = Array.isArray(detail) ? detail.map((e) => `${e.where}: ${e.message}`).join("; ")
      : typeof detail === "string" ? detail : JSON.stringify(detail ?? "");
    const error = new Error(`${response.status} ${(body && body.error) || ""}: ${text}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

/** Load an image through fetch (an <img src> cannot send the token); `current()` says
 * whether it is still wanted when it arrives. */
async function image(img, path, current = () => true) {
  const response = await fetch(path, {headers: headers()}).catch(() => null);
  if (!response || !response.ok || !current()) return;
  const url = URL.createObjectURL(await response.blob());
  if (!current()) { URL.revokeObjectURL(url); return; }
  img.onload = () => URL.revokeObjectURL(url);
  img.src = url;
}

function report(what, error) {
  $("error").textContent = error ? `${what}: ${error.message}` : "";
}

// -- the list -------------------------------------------------------------------------------

let listWork = Promise.resolve();
/** List loads run one after another, so a refresh never interleaves with "more". */
function enqueue(job) {
  listWork = listWork.then(job);
  return listWork;
}

async function loadList() {
  const key = listQuery();
  if (key === list.key) return;
  try {
    const page = await api(`v1/datasets?${key}`);
    if (key !== listQuery()) return;  // the view changed meanwhile; its own load follows
    Object.assign(list, {key, items: page.items, cursor: page.next_cursor});
    report();
  } catch (e) {
    Object.assign(list, {key: null, items: [], cursor: null});
    report("cannot load datasets", e);
  }
  paintList();
  schedule();
}

/** Does row a come after row b in the current order (sort key, then id, as the API)? */
function after(a, b) {
  const x = a[view.sort], y = b[view.sort];
  const c = x < y ? -1 : x > y ? 1 : a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
  return view.order === "desc" ? c < 0 : c > 0;
}

/** Reload the first page; keep rows loaded further down ("more") that still sort after
 * it, refreshing those in flight one by one. */
async function refreshList() {
  const key = listQuery();
  if (key !== list.key) return loadList();
  try {
    const page = await api(`v1/datasets?${key}`);
    if (key !== list.key) return;
    const fresh = new Set(page.items.map((d) => d.id));
    const last = page.items[page.items.length - 1];
    const rest = page.next_cursor && last
      ? list.items.filter((d) => !fresh.has(d.id) && after(d, last)) : [];
    const far = rest.filter((d) => IN_FLIGHT.has(d.status)).slice(0, FAR_ROWS);
    const updated = await Promise.all(far.map((d) => api(`v1/datasets/${d.id}`).catch(() => d)));
    const byId = new Map(updated.map((d) => [d.id, d]));
    list.items = page.items.concat(rest.map((d) => byId.get(d.id) || d));
    if (!rest.length) list.cursor = page.next_cursor;
    report();
  } catch (e) {
    report("cannot refresh (showing what was loaded before)", e);
  }
  paintList();
}

/** The next page of a paged list (``state``: its key, items and cursor) from ``path``,
 * appended without repeats; ``paint`` draws it after. */
async function loadNextPage(state, path, what, paint) {
  if (!state.cursor) return;
  const key = state.key;
  try {
    const page = await api(`${path}?${key}&cursor=${encodeURIComponent(state.cursor)}`);
    if (key !== state.key) return;
    const known = new Set(state.items.map((item) => item.id));
    state.items = state.items.concat(page.items.filter((item) => !known.has(item.id)));
    state.cursor = page.next_cursor;
    report();
  } catch (e) {
    report(`cannot load more ${what}`, e);
  }
  paint();
}

const loadMore = () => loadNextPage(list, "v1/datasets", "datasets", paintList);

const rows = new Map();      // dataset id -> its <tr>
const painted = new Map();   // dataset id -> the JSON its row shows
const thumbs = new IntersectionObserver((entries) => {
  for (const entry of entries.filter((e) => e.isIntersecting)) {
    thumbs.unobserve(entry.target);
    image(entry.target, entry.target.dataset.src);
  }
}, {rootMargin: "200px"});

function paintThumb(td, d) {
  let img = td.firstChild;
  if (!img) { img = element("img"); img.alt = ""; td.append(img); }
  if (d.status === "ready" && !img.dataset.src) {   // only what scrolls into view is fetched
    img.dataset.src = `v1/datasets/${d.id}/sum.png?size=96`;
    thumbs.observe(img);
  }
}

function rowOf(d) {
  let tr = rows.get(d.id);
  if (!tr) {
    tr = element("tr", "ds");
    tr.dataset.id = d.id;
    for (const column of COLUMNS) tr.append(element("td", column.cls));
    tr.onclick = () => go({dataset: d.id, frame: 0});
    rows.set(d.id, tr);
  }
  const json = JSON.stringify(d);
  if (painted.get(d.id) !== json) {
    painted.set(d.id, json);
    tr.dataset.status = d.status;
    COLUMNS.forEach((column, i) => {
      const cell = tr.cells[i];
      if (column.paint) { column.paint(cell, d); return; }
      const content = column.text(d);
      if (content instanceof Node) cell.replaceChildren(content);
      else cell.textContent = content ?? "";
    });
  }
  tr.classList.toggle("selected", d.id === view.dataset);
  return tr;
}

function paintList() {
  const wanted = new Set(list.items.map((d) => d.id));
  for (const [id, tr] of rows) {
    if (wanted.has(id)) continue;
    thumbs.unobserve(tr.cells[0].firstChild);
    rows.delete(id);
    painted.delete(id);
  }
  const body = $("rows");
  if (list.items.length) body.replaceChildren(...list.items.map(rowOf));
  else {
    const empty = element("td", "empty", list.key ? "no datasets match" : "");
    empty.colSpan = COLUMNS.length;
    body.replaceChildren(element("tr"));
    body.firstChild.append(empty);
  }
  const sum = (value) => list.items.reduce((total, d) => total + (value(d) || 0), 0);
  const moving = list.items.filter((d) => IN_FLIGHT.has(d.status)).length;
  $("summary").textContent = list.items.length
    ? `${list.items.length} shown${list.cursor ? " (more below)" : ""}` +
      `${moving ? `, ${moving} in flight` : ""} · these received ${bytes(sum(received))}, ` +
      `stored ${bytes(sum((d) => d.stored_bytes))}` : "";
  $("more").hidden = !list.cursor;
  if (list.key) firstRows();
}

let firstRowsMarked = false;
/** Once per page load, when a table (sessions or datasets) first shows an answer of the
 * API: bench/bench_dashboard.py and bench/bench_sessions.py read this mark. */
function firstRows() {
  if (firstRowsMarked) return;
  firstRowsMarked = true;
  performance.mark("first-rows");
}

// -- the sessions list ----------------------------------------------------------------------

async function loadSessions() {
  const key = sessionsQuery();
  if (key === null || key === sessionList.key) return;
  try {
    const page = await api(`v1/sessions?${key}`);
    if (key !== sessionsQuery()) return;  // the view changed meanwhile
    Object.assign(sessionList, {key, items: page.items, cursor: page.next_cursor});
    report();
  } catch (e) {
    if (key !== sessionsQuery()) return;
    Object.assign(sessionList, {key: null, items: [], cursor: null});
    report("cannot load sessions", e);
  }
  paintSessions();
  schedule();
}

/** Reload as many sessions as are shown, from the top: a session moves up the list as
 * its movies arrive, so rows are not merged by position. */
async function refreshSessions() {
  const key = sessionsQuery();
  if (key === null) return;
  if (key !== sessionList.key) return loadSessions();
  const p = new URLSearchParams(key);
  p.set("limit", Math.min(1000, Math.max(PAGE, sessionList.items.length)));
  try {
    const page = await api(`v1/sessions?${p}`);
    if (key !== sessionList.key) return;
    Object.assign(sessionList, {items: page.items, cursor: page.next_cursor});
    report();
  } catch (e) {
    report("cannot refresh (showing what was loaded before)", e);
  }
  paintSessions();
}

const loadMoreSessions = () => loadNextPage(sessionList, "v1/sessions", "sessions",
                                            paintSessions);

const sessionRows = new Map();      // session id -> its <tr>
const sessionPainted = new Map();   // session id -> the JSON its row shows

function sessionRowOf(s) {
  let tr = sessionRows.get(s.id);
  if (!tr) {
    tr = element("tr", "ses");
    tr.dataset.id = s.id;
    for (const column of SESSION_COLUMNS) {
      tr.append(element("td", [column.cls, `c-${column.key}`].filter(Boolean).join(" ")));
    }
    tr.onclick = () => navigate({session: s.id});
    sessionRows.set(s.id, tr);
  }
  const json = JSON.stringify(s);
  if (sessionPainted.get(s.id) !== json) {
    sessionPainted.set(s.id, json);
    tr.classList.toggle("busy", s.counts.in_flight > 0);
    SESSION_COLUMNS.forEach((column, i) => {
      const cell = tr.cells[i];
      const content = column.key === "name"
        ? pageLink(s.name, {session: s.id}, navigate) : column.text(s);
      if (content instanceof Node) cell.replaceChildren(content);
      else cell.textContent = content ?? "";
    });
  }
  return tr;
}

function paintSessions() {
  const wanted = new Set(sessionList.items.map((s) => s.id));
  for (const id of sessionRows.keys()) {
    if (!wanted.has(id)) { sessionRows.delete(id); sessionPainted.delete(id); }
  }
  const body = $("s-rows");
  if (sessionList.items.length) body.replaceChildren(...sessionList.items.map(sessionRowOf));
  else {
    const empty = element("td", "empty", sessionList.key ? "no sessions yet" : "");
    empty.colSpan = SESSION_COLUMNS.length;
    body.replaceChildren(element("tr"));
    body.firstChild.append(empty);
  }
  const moving = sessionList.items.reduce((n, s) => n + s.counts.in_flight, 0);
  $("s-summary").textContent = sessionList.items.length
    ? `${sessionList.items.length} session${sessionList.items.length > 1 ? "s" : ""} shown` +
      `${sessionList.cursor ? " (more below)" : ""}${moving ? `, ${moving} movies in flight` : ""}`
    : "";
  $("s-more").hidden = !sessionList.cursor;
  if (sessionList.key) firstRows();
  if (projects && sessionList.items.some((s) => !projects.includes(s.project))) loadProjects();
}

// -- the project picker: when the token sees more than one project ----------------------------

let projects = null;   // GET /v1/projects, once answered

async function loadProjects() {
  try {
    projects = (await api("v1/projects")).items;
  } catch (e) {
    projects = null;   // the list itself says why
  }
  paintPicker();
}

function paintPicker() {
  const pick = $("project");
  const names = (projects || []).concat(
    view.project && !(projects || []).includes(view.project) ? [view.project] : []);
  $("project-pick").hidden = !(names.length > 1 || view.project);
  const wanted = ["", ...names].join("\n");
  if ([...pick.options].map((o) => o.value).join("\n") !== wanted) {
    pick.replaceChildren(new Option("all projects", ""), ...names.map((n) => new Option(n, n)));
  }
  pick.value = view.project || "";
  pick.classList.toggle("active", Boolean(view.project));
}

$("project").onchange = () => go({project: $("project").value || null});

// -- one session's page -------------------------------------------------------------------

let sessionSeq = 0;
let timelinePainted = null;   // the timeline the rate plot shows

function showSession() {
  const open = view.page === "session";
  $("session").hidden = !open;
  if (!open) { session = null; sessionSeq++; return; }
  if (!session || session.id !== view.session) loadSession(true);
}

async function loadSession(reset) {
  const id = view.session;
  const seq = ++sessionSeq;
  if (reset) {
    session = {id, loading: true};
    timelinePainted = null;
    $("s-name").textContent = "";
    for (const part of ["s-facts", "s-acq", "rate-svg", "problems"]) $(part).replaceChildren();
    $("s-rate").hidden = $("s-problems").hidden = true;
    $("back").replaceChildren(pageLink("← sessions", listedSessions, navigate));
  }
  let s;
  try {
    s = await api(`v1/sessions/${encodeURIComponent(id)}`);
  } catch (e) {
    if (seq !== sessionSeq) return;
    session = {id, missing: true, counts: {in_flight: 0}};
    $("s-name").textContent = id;
    $("s-facts").replaceChildren(element("caption", "why", `cannot open this session: ${e.message}`));
    return;
  }
  if (seq !== sessionSeq) return;
  session = s;
  paintSession(s);
  schedule();
}

function paintSession(s) {
  $("s-name").textContent = s.name;
  document.title = `${s.name} · mrc-ingest`;
  factRows($("s-facts"), figureRows(s));
  factRows($("s-acq"), acquisitionRows(s.acquisition || {}));
  const timeline = JSON.stringify(s.rate.timeline);
  if (timeline !== timelinePainted) {
    timelinePainted = timeline;
    const plotted = rateBars(s.rate.timeline, s.rate.bucket_minutes || 10);
    $("rate-svg").replaceChildren(plotted.svg);
    $("rate-what").textContent = `movies per ${plotted.minutes} minutes, ` +
      `${plotted.buckets.length} bucket${plotted.buckets.length === 1 ? "" : "s"}`;
  }
  $("s-rate").hidden = !s.rate.timeline.length;
  const link = (text, datasetId) => pageLink(text, {session: s.id, dataset: datasetId},
                                             navigate);
  const more = (text, status) => pageLink(text, {session: s.id, status}, navigate);
  const items = problemItems(s, link, more);
  $("problems").replaceChildren(...items);
  $("s-problems").hidden = !items.length;
}

// -- the controls: filters, sortable headers --------------------------------------------

function buildControls() {
  const form = $("filters");
  for (const filter of FILTERS) {
    const label = element("label", "filter", `${filter.label} `);
    for (const key of filter.range || [filter.key]) {
      let input;
      if (filter.options) {
        input = element("select");
        for (const value of [""].concat(filter.options)) {
          input.append(new Option(value || "any", value));
        }
      } else {
        input = element("input");
        input.type = filter.range ? "number" : filter.type;
        input.size = filter.size || 5;
        if (input.type === "number") { input.min = "0"; input.step = filter.step || "any"; }
      }
      if (filter.range) input.placeholder = key.startsWith("min_") ? "min" : "max";
      if (filter.choices) {
        const options = element("datalist");
        options.id = `choices-${key}`;
        for (const value of filter.choices) options.append(new Option(value));
        label.append(options);
        input.setAttribute("list", options.id);
      }
      input.id = `f-${key}`;
      input.name = key;
      input.onchange = () => go({filters: readFilters()});
      label.append(input);
      if (filter.range && key.startsWith("min_")) label.append(" – ");
    }
    form.append(label);
  }
  const clear = element("button", "", "clear filters");
  clear.type = "button";
  clear.id = "clear";
  clear.onclick = () => go({filters: {}});
  form.append(clear);
  form.onsubmit = (event) => { event.preventDefault(); go({filters: readFilters()}); };
  $("heads").append(...COLUMNS.map((column) => {
    const th = element("th", column.cls, column.head);
    if (column.sort) {
      th.dataset.sort = column.sort;
      th.title = `sort by ${column.head} (click again to reverse)`;
      th.onclick = () => go(view.sort === column.sort
        ? {order: view.order === "asc" ? "desc" : "asc"}
        : {sort: column.sort, order: DEFAULT_ORDER[column.sort]});
    }
    return th;
  }));
  $("s-heads").append(...SESSION_COLUMNS.map((column) => {
    const th = element("th", column.cls, column.head);
    if (column.sort) {
      th.dataset.sessionSort = column.sort;
      th.title = `sort by ${column.head} (click again to reverse)`;
      th.onclick = () => go(view.ssort === column.sort
        ? {sorder: view.sorder === "asc" ? "desc" : "asc"}
        : {ssort: column.sort, sorder: SESSION_ORDER[column.sort]});
    }
    return th;
  }));
  $("tabs").append(pageLink("sessions", {}, navigate, "tab"),
                   pageLink("all datasets", {view: "datasets"}, navigate, "tab"));
  $("tabs").firstChild.id = "tab-sessions";
  $("tabs").lastChild.id = "tab-datasets";
}

function readFilters() {
  const out = {};
  for (const key of FILTER_KEYS) {
    const value = $(`f-${key}`).value.trim();
    if (value) out[key] = value;
  }
  return out;
}

function syncControls() {
  const onSessions = view.page === "sessions";
  $("sessions").hidden = !onSessions;
  $("filters").hidden = $("tables").hidden = onSessions;
  $("tab-sessions").classList.toggle("current", view.page !== "datasets");
  $("tab-datasets").classList.toggle("current", view.page === "datasets");
  if (view.page !== "session") document.title = "mrc-ingest";
  for (const key of FILTER_KEYS) {
    const input = $(`f-${key}`);
    input.value = view.filters[key] || "";
    input.classList.toggle("active", Boolean(view.filters[key]));
  }
  $("clear").disabled = !Object.keys(view.filters).length;
  for (const th of $("heads").children) {
    th.classList.remove("asc", "desc");
    if (th.dataset.sort === view.sort) th.classList.add(view.order);
  }
  for (const th of $("s-heads").children) {
    th.classList.remove("asc", "desc");
    if (th.dataset.sessionSort === view.ssort) th.classList.add(view.sorder);
  }
  paintPicker();
}

// -- the detail -----------------------------------------------------------------------------

let detailSeq = 0;
let frameSeq = 0;

function showDetail() {
  const open = Boolean(view.dataset);
  $("detail").hidden = !open;
  document.body.classList.toggle("with-detail", open);
  for (const tr of rows.values()) tr.classList.toggle("selected", tr.dataset.id === view.dataset);
  if (!open) { detail = null; detailSeq++; return; }
  if (!detail || detail.id !== view.dataset) loadDetail(true);
}

/** Load the open dataset; with `reset` (just opened) or once it became ready, its frames
 * and its per-frame plot too. */
async function loadDetail(reset) {
  const id = view.dataset;
  const seq = ++detailSeq;
  if (reset) {
    detail = {id, loading: true};
    series = plot = null;
    $("frame").removeAttribute("src");
    $("plot-svg").replaceChildren();
    $("plot").hidden = true;
  }
  let d;
  try {
    d = await api(`v1/datasets/${encodeURIComponent(id)}`);
  } catch (e) {
    if (seq !== detailSeq) return;
    detail = {id, missing: true};
    $("d-name").textContent = id;
    $("d-status").textContent = `cannot open this dataset: ${e.message}`;
    return;
  }
  if (seq !== detailSeq) return;
  const wasReady = detail && detail.status === "ready";
  detail = d;
  paintDetail(d);
  if (d.status === "ready" && (reset || !wasReady)) {
    setupFrames(d);
    loadPlot(d, seq);
  } else if (reset && d.status === "rejected") {
    loadPlot(d, seq);   // a rejected movie may still have been read frame by frame
  }
  schedule();
}

/** The pixel size; x × y when the pixels are not square (the catalog's is x). */
function pixelSize(x, y) {
  if (!x) return "";
  if (!y || Math.abs(y - x) <= 1e-5 * x) return `${x.toFixed(3)} Å/px`;
  return `${x.toFixed(3)} × ${y.toFixed(3)} Å/px (x × y: not square)`;
}

function facts(d) {
  const a = d.acquisition || {};
  return [
    `status ${d.status}`, d.nx && `${d.nx}×${d.ny}, ${d.frames} frames`,
    d.dtype && `mode ${d.mode} (${d.dtype})`,
    pixelSize(d.pixel_size_angstrom, a.pixel_size_y_angstrom),
    d.voltage_kv && `${number(d.voltage_kv)} kV`,
    d.total_dose && `${d.total_dose.toFixed(2)} e⁻/Å²`,
    !blank(d.exposure_s) && `exposure ${number(d.exposure_s)} s`, d.camera && `camera ${d.camera}`,
    (d.magnification || a.magnification) && `${number(d.magnification || a.magnification)}×`,
    d.source === "registration" && "registered file", `created ${when(d.created_at)}`,
    d.sha256 && `sha256 ${d.sha256.slice(0, 12)}…`,
  ].filter(Boolean).join(" · ");
}

function factRows(table, pairs) {
  table.replaceChildren(...pairs.map(([name, ...cells]) => {
    const tr = element("tr");
    tr.append(element("th", "", name));
    for (const cell of cells) {
      const td = element("td");
      td.append(cell instanceof Node ? cell : document.createTextNode(cell ?? ""));
      tr.append(td);
    }
    return tr;
  }));
}

/** What is kept besides the file as received: the archive copy, or why there is none. */
function keptCopy(d) {
  const archive = d.archive;
  if (archive && !blank(archive.mode)) {
    return `archive copy: mode ${archive.mode}, ${archive.codec}` +
      `${archive.codec !== "none" && !blank(archive.clevel) ? ` level ${archive.clevel}` : ""}`;
  }
  const kept = d.storage && d.storage.form === "registered"
    ? "the registered file stays in place" : "kept as received";
  // The archiver's reasons may end by saying so themselves: say it once.
  const why = archive && archive.reason
    ? archive.reason.replace(/[;,]?\s*it is kept as received\.?$/, "") : "";
  if (why) return `archive: none — ${kept}: ${why}`;
  return archive || d.status === "ready" ? `archive: none — ${kept}` : "";
}

function storageRows(d) {
  const kept = keptCopy(d);
  return [
    ["received", bytes(received(d)),
     d.source === "registration" ? "registered in place" : "the file as received"],
    ["stored", bytes(d.stored_bytes) || "–", kept],
    ["ratio", ratio(d) || "–", "received / stored"],
  ];
}

function jobRows(jobs) {
  const seconds = (a, b) => (a && b ? `${((new Date(b) - new Date(a)) / 1000).toFixed(1)} s` : "");
  return jobs.map((job) => {
    const {done, total, fraction} = job.progress;
    const state = element("span", `state job-${job.state}`);
    state.append(element("span", "label", job.state));
    if (UNFINISHED_JOBS.has(job.state) || job.state === "failed") {
      state.append(progressBar(fraction, blank(fraction) ? "" : percent(fraction),
                               `${done} of ${total}`));
    }
    const note = job.error ? `${job.error.error}: ${JSON.stringify(job.error.detail)}`
      : job.kind === "convert" && job.target ? JSON.stringify(job.target) : "";
    const since = job.started_at ? `started ${when(job.started_at)}`
      : `queued ${when(job.created_at)}`;
    return [job.kind, state, since, seconds(job.started_at, job.finished_at), note];
  });
}

function paintDetail(d) {
  $("d-name").textContent = d.name;
  const status = statusView(d.status, d.progress, true);
  if (d.error) {
    status.append(element("span", "why", `${d.error.error}: ${JSON.stringify(d.error.detail)}`));
  }
  $("d-status").replaceChildren(status);
  $("d-facts").textContent = facts(d);
  if (d.session_id && d.session_id !== view.session) {
    $("d-facts").append(" · ", pageLink("its session", {session: d.session_id}, navigate));
  }
  factRows($("d-storage"), storageRows(d));
  factRows($("jobs"), jobRows(d.jobs || []));
  const findings = d.findings.concat(d.sidecar_findings || []);
  $("findings").replaceChildren(...findings.map((f) =>
    element("li", `finding-${f.severity}`, `${f.severity} ${f.field}: ${f.message}`)));
  const ready = d.status === "ready";
  $("frame").hidden = $("frame-pick").hidden = !ready;
  $("dl").disabled = !(ready || d.status === "rejected");
}

function setupFrames(d) {
  const slider = $("slider");
  slider.max = Math.max(0, (d.frames || 1) - 1);
  slider.value = Math.min(view.frame, Number(slider.max));
  $("last").textContent = slider.max;
  showFrame();
}

async function showFrame() {
  const k = Number($("slider").value);
  $("k").textContent = k;
  if (plot) { plot.select(k); $("readout").textContent = describe(series, k); }
  const seq = ++frameSeq, id = view.dataset;
  await image($("frame"), `v1/datasets/${id}/frames/${k}.png?size=512`, () => seq === frameSeq);
}

async function loadPlot(d, seq) {
  try {
    series = await api(`v1/datasets/${d.id}/frames/stats`);
  } catch (e) {
    if (e.status === 409) return;  // no per-frame statistics for this one
    report("cannot load the per-frame statistics", e);
    return;
  }
  if (seq !== detailSeq) return;
  const slider = $("slider");
  const pick = (k) => { slider.value = k; slider.dispatchEvent(new Event("input")); };
  const hover = (k) => { $("readout").textContent = describe(series, k ?? Number(slider.value)); };
  plot = framePlot(series, {onPick: pick, onHover: hover});
  $("plot-svg").replaceChildren(plot.svg);
  $("plot").hidden = false;
  const odd = plot.odd;
  $("odd").textContent = odd.length
    ? `· ${odd.length} frame${odd.length > 1 ? "s" : ""} stand${odd.length > 1 ? "" : "s"} out: ` +
      `${odd.slice(0, 12).join(", ")}${odd.length > 12 ? ", …" : ""}` : "";
  plot.select(Number(slider.value));
  hover(null);
}

$("slider").oninput = () => {
  go({frame: Number($("slider").value)}, true);
  showFrame();
};
$("close").onclick = () => go({dataset: null, frame: 0});
$("more").onclick = () => enqueue(loadMore);
$("dl").onclick = async () => {
  const query = $("fmt").value;
  const response = await fetch(`v1/datasets/${view.dataset}/download${query ? `?${query}` : ""}`,
                               {headers: headers()});
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    report("download refused", new Error(`${body.error}: ${JSON.stringify(body.detail)}`));
    return;
  }
  // RFC 6266: filename* (UTF-8, percent-encoded) wins over the ASCII filename fallback
  const disposition = response.headers.get("content-disposition") || "";
  const utf8 = disposition.match(/filename\*=UTF-8''([^;]+)/i);
  const plain = disposition.match(/filename="([^"]+)"/);
  const link = element("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = utf8 ? decodeURIComponent(utf8[1]) : plain ? plain[1] : "download.mrc";
  link.click();
};

// -- live updates ----------------------------------------------------------------------------

let timer = null;
let ticking = false;

const detailLive = () => Boolean(detail && detail.jobs &&
  (IN_FLIGHT.has(detail.status) || detail.jobs.some((j) => UNFINISHED_JOBS.has(j.state))));
const sessionLive = () => Boolean(session && session.counts && session.counts.in_flight);
/** Is anything on the page in flight: a listed session's movies, a listed dataset, the
 * open session, the open dataset or one of its jobs? */
const inFlight = () => (view.page === "sessions"
  ? sessionList.items.some((s) => s.counts.in_flight > 0)
  : list.items.some((d) => IN_FLIGHT.has(d.status)) || sessionLive() || detailLive());

/** Refresh every second while anything shown is in flight, else every ten seconds (new
 * arrivals); nothing while the page is hidden. */
function schedule() {
  clearTimeout(timer);
  const live = inFlight();
  const badge = $("live");
  badge.className = live ? "live" : "idle";
  badge.textContent = `${live ? "live · every 1 s" : "idle · checks every 10 s"} · ` +
    `updated ${clock(new Date())}`;
  if (!document.hidden) timer = setTimeout(tick, live ? LIVE_MS : IDLE_MS);
}

async function tick() {
  clearTimeout(timer);
  if (ticking) return;   // the running tick schedules the next
  ticking = true;
  try {
    if (view.page === "sessions") await enqueue(refreshSessions);
    else {
      await Promise.all([enqueue(refreshList),
                         view.page === "session" && session && !session.missing
                           ? loadSession(false) : null]);
    }
    if (detailLive()) await loadDetail(false);
  } finally {
    ticking = false;
    schedule();
  }
}

document.addEventListener("visibilitychange", () => { if (!document.hidden) tick(); });
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && view.dataset) go({dataset: null, frame: 0});
});
window.addEventListener("popstate", () => { Object.assign(view, readUrl()); applyView(); });
tokenBox.onchange = () => {
  localStorage.setItem("mrc-ingest-token", tokenBox.value);
  list.key = sessionList.key = null;
  session = detail = null;
  applyView();
  loadProjects();
};
$("s-more").onclick = () => enqueue(loadMoreSessions);

buildControls();
Object.assign(view, readUrl());
applyView();
loadProjects();   // not waited for: the first rows come first
