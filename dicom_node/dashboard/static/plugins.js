// The models part of the plugins page: list (GET /api/v1/models), a model's versions and
// evaluations (GET /api/v1/models/{name}), upload (POST, multipart), enable and disable.
"use strict";

function modelCell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function modelButton(label, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "secondary";
  button.textContent = label;
  button.addEventListener("click", onClick);
  return button;
}

async function showModel(name) {
  const api = window.dicomNode;
  const box = document.getElementById("model-detail");
  const result = await api.callApi("GET", "/api/v1/models/" + encodeURIComponent(name));
  box.textContent = "";
  const title = document.createElement("h2");
  title.textContent = name + ": versions and evaluations";
  box.appendChild(title);
  if (!result.ok) {
    box.appendChild(document.createTextNode(api.reason(result)));
    return;
  }
  (result.body.versions || []).forEach((version) => {
    const pre = document.createElement("pre");
    pre.className = "card";
    pre.textContent = JSON.stringify(version, null, 2);
    box.appendChild(pre);
  });
}

async function changeModel(name, action, status) {
  const api = window.dicomNode;
  const result = await api.callApi("POST", "/api/v1/models/" + encodeURIComponent(name) + "/" + action);
  api.showResult(status, result.ok ? action + "d" : api.reason(result), result.ok);
  if (result.ok) window.setTimeout(loadModels, 300);
}

async function loadModels() {
  const api = window.dicomNode;
  const table = document.getElementById("models");
  const body = table.tBodies[0];
  const administer = table.tHead.rows[0].cells.length > 6;
  const result = await api.callApi("GET", "/api/v1/models");
  body.textContent = "";
  if (!result.ok || result.body.length === 0) {
    const row = body.insertRow();
    const cell = modelCell(row, result.ok ? "No models registered yet." : api.reason(result));
    cell.colSpan = 7;
    cell.className = "quiet";
    return;
  }
  result.body.forEach((model) => {
    const row = body.insertRow();
    row.id = "model-" + model.name;
    modelCell(row, model.name);
    modelCell(row, model.step);
    modelCell(row, model.kind);
    modelCell(row, (model.versions || []).join(", "));
    modelCell(row, model.enabled_version || "none");
    modelCell(row, model.evaluated ? "yes" : "no");
    const actions = administer ? modelCell(row, "") : null;
    const status = document.createElement("span");
    status.className = "result";
    const details = modelButton("Versions & evaluation", () => showModel(model.name));
    if (actions) {
      actions.appendChild(details);
      const action = model.enabled_version ? "disable" : "enable";
      actions.appendChild(modelButton(action === "enable" ? "Enable latest" : "Disable", () => changeModel(model.name, action, status)));
      actions.appendChild(status);
    } else {
      row.cells[0].appendChild(document.createTextNode(" "));
      row.cells[0].appendChild(details);
    }
  });
}

function wireUpload() {
  const form = document.getElementById("model-upload");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const api = window.dicomNode;
    const error = form.querySelector(".field-error");
    const status = form.querySelector(".result");
    error.textContent = "";
    const data = new FormData();
    data.append("file", form.elements.file.files[0]);
    if (form.elements.manifest.files.length) data.append("manifest", form.elements.manifest.files[0]);
    api.showResult(status, "uploading and checking…", true);
    const result = await api.callApi("POST", "/api/v1/models", data);
    if (result.ok) {
      api.showResult(status, "registered (disabled): " + result.body.name, true);
      loadModels();
    } else {
      error.textContent = api.reason(result);
      api.showResult(status, "refused", false);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  loadModels();
  wireUpload();
});
