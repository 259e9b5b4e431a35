// Small helpers the dashboard's pages share: how amounts and times are written, and one
// way to make an element.
import {number} from "./plot.js";

export const blank = (v) => v === null || v === undefined;
export const fixed = (v, digits) => (blank(v) ? "" : v.toFixed(digits));
export const plain = (v) => (blank(v) ? "" : number(v));
export const percent = (fraction) => `${Math.floor(100 * fraction)} %`;

export function bytes(n) {
  if (blank(n)) return "";
  const [unit, size] = [["TB", 1e12], ["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]
    .find(([, s]) => n >= s) || ["B", 1];
  return `${(n / size).toFixed(size === 1 ? 0 : 1)} ${unit}`;
}

const pad = (v) => String(v).padStart(2, "0");
export const clock = (t) => `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
export const day = (t) => `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())}`;

/** Local time of an API timestamp; the date only when it is not today. */
export function when(iso) {
  if (!iso) return "";
  const t = new Date(iso);
  return day(t) === day(new Date()) ? clock(t) : `${day(t)} ${clock(t)}`;
}

export function element(tag, className, text) {
  const out = document.createElement(tag);
  if (className) out.className = className;
  if (!blank(text)) out.textContent = text;
  return out;
}

/** A link to a page of this dashboard (`query`: its URL parameters); a plain click is
 * handled by `navigate` (no reload), a click with a modifier opens a tab as usual. */
export function pageLink(text, query, navigate, className) {
  const a = element("a", className, text);
  const search = new URLSearchParams(query).toString();
  a.href = location.pathname + (search ? `?${search}` : "");
  a.onclick = (event) => {
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) {
      return;
    }
    event.preventDefault();
    event.stopPropagation();
    navigate(query);
  };
  return a;
}
