// agentd console: the only script the pages load (CSP script-src 'self'). The pages work
// without it; it adds a find-in-table box and submits filter menus on change.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.submit());
  }
  for (const box of document.querySelectorAll("input[data-filter]")) {
    const table = document.getElementById(box.dataset.filter);
    if (!table) continue;
    box.addEventListener("input", () => {
      const needle = box.value.trim().toLowerCase();
      for (const row of table.tBodies[0].rows) {
        row.classList.toggle("hidden", needle !== "" && !row.textContent.toLowerCase().includes(needle));
      }
    });
  }
});
