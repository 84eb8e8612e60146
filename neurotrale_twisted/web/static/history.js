// The history page of one annotation file: its kept versions, what each changed, a restore
// button. Served by neurotrale-twisted under /api/history.js; the page allows no inline
// script. Everything it shows goes through textContent, never innerHTML: records are data.
"use strict";

(function () {
  const fileUrl = window.location.pathname; // the annotation file; the page is ?history
  const fileName = decodeURIComponent(fileUrl.split("/").pop());
  let current = null; // {etag, text}: the content the page showed, for If-Match

  const $ = (selector) => document.querySelector(selector);

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function setStatus(text) {
    $("#status").textContent = text;
  }

  function say(text, kind) {
    const message = $("#message");
    message.textContent = text;
    message.className = kind;
    message.hidden = false;
  }

  // A record's JSON with its keys sorted at every depth: equal records, equal strings.
  function canonical(value) {
    if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
    if (value !== null && typeof value === "object") {
      return (
        "{" +
        Object.keys(value)
          .sort()
          .map((key) => JSON.stringify(key) + ":" + canonical(value[key]))
          .join(",") +
        "}"
      );
    }
    return JSON.stringify(value);
  }

  function byId(records) {
    const map = new Map();
    for (const record of records) map.set(String(record.id), canonical(record));
    return map;
  }

  // What `newer` added, removed and changed against `older`, comparing records by id.
  function compare(newer, older) {
    const after = byId(newer);
    const before = byId(older);
    const added = [...after.keys()].filter((id) => !before.has(id));
    const removed = [...before.keys()].filter((id) => !after.has(id));
    const changed = [...after.keys()].filter(
      (id) => before.has(id) && before.get(id) !== after.get(id)
    );
    return { added, removed, changed };
  }

  // The records of a file's content, or null with the reason when it has none to show: a
  // file someone broke on disk must still show its versions, so that one can be put back.
  function parse(text) {
    let value;
    try {
      value = JSON.parse(text);
    } catch (ignored) {
      return { records: null, problem: "not JSON" };
    }
    if (!Array.isArray(value)) return { records: null, problem: "not a list" };
    return { records: value.filter((r) => r !== null && typeof r === "object"), problem: null };
  }

  function count(row) {
    return row.records === null ? row.problem : row.records.length;
  }

  function comparable(row, older) {
    return older && row.records !== null && older.records !== null;
  }

  function utc(date) {
    return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "").replace(/Z$/, "");
  }

  async function errorOf(response) {
    try {
      const body = await response.json();
      if (body && body.error) return `${response.status}: ${body.error}`;
    } catch (ignored) {
      // not JSON
    }
    return `${response.status} ${response.statusText}`;
  }

  async function fetchText(url) {
    const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`${url}: ${await errorOf(response)}`);
    return { text: await response.text(), response };
  }

  function where(record) {
    const point = record.point || (Array.isArray(record.points) ? record.points[0] : null);
    if (!Array.isArray(point)) return "";
    const at = point.map((v) => (typeof v === "number" ? Math.round(v * 100) / 100 : v));
    const more = Array.isArray(record.points) ? ` (${record.points.length} points)` : "";
    return `(${at.join(", ")})${more}`;
  }

  function showRecords(row, older) {
    const section = $("#records");
    const body = section.querySelector("tbody");
    body.replaceChildren();
    if (row.records === null) {
      $("#records-title").textContent =
        `${row.label}: ${row.problem} (${row.size} B), no records to show`;
    } else {
      $("#records-title").textContent = `${row.label}: ${row.records.length} record(s)`;
    }
    const change = comparable(row, older) ? compare(row.records, older.records) : null;
    for (const record of row.records || []) {
      const id = String(record.id);
      let note = "";
      if (change && change.added.includes(id)) note = "added";
      else if (change && change.changed.includes(id)) note = "changed";
      const tr = element("tr", null, note);
      for (const value of [id, record.type, record.anntype, where(record),
                           record.reviewed, record.visited, note]) {
        tr.append(element("td", value === undefined ? "" : value));
      }
      body.append(tr);
    }
    const removed = $("#records-removed");
    removed.hidden = !(change && change.removed.length);
    if (change && change.removed.length) {
      removed.textContent = `Removed against the version before: ${change.removed.join(", ")}`;
    }
    section.hidden = false;
    section.scrollIntoView({ block: "nearest" });
  }

  async function restore(row) {
    setStatus(`Restoring version ${row.version}\u2026`);
    const response = await fetch(fileUrl, {
      method: "PUT",
      headers: { "If-Match": current.etag, "Content-Type": "application/json" },
      body: row.text,
      credentials: "same-origin",
    });
    if (response.status === 412) {
      say(
        `Not restored: ${fileName} was changed by someone else since this page was loaded, ` +
          "and restoring would overwrite that change. Reload the page to see it, then choose again.",
        "refused"
      );
      setStatus("Nothing was changed.");
      return;
    }
    if (!response.ok) {
      say(`Not restored: ${await errorOf(response)}`, "refused");
      setStatus("Nothing was changed.");
      return;
    }
    say(
      `Restored version ${row.version} (${count(row)} record(s)). The content it ` +
        "replaced is kept as a version too, so this can be undone the same way.",
      "restored"
    );
    await load();
  }

  function render(rows) {
    const body = $("#versions tbody");
    body.replaceChildren();
    rows.forEach((row, index) => {
      const older = rows[index + 1];
      const change = comparable(row, older) ? compare(row.records, older.records) : null;
      const tr = element("tr", null, row.version === null ? "current" : "");
      tr.dataset.version = row.version === null ? "current" : String(row.version);
      tr.append(element("td", row.version === null ? "current" : row.version));
      tr.append(element("td", row.saved));
      tr.append(element("td", `${row.size} B`));
      tr.append(element("td", count(row), row.records === null ? "problem" : ""));
      for (const key of ["added", "removed", "changed"]) {
        tr.append(element("td", change ? change[key].length : "\u2014", "number"));
      }
      const actions = element("td", null, "actions");
      const show = element("button", "show", "show");
      show.type = "button";
      show.addEventListener("click", () => showRecords(row, older));
      actions.append(show);
      if (row.version !== null) {
        const put = element("button", "restore", "restore");
        put.type = "button";
        put.title = `Put version ${row.version} back as the current content`;
        put.addEventListener("click", () => {
          for (const button of document.querySelectorAll("button.restore")) button.disabled = true;
          restore(row)
            .catch((error) => say(`Not restored: ${error.message}`, "refused"))
            .finally(() => {
              for (const button of document.querySelectorAll("button.restore")) {
                button.disabled = false;
              }
            });
        });
        actions.append(put);
      }
      tr.append(actions);
      body.append(tr);
    });
  }

  async function load() {
    setStatus("Loading the versions\u2026");
    const file = await fetchText(fileUrl);
    const modified = file.response.headers.get("last-modified");
    current = { etag: file.response.headers.get("etag"), text: file.text };
    const listed = JSON.parse((await fetchText(`${fileUrl}?versions`)).text);
    const rows = [
      {
        version: null,
        label: "Current content",
        saved: modified ? utc(new Date(modified)) : "",
        size: new TextEncoder().encode(file.text).length,
        text: file.text,
        ...parse(file.text),
      },
    ];
    const texts = await Promise.all(
      listed.map((v) => fetchText(`${fileUrl}?version=${v.version}`).catch(() => null))
    );
    listed.forEach((v, i) => {
      if (texts[i] === null) return; // trimmed meanwhile
      rows.push({
        version: v.version,
        label: `Version ${v.version}`,
        saved: utc(new Date(v.modified)),
        size: v.size,
        text: texts[i].text,
        ...parse(texts[i].text),
      });
    });
    render(rows);
    setStatus(
      `${rows.length - 1} earlier version(s) kept, newest first; added, removed and changed ` +
        "count records (by id) against the row below."
    );
    document.body.dataset.loaded = "true";
  }

  window.addEventListener("DOMContentLoaded", () => {
    document.title = `History of ${fileName}`;
    load().catch((error) => {
      say(`Could not load the history: ${error.message}`, "refused");
      setStatus("");
    });
  });
})();
