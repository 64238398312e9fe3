// The rules page: save a rule's JSON (PUT /api/v1/rules/{name}) and try it on the studies
// already received (POST /api/v1/rules/test). A refusal's reason goes beside the field.
"use strict";

function fieldOf(detailItem) {
  const loc = (detailItem.loc || []).filter((part) => part !== "body" && part !== "rule");
  return loc.join(".");
}

function refusal(result) {
  const detail = result.body && result.body.detail;
  if (Array.isArray(detail)) {
    return detail.map((item) => (fieldOf(item) ? fieldOf(item) + ": " : "") + item.msg).join("\n");
  }
  return typeof detail === "string" ? detail : "HTTP " + result.status;
}

function parsedDefinition(section) {
  const error = section.querySelector(".field-error");
  error.textContent = "";
  try {
    return JSON.parse(section.querySelector("textarea.definition").value);
  } catch (problem) {
    error.textContent = "not JSON: " + problem.message;
    return null;
  }
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
}

function showTrial(section, trial) {
  const box = section.querySelector(".trial");
  box.textContent = "";
  const summary = document.createElement("p");
  summary.className = "trial-summary";
  summary.textContent = trial.series_matched + " of " + trial.series_examined + " series in " +
    trial.studies_examined + " studies would be taken" + ((trial.notes || []).length ? " · " + trial.notes.join("; ") : "");
  box.appendChild(summary);
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  ["Study", "Series", "Modality", "Description", "Taken", "Why not"].forEach((title) => cell(head, title));
  const body = table.createTBody();
  (trial.studies || []).forEach((study) => {
    (study.series || []).forEach((series) => {
      const row = body.insertRow();
      cell(row, study.study_instance_uid, "uid");
      cell(row, series.series_number === null ? "" : String(series.series_number));
      cell(row, series.modality || "");
      cell(row, series.series_description || "");
      cell(row, series.matched ? "yes" : "no", series.matched ? "ok" : "");
      cell(row, (series.reasons || []).join("; "));
    });
  });
  box.appendChild(table);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("section.rule").forEach((section) => {
    const name = section.dataset.ruleName;
    const status = section.querySelector(".result");
    const error = section.querySelector(".field-error");
    const save = section.querySelector("button.save");
    if (save) {
      save.addEventListener("click", async () => {
        const definition = parsedDefinition(section);
        if (definition === null) return;
        const result = await window.dicomNode.callApi("PUT", "/api/v1/rules/" + encodeURIComponent(name), definition);
        if (result.ok) {
          window.dicomNode.showResult(status, "saved" + (result.body && result.body.note ? ": " + result.body.note : ""), true);
        } else {
          error.textContent = refusal(result);
          window.dicomNode.showResult(status, "not saved", false);
        }
      });
    }
    const tryButton = section.querySelector("button.try");
    if (!tryButton) return;
    tryButton.addEventListener("click", async () => {
      const definition = parsedDefinition(section);
      if (definition === null) return;
      window.dicomNode.showResult(status, "trying…", true);
      const result = await window.dicomNode.callApi("POST", "/api/v1/rules/test", { rule: definition });
      if (result.ok) {
        window.dicomNode.showResult(status, "", true);
        showTrial(section, result.body);
      } else {
        error.textContent = refusal(result);
        window.dicomNode.showResult(status, "cannot try it", false);
      }
    });
  });
});
