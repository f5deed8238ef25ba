// Loom's dashboard script: what a page does after it loads. Pages work without it (forms and
// links); with it, widgets load one by one and refresh while the tab is visible, and the theme
// switches without a reload.
"use strict";

// Widgets: <section data-src="/ui/..." data-refresh="SECONDS">. Each is fetched on its own, so
// a slow one does not hold the others back; a failure shows in its place.
async function load(widget) {
  widget.setAttribute("aria-busy", "true");
  try {
    const response = await fetch(widget.dataset.src, { credentials: "same-origin" });
    widget.innerHTML = await response.text();
    widget.dataset.status = String(response.status);
    watchMore(widget);
  } catch (error) {
    widget.innerHTML = '<p class="problem" role="alert">Could not reach Loom: ' +
      String(error).replace(/[<>&]/g, "") + "</p>";
    widget.dataset.status = "network";
  } finally {
    widget.removeAttribute("aria-busy");
  }
}

function refreshVisible() {
  if (document.hidden) return;
  const now = Date.now();
  for (const widget of document.querySelectorAll("[data-src][data-refresh]")) {
    const every = Number(widget.dataset.refresh) * 1000;
    const last = Number(widget.dataset.loadedAt || 0);
    if (every > 0 && now - last >= every) {
      widget.dataset.loadedAt = String(now);
      load(widget);
    }
  }
}

function start() {
  // The browser's time zone, for pages whose URL names none (the server reads the cookie).
  try {
    const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (zone) document.cookie = "loom_tz=" + encodeURIComponent(zone) + "; path=/; max-age=31536000; samesite=strict";
  } catch (error) { /* the server's default, UTC, applies */ }
  // A select that applies itself (the time zone picker).
  for (const select of document.querySelectorAll("select[data-submit]")) {
    select.addEventListener("change", () => select.form.submit());
  }
  for (const widget of document.querySelectorAll("[data-src]")) {
    widget.dataset.loadedAt = String(Date.now());
    load(widget);
  }
  // Auto-refresh pauses while the tab is hidden, and catches up when it shows again.
  setInterval(refreshVisible, 5000);
  document.addEventListener("visibilitychange", refreshVisible);

  // The theme: light <-> dark, remembered in a cookie the server reads (so nothing flashes).
  for (const button of document.querySelectorAll("[data-theme-toggle]")) {
    button.addEventListener("click", () => {
      const root = document.documentElement;
      const current = root.dataset.theme ||
        (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
      const next = current === "dark" ? "light" : "dark";
      root.dataset.theme = next;
      document.cookie = "loom_theme=" + next + "; path=/; max-age=31536000; samesite=strict";
    });
  }
}

// Infinite scroll: a list's last row <tr class="more" data-next="URL"> loads the next page when
// it scrolls into view (its "More" link does the same without a script).
const more = "IntersectionObserver" in window ? new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (entry.isIntersecting) loadMore(entry.target);
  }
}, { rootMargin: "200px" }) : null;

function watchMore(root) {
  for (const row of root.querySelectorAll("[data-next]")) {
    if (more) more.observe(row);
  }
}

async function loadMore(row) {
  if (row.dataset.loading) return;
  row.dataset.loading = "true";
  if (more) more.unobserve(row);
  try {
    const response = await fetch(row.dataset.next, { credentials: "same-origin" });
    const html = await response.text();
    const body = row.parentElement;
    row.insertAdjacentHTML("beforebegin", html);
    row.remove();
    watchMore(body);
  } catch (error) {
    row.dataset.loading = "";
    row.querySelector("td").textContent = "Could not load more: " + error;
  }
}

// The side panel: a row's link opens its trace beside the list; Esc (or ×) closes it.
const tz = () => new URL(location.href).searchParams.get("tz") || "";

async function openTrace(id) {
  const panel = document.getElementById("panel");
  if (!panel) {
    location.href = "/traces/" + encodeURIComponent(id);
    return;
  }
  panel.hidden = false;
  panel.innerHTML = '<p class="loading">Loading the trace…</p>';
  for (const row of document.querySelectorAll("tr[data-trace]")) {
    row.classList.toggle("selected", row.dataset.trace === id);
  }
  try {
    const query = tz() ? "?tz=" + encodeURIComponent(tz()) : "";
    const response = await fetch("/ui/traces/" + encodeURIComponent(id) + query,
      { credentials: "same-origin" });
    panel.innerHTML = await response.text();
  } catch (error) {
    panel.innerHTML = '<p class="problem" role="alert">Could not reach Loom.</p>';
  }
}

function closePanel() {
  const panel = document.getElementById("panel");
  if (panel && !panel.hidden) {
    panel.hidden = true;
    panel.innerHTML = "";
  }
}

document.addEventListener("click", (event) => {
  const open = event.target.closest("a[data-open]");
  if (open && document.getElementById("panel") && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    openTrace(open.closest("tr[data-trace]").dataset.trace);
  }
  if (event.target.closest("[data-close]")) closePanel();
});

// Keyboard: "/" searches, j/k move through rows, Enter opens the row, Esc closes the panel.
document.addEventListener("keydown", (event) => {
  const typing = event.target.closest("input, select, textarea");
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.matches("textarea")) {
    event.preventDefault();
    event.target.form.requestSubmit();
    return;
  }
  if (event.key === "Escape") {
    closePanel();
    if (typing) event.target.blur();
    return;
  }
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "/") {
    const search = document.querySelector("[data-search]");
    if (search) {
      event.preventDefault();
      search.focus();
    }
  } else if (event.key === "j" || event.key === "k") {
    const rows = [...document.querySelectorAll("tr[data-trace]")];
    if (rows.length === 0) return;
    const at = rows.findIndex((row) => row === document.activeElement);
    const next = event.key === "j" ? Math.min(at + 1, rows.length - 1) : Math.max(at - 1, 0);
    rows[next].focus();
  } else if (event.key === "Enter" && document.activeElement.matches("tr[data-trace]")) {
    openTrace(document.activeElement.dataset.trace);
  }
});

document.addEventListener("DOMContentLoaded", start);
