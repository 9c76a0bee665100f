// tunefarm dashboard: polls the farm's JSON API (the session cookie authenticates reads) and redraws.
"use strict";
var tunefarm = (function () {
  var POLL_MS = 2000;
  var LINE = "#1f77b4";

  function esc(value) {
    return String(value === null || value === undefined ? "" : value).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function ms(v) { return v === null || v === undefined ? "-" : Number(v).toPrecision(4) + " ms"; }
  function ago(t) {
    if (!t) return "-";
    var s = Math.max(0, Date.now() / 1000 - t);
    return s < 90 ? Math.round(s) + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : (s / 3600).toFixed(1) + " h ago";
  }
  function badge(state) { return '<span class="state ' + esc(state) + '">' + esc(state) + "</span>"; }
  function describeTarget(t) {
    if (!t || !t.kind) return "-";
    var parts = [t.tag || t.kind];
    [["device", "device"], ["mcpu", "mcpu"], ["arch", "arch"], ["num-cores", "cores"]].forEach(function (p) {
      if (t[p[0]] !== undefined) parts.push(p[1] + "=" + t[p[0]]);
    });
    return parts.join(" ");
  }
  function problem(text) { document.getElementById("problem").textContent = text || ""; }

  function api(path) {
    return fetch(path, {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 401) { window.location = "/login?next=" + encodeURIComponent(window.location.pathname); }
      if (!r.ok) return r.json().then(function (b) { throw new Error(b.error || ("HTTP " + r.status)); });
      return r;
    });
  }
  function apiJson(path) { return api(path).then(function (r) { return r.json(); }); }

  function fill(id, rows, cols, empty) {
    var body = document.querySelector("#" + id + " tbody");
    body.innerHTML = rows.length ? rows.join("") : '<tr><td colspan="' + cols + '" class="muted">' + esc(empty) + "</td></tr>";
  }

  // -- index page ----------------------------------------------------------------------------------
  function refreshIndex() {
    apiJson("/api/devices").then(function (view) {
      fill("devices", view.devices.map(function (d) {
        var status = badge(d.status) + (d.busy ? ' <span class="muted">busy</span>' : "");
        return "<tr><td>" + esc(d.key) + "</td><td>" + esc(d.agent_id) + "</td><td>" + status + "</td><td>" +
          esc(d.last_seen_s === null ? d.source : ago(d.last_seen)) + "</td><td>" + esc(describeTarget(d.target)) +
          "</td><td>" + esc((d.cpu || "?") + " (" + d.num_cores + " cores, " + (d.threads || "?") + " threads)") + "</td><td>" +
          (d.job ? '<a href="/jobs/' + esc(d.job) + '">' + esc(d.job) + "</a>" : "-") + "</td></tr>";
      }), 7, "no devices yet: start one with tunefarm agent --farm URL --key KEY");
      document.getElementById("keys").textContent = "tracker " + view.tracker + (view.tracker_error ? " — " + view.tracker_error : "") +
        (view.keys.length ? " · keys: " + view.keys.map(function (k) {
          return k.key + " (" + k.total + " agents, " + k.free + " free, " + k.pending + " waiting)";
        }).join(", ") : "");
      document.getElementById("farm-meta").textContent = "tracker " + view.tracker;
    }).catch(function (e) { problem("devices: " + e.message); });
    apiJson("/api/jobs").then(function (data) {
      problem("");
      fill("jobs", data.jobs.slice().reverse().map(function (j) {
        var note = j.error || (j.queue_position ? "queue position " + j.queue_position : "");
        return '<tr class="job-row" data-state="' + esc(j.state) + '"><td><a href="/jobs/' + esc(j.id) + '">' + esc(j.id) +
          "</a></td><td>" + badge(j.state) + "</td><td>" + esc(j.key) + "</td><td>" + esc(j.model) +
          '</td><td class="num">' + j.trials + "/" + j.budget + '</td><td class="num">' + ms(j.best_ms) +
          '</td><td class="num">' + j.attempts + "</td><td>" + ago(j.created) + "</td><td>" + esc(note) + "</td></tr>";
      }), 9, "no jobs yet: tunefarm submit JOB.yaml");
    }).catch(function (e) { problem("jobs: " + e.message); });
  }

  // -- job page ------------------------------------------------------------------------------------
  var jobId = decodeURIComponent(window.location.pathname.split("/").pop());
  var charts = {};
  var events = [];

  function makeChart(id, title, xLabel, timeAxis) {
    var el = document.getElementById(id);
    var opts = {
      title: title, width: 540, height: 280,
      scales: {x: {time: timeAxis}},
      // best-so-far is a step function: it holds until a batch finds something faster
      series: [{label: xLabel}, {label: "best est. (ms)", stroke: LINE, width: 2, spanGaps: false,
                                 paths: uPlot.paths.stepped({align: 1}),
                                 points: {show: true, size: 7, fill: LINE, stroke: LINE}}],
      axes: [{label: xLabel}, {label: "ms", size: 70, values: function (u, vals) {
        return vals.map(function (v) { return Number(v).toPrecision(3); });
      }}],
    };
    return new uPlot(opts, [[], []], el);
  }

  function drawCharts() {
    if (!charts.trials) {
      charts.trials = makeChart("chart-trials", "vs trials", "trials", false);
      charts.time = makeChart("chart-time", "vs time", "time", true);
      window.tunefarmCharts = charts;
    }
    var withEst = events.filter(function (e) { return e.estimated_ms !== null && e.estimated_ms !== undefined; });
    charts.trials.setData([withEst.map(function (e) { return e.trials; }), withEst.map(function (e) { return e.estimated_ms; })]);
    charts.time.setData([withEst.map(function (e) { return e.time; }), withEst.map(function (e) { return e.estimated_ms; })]);
    document.getElementById("chart-trials").setAttribute("data-points", withEst.length);
  }

  function refreshProgress() {
    return api("/api/jobs/" + encodeURIComponent(jobId) + "/progress?from=" + events.length).then(function (r) {
      return r.text();
    }).then(function (text) {
      text.split("\n").forEach(function (line) {
        if (!line) return;
        var ev = JSON.parse(line);
        if (ev.type === "progress" && ev.n === events.length) events.push(ev);
      });
      drawCharts();
    });
  }

  function refreshJob() {
    var base = "/api/jobs/" + encodeURIComponent(jobId);
    apiJson(base).then(function (j) {
      problem("");
      document.title = "tunefarm: " + j.id;
      document.getElementById("job-title").textContent = j.id;
      document.getElementById("job-summary").innerHTML = badge(j.state) + " " + esc(j.model) + " on key <b>" + esc(j.key) +
        "</b> · trials " + j.trials + "/" + j.budget + " · best est. " + ms(j.best_ms) + " · attempt " + j.attempts +
        (j.queue_position ? " · queue position " + j.queue_position : "") + (j.error ? ' · <span class="error">' + esc(j.error) + "</span>" : "");
      document.getElementById("job-summary").setAttribute("data-state", j.state);
      var links = j.files.map(function (f) {
        return '<a href="' + base + "/files/" + encodeURIComponent(f) + '?download=1">' + esc(f) + "</a>";
      });
      if (j.files.indexOf(j.file_names.db_records) >= 0) {  // the bundle needs tuning records
        links.unshift('<a href="' + base + '/bundle"><b>everything (.tar.gz: best records, database, report)</b></a>');
      }
      document.getElementById("downloads").innerHTML = links.join(" ") || '<span class="muted">nothing yet</span>';
      document.querySelector("#history tbody").innerHTML = j.history.map(function (h) {
        return "<tr><td>" + esc(new Date(h[0] * 1000).toLocaleString()) + "</td><td>" + esc(h[1]) + "</td></tr>";
      }).join("");
    }).catch(function (e) { problem(e.message); });
    refreshProgress().catch(function (e) { problem("progress: " + e.message); });
  }

  function refreshTasks() {
    apiJson("/api/jobs/" + encodeURIComponent(jobId) + "/tasks").then(function (data) {
      fill("tasks", data.tasks.map(function (t, i) {
        return '<tr><td class="num">' + i + "</td><td>" + esc(t.task) + '</td><td class="num">' + t.weight +
          '</td><td class="num">' + t.trials + '</td><td class="num">' + t.failed + '</td><td class="num">' +
          (t.best_us === null ? "-" : t.best_us.toFixed(2)) + "</td><td>" + (t.tuned ? "yes" : '<span class="error">no</span>') + "</td></tr>";
      }), 7, "no records yet");
    }).catch(function () { /* the next poll retries (the worker may be writing) */ });
  }

  return {
    startIndex: function () { refreshIndex(); setInterval(refreshIndex, POLL_MS); },
    startJob: function () {
      drawCharts(); refreshJob(); refreshTasks();
      setInterval(refreshJob, POLL_MS); setInterval(refreshTasks, 3 * POLL_MS);
    },
  };
})();
