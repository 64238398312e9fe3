// dicom-node dashboard: the few things a server-rendered page cannot do by itself.
// Changes go to the REST API with the session cookie and the page's CSRF token as the
// X-CSRF-Token header (the API refuses a cookie-authenticated change without it).
"use strict";

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

async function callApi(method, url, body) {
  const init = { method: method, credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() } };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  let payload = null;
  try { payload = await response.json(); } catch (_error) { payload = null; }
  return { ok: response.ok, status: response.status, body: payload };
}

function reason(result) {
  const detail = result.body && result.body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((item) => (item.loc ? item.loc.join(".") + ": " : "") + item.msg).join("\n");
  }
  return "HTTP " + result.status;
}

function showResult(element, text, good) {
  if (!element) return;
  element.textContent = text;
  element.className = "result " + (good ? "ok" : "error");
}

// <button data-api-method="POST" data-api-url="/api/v1/jobs/3/retry" data-done="queued again">
function wireApiButtons() {
  document.querySelectorAll("button[data-api-url]").forEach((button) => {
    button.addEventListener("click", async () => {
      const output = document.getElementById(button.dataset.resultId) || button.nextElementSibling;
      if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
      button.disabled = true;
      const result = await callApi(button.dataset.apiMethod || "POST", button.dataset.apiUrl);
      button.disabled = false;
      const state = result.ok && result.body && result.body.state ? " (now " + result.body.state + ")" : "";
      showResult(output, result.ok ? (button.dataset.done || "done") + state : reason(result), result.ok);
      if (result.ok && button.dataset.reload !== undefined) {
        window.setTimeout(() => window.location.reload(), 600);
      }
    });
  });
}

function wireAutosubmit() {
  document.querySelectorAll("[data-autosubmit]").forEach((field) => {
    field.addEventListener("change", () => field.form.submit());
  });
}

// For the page scripts (rules.js, plugins.js), loaded after this one.
window.dicomNode = { callApi: callApi, reason: reason, showResult: showResult };

document.addEventListener("DOMContentLoaded", () => {
  wireApiButtons();
  wireAutosubmit();
});
