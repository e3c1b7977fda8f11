/* The portal's scripts: confirmations, uploads through POST /v1/files, and the charts (Chart.js), which
   read the REST API with the session's cookie. Nothing here talks to any other host. */
(function () {
  "use strict";

  // Okabe & Ito's palette: told apart by people with any common colour-vision deficiency
  var PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];
  var DASHES = [[], [6, 3], [2, 2], [10, 4, 2, 4], [1, 3]];
  var POLL_MS = 3000;
  var charts = {};
  window.lomoCharts = charts; // for people poking at a page, and for the browser tests

  function $(selector, root) { return (root || document).querySelector(selector); }
  function $$(selector, root) { return Array.prototype.slice.call((root || document).querySelectorAll(selector)); }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } }).then(function (r) {
      if (r.status === 401) { window.location.assign("/signin?next=" + encodeURIComponent(location.pathname)); }
      if (!r.ok) { throw new Error(url + ": HTTP " + r.status); }
      return r.json();
    });
  }

  function say(text) {
    var status = $("#chart-status");
    if (status) { status.textContent = text; }
  }

  // --- forms ------------------------------------------------------------------------------------------
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) { event.preventDefault(); }
  }, true);

  document.addEventListener("change", function (event) {
    var target = event.target;
    if (target.hasAttribute && target.hasAttribute("data-toggles")) {
      document.getElementById(target.getAttribute("data-toggles")).classList.toggle("only-differences", target.checked);
    }
  });
  // a file chosen is uploaded at once; its change goes no further (the form's prediction waits for the upload)
  document.addEventListener("change", function (event) {
    var target = event.target;
    if (target.matches && target.matches("input[type=file][data-upload-for]")) {
      event.stopPropagation();
      upload(target);
    }
  }, true);

  function problemText(body) {
    var error = (body && body.error) || {};
    var details = error.details || [];
    if (!details.length) { return error.message || "the upload was refused"; }
    return details.map(function (d) { return d.message; }).join("\n");
  }

  function upload(input) {
    var file = input.files && input.files[0];
    if (!file) { return; }
    var selectId = input.getAttribute("data-upload-for");
    var select = selectId ? document.getElementById(selectId) : null;
    var slot = document.getElementById(select ? "err-upload-" + select.name : "err-upload");
    var purposeFrom = input.getAttribute("data-purpose-from");
    var purpose = purposeFrom ? document.getElementById(purposeFrom).value : (input.getAttribute("data-purpose") || "fine-tune");
    var form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    if (slot) { slot.textContent = "Uploading and checking " + file.name + "…"; slot.classList.add("pending"); }
    input.setAttribute("aria-busy", "true");
    fetch("/v1/files", { method: "POST", body: form, credentials: "same-origin" }).then(function (r) {
      return r.json().then(function (body) { return { ok: r.ok, body: body }; });
    }).then(function (answer) {
      input.removeAttribute("aria-busy");
      if (slot) { slot.classList.remove("pending"); }
      if (!answer.ok) {
        if (slot) { slot.textContent = problemText(answer.body); }
        if (select) { select.setAttribute("aria-invalid", "true"); select.closest(".field").classList.add("invalid"); }
        input.value = "";
        return;
      }
      var f = answer.body;
      if (input.hasAttribute("data-reload") || !select) { window.location.reload(); return; }
      if (slot) { slot.textContent = ""; }
      select.removeAttribute("aria-invalid");
      select.closest(".field").classList.remove("invalid");
      var label = f.filename + " · " + f.records + " records · " + size(f.bytes) + " · " + f.id;
      $$("select[name=training_file], select[name=validation_file]").forEach(function (s) {
        var option = document.createElement("option");
        option.value = f.id;
        option.textContent = label;
        s.appendChild(option);
      });
      select.value = f.id;
      select.dispatchEvent(new Event("change", { bubbles: true }));
    }).catch(function (e) {
      input.removeAttribute("aria-busy");
      if (slot) { slot.textContent = "The upload failed: " + e.message; }
    });
  }

  function size(bytes) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], value = bytes, unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return unit === 0 ? value + " B" : value.toFixed(value < 10 ? 2 : 1) + " " + units[unit];
  }

  // a problem the prediction found in a setting under "More settings" opens it, so that it is seen
  document.addEventListener("htmx:afterSettle", function () {
    $$("details").forEach(function (details) {
      if ($$(".field-error", details).some(function (p) { return p.textContent.trim(); })) { details.open = true; }
    });
    $$(".field").forEach(function (field) {
      var slot = $(".field-error", field);
      if (!slot || !slot.id || slot.id.indexOf("err-upload") === 0) { return; }
      var bad = slot.textContent.trim() !== "";
      field.classList.toggle("invalid", bad);
      var input = $("input, select, textarea", field);
      if (input) { if (bad) { input.setAttribute("aria-invalid", "true"); } else { input.removeAttribute("aria-invalid"); } }
    });
  });

  // --- smoothing --------------------------------------------------------------------------------------
  function smoothingWeight() {
    var range = $("#smoothing");
    return range ? Number(range.value) : 0;
  }

  /* exponential moving average, debiased at the start (so the first points are not pulled to 0) */
  function smooth(points, weight) {
    var out = [], last = 0, n = 0;
    points.forEach(function (p) {
      n += 1;
      last = weight * last + (1 - weight) * p.y;
      out.push({ x: p.x, y: weight > 0 ? last / (1 - Math.pow(weight, n)) : p.y });
    });
    return out;
  }

  function onSmoothing(redraw) {
    var range = $("#smoothing");
    if (!range) { return; }
    range.addEventListener("input", function () {
      $("#smoothing-value").textContent = Number(range.value).toFixed(2);
      redraw();
    });
  }

  // --- charts -----------------------------------------------------------------------------------------
  function lineChart(canvas, datasets, yTitle, logarithmic) {
    return new Chart(canvas, {
      type: "line",
      data: { datasets: datasets },
      options: {
        animation: false, parsing: false, normalized: true, responsive: true, maintainAspectRatio: false,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        scales: {
          x: { type: "linear", title: { display: true, text: "step" } },
          y: { type: logarithmic ? "logarithmic" : "linear", title: { display: true, text: yTitle } }
        },
        plugins: { legend: { display: datasets.length > 1 } }
      }
    });
  }

  function series(label, colour, dash, extra) {
    var base = { label: label, data: [], borderColor: colour, backgroundColor: colour, borderDash: dash || [],
                 borderWidth: 2, pointRadius: 0, tension: 0 };
    Object.keys(extra || {}).forEach(function (k) { base[k] = extra[k]; });
    return base;
  }

  /* every metric point of a job, page by page (a page ends with whole steps) */
  function metricsAfter(jobId, afterStep) {
    var url = "/v1/fine_tuning/jobs/" + encodeURIComponent(jobId) + "/metrics?limit=10000" +
      (afterStep === null ? "" : "&after_step=" + afterStep);
    return getJSON(url).then(function (page) {
      var points = page.data;
      if (!page.has_more || !points.length) { return points; }
      return metricsAfter(jobId, points[points.length - 1].step).then(function (rest) { return points.concat(rest); });
    });
  }

  function jobCharts() {
    var root = $("#job-charts");
    if (!root) { return; }
    var jobId = root.getAttribute("data-job");
    var train = [], val = [], lr = [], tps = [], lastStep = null;
    var loss = lineChart($("#chart-loss"), [
      series("train (smoothed)", PALETTE[0]),
      series("train", PALETTE[0] + "55", [], { borderWidth: 1 }),
      series("validation", PALETTE[1], [6, 3], { pointRadius: 3, pointStyle: "rectRot" })
    ], "loss");
    var lrChart = lineChart($("#chart-lr"), [series("learning rate", PALETTE[2])], "learning rate");
    var tpsChart = lineChart($("#chart-tps"), [series("tokens/s", PALETTE[3])], "tokens per second");
    var memory = new Chart($("#chart-memory"), {
      type: "bar", data: { labels: [], datasets: [] },
      options: { animation: false, responsive: true, maintainAspectRatio: false, indexAxis: "y",
                 scales: { x: { stacked: true, title: { display: true, text: "MiB" } }, y: { stacked: true } } }
    });
    charts.loss = loss; charts.lr = lrChart; charts.tokens = tpsChart; charts.memory = memory;

    function redraw() {
      loss.data.datasets[0].data = smooth(train, smoothingWeight());
      loss.data.datasets[1].data = train;
      loss.data.datasets[2].data = val;
      lrChart.data.datasets[0].data = lr;
      tpsChart.data.datasets[0].data = tps;
      [loss, lrChart, tpsChart].forEach(function (c) { c.update(); });
      var canvas = $("#chart-loss");
      canvas.setAttribute("data-points", String(train.length + val.length));
      canvas.setAttribute("data-train-points", String(train.length));
      canvas.setAttribute("data-val-points", String(val.length));
      say(train.length ? (train.length + " training steps, " + val.length + " validation points") : "No metrics yet.");
    }
    onSmoothing(redraw);

    var PARTS = ["parameters", "gradients", "optimizer_state", "activations", "other"];
    function drawMemory(summary) {
      var rows = [];
      var per = summary.predicted && summary.predicted.available ? summary.predicted.per_device : null;
      if (per) { rows.push({ label: "predicted (per device)", part: per }); }
      summary.measured.forEach(function (m) { rows.push({ label: "measured, rank " + m.rank + " (" + m.device + ")", part: m }); });
      memory.data.labels = rows.map(function (r) { return r.label; });
      memory.data.datasets = PARTS.map(function (name, i) {
        return { label: name.replace("_", " "), backgroundColor: PALETTE[i], borderColor: "#fff", borderWidth: 1,
                 data: rows.map(function (r) { return (r.part[name + "_bytes"] || 0) / 1048576; }) };
      });
      memory.update();
      var canvas = $("#chart-memory");
      canvas.setAttribute("data-rows", String(rows.length));
      canvas.setAttribute("data-measured-ranks", String(summary.measured.length));
    }

    function active() {
      var live = $("#job-live");
      return live && live.getAttribute("data-active") === "1";
    }

    var seen = {};
    function add(p) {
      var key = p.kind + ":" + p.step;
      if (seen[key]) { return; }
      seen[key] = true;
      if (p.kind === "val") { val.push({ x: p.step, y: p.loss }); return; }
      train.push({ x: p.step, y: p.loss });
      if (p.lr !== null) { lr.push({ x: p.step, y: p.lr }); }
      if (p.tokens_per_s !== null) { tps.push({ x: p.step, y: p.tokens_per_s }); }
    }
    function byStep(a, b) { return a.x - b.x; }

    /* While the job runs, each poll reads from the last step seen (again: a validation point of that step
       may come after its training point); once it has ended, everything is read once more, so the final
       charts hold exactly what the API has. */
    function poll() {
      var wasActive = active();
      var from = wasActive && lastStep !== null ? Math.max(lastStep - 1, 0) : null;
      if (!wasActive) { train = []; val = []; lr = []; tps = []; seen = {}; }
      Promise.all([metricsAfter(jobId, from), getJSON("/v1/fine_tuning/jobs/" + encodeURIComponent(jobId) + "/memory")])
        .then(function (answers) {
          answers[0].forEach(add);
          [train, val, lr, tps].forEach(function (s) { s.sort(byStep); });
          if (answers[0].length) { lastStep = answers[0][answers[0].length - 1].step; }
          redraw();
          drawMemory(answers[1]);
        })
        .catch(function (e) { say("The charts could not be updated: " + e.message); })
        .then(function () { if (wasActive) { window.setTimeout(poll, POLL_MS); } });
    }
    poll();
  }

  function compareChart() {
    var canvas = $("#chart-compare");
    if (!canvas) { return; }
    var ids = canvas.getAttribute("data-jobs").split(",").filter(Boolean);
    var raw = {};
    var datasets = [];
    ids.forEach(function (id, i) {
      datasets.push(series(id + " train", PALETTE[i % PALETTE.length], DASHES[i % DASHES.length]));
      datasets.push(series(id + " validation", PALETTE[i % PALETTE.length], [2, 3],
                           { pointRadius: 3, pointStyle: ["circle", "rect", "triangle", "rectRot", "star"][i % 5] }));
    });
    var chart = lineChart(canvas, datasets, "loss");
    charts.compare = chart;
    function redraw() {
      ids.forEach(function (id, i) {
        var points = raw[id] || { train: [], val: [] };
        chart.data.datasets[2 * i].data = smooth(points.train, smoothingWeight());
        chart.data.datasets[2 * i + 1].data = points.val;
      });
      chart.update();
      canvas.setAttribute("data-curves", String(ids.filter(function (id) { return raw[id] && raw[id].train.length; }).length));
    }
    onSmoothing(redraw);
    Promise.all(ids.map(function (id) { return metricsAfter(id, null); })).then(function (all) {
      all.forEach(function (points, i) {
        raw[ids[i]] = {
          train: points.filter(function (p) { return p.kind === "train"; }).map(function (p) { return { x: p.step, y: p.loss }; }),
          val: points.filter(function (p) { return p.kind === "val"; }).map(function (p) { return { x: p.step, y: p.loss }; })
        };
      });
      redraw();
      say(ids.length + " jobs");
    }).catch(function (e) { say("The curves could not be loaded: " + e.message); });
  }

  function clock(ms) {
    var d = new Date(ms);
    return d.toISOString().slice(5, 16).replace("T", " ");
  }

  function timeline() {
    var canvas = $("#chart-timeline");
    var source = $("#timeline-data");
    if (!canvas || !source) { return; }
    var window_ = JSON.parse(source.textContent);
    var leases = window_.leases;
    var lanes = Array.from(new Set(leases.map(function (l) { return l.lane; }))).sort();
    var users = Array.from(new Set(leases.map(function (l) { return l.user; }))).sort();
    var datasets = users.map(function (user, i) {
      return {
        label: user, backgroundColor: PALETTE[i % PALETTE.length], borderColor: "#222", borderWidth: 1, borderSkipped: false,
        data: leases.filter(function (l) { return l.user === user; }).map(function (l) {
          return { x: [l.start, l.end], y: l.lane, job: l.job };
        })
      };
    });
    charts.timeline = new Chart(canvas, {
      type: "bar",
      data: { labels: lanes, datasets: datasets },
      options: {
        animation: false, indexAxis: "y", responsive: true, maintainAspectRatio: false, grouped: false,
        scales: {
          x: { type: "linear", min: window_.from, max: window_.to, beginAtZero: false,
               ticks: { callback: function (v) { return clock(v); } }, title: { display: true, text: "UTC" } },
          y: { stacked: true }
        },
        plugins: { tooltip: { callbacks: { label: function (ctx) {
          var raw = ctx.raw;
          return ctx.dataset.label + (raw.job ? " · " + raw.job : "") + ": " + clock(raw.x[0]) + " to " + clock(raw.x[1]) + " UTC";
        } } } }
      }
    });
    canvas.parentNode.style.height = Math.max(160, 40 + lanes.length * 28) + "px";
  }

  document.addEventListener("DOMContentLoaded", function () {
    jobCharts();
    compareChart();
    timeline();
  });
})();
