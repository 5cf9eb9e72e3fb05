// storygpt-v generate panel: live progress from the story's event stream.
//
// The panel (#generate-panel) is server-rendered and works without this file. Here we follow
// /api/stories/{id}/events (server-sent events; the browser reconnects and resumes with
// Last-Event-ID by itself) and:
// - move the frame and step progress bars on `progress`;
// - refresh the frames strip when a frame is stored (`frame`), so frames appear as they finish;
// - on `caption` (story continuation: the model wrote a new caption), refresh the strip and
//   the caption editor (unless a caption is being edited there, which a refresh would lose);
// - re-render the panel when a job is queued, ends, or is cancelled.
// - estimate the time left from the step times it measures (the server's measurement in
//   data-step-ms until then);
// - show the live preview of the frame being drawn (`preview`: a PNG data URL every few
//   steps) over its place in the strip, kept across the strip's refreshes until the frame's
//   own image arrives.
// Announcements go to the panel's aria-live status line only for frames and endings, not for
// every step, so screen readers are not flooded.
(function () {
  "use strict";

  function panel() {
    return document.getElementById("generate-panel");
  }

  // Jobs whose end this page has seen, with what was said about it. A panel showing one of
  // them as still running is stale: a form's answer written before the job ended can arrive
  // after the refresh its end caused (the Cancel button's, typically). It is refreshed again.
  var ended = {};
  var staleRefreshes = 0;

  // What the next panel swapped in from refreshPanel should say.
  var panelMessage = null;

  // Each refresh names its own element as the source: htmx serialises requests per source
  // (body by default), and a request queued behind another resolves its promise before it
  // is even sent, so a message set then was wiped by the late swap.
  function refreshPanel(storyId, message) {
    if (!window.htmx) return;
    panelMessage = message || null;
    window.htmx.ajax("GET", "/ui/stories/" + storyId + "/generate-panel", {
      source: "#generate-panel",
      target: "#generate-panel",
      swap: "outerHTML",
    });
  }

  // Jobs that added captions (story continuation).
  var continued = {};

  // The caption editor again, unless a caption is being edited there (a refresh would lose it).
  function refreshCaptions(storyId) {
    var editor = document.getElementById("captions-editor");
    if (!window.htmx || !editor || editor.contains(document.activeElement)) return;
    window.htmx.ajax("GET", "/ui/stories/" + storyId + "/captions", {
      source: "#captions-editor",
      target: "#captions-editor",
      swap: "outerHTML",
    });
  }

  function refreshStrip() {
    if (window.htmx) window.htmx.trigger(document.body, "frames-changed");
  }

  function setText(id, text) {
    var el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  function setBar(id, value, max) {
    var el = document.getElementById(id);
    if (!el) return;
    el.max = Math.max(1, max);
    el.value = Math.min(value, el.max);
    el.textContent = value + " of " + max;
  }

  function about(seconds) {
    if (seconds < 1) return "under a second";
    if (seconds < 90) return "about " + Math.round(seconds) + " s";
    return "about " + Math.round(seconds / 60) + " min";
  }

  // Milliseconds per step, a moving average of what this page measured.
  var stepMs = 0;
  var lastStep = null;

  function measure(d) {
    var now = performance.now();
    if (lastStep && lastStep.job === d.job_id && lastStep.frame === d.frame && d.step > lastStep.step) {
      var per = (now - lastStep.t) / (d.step - lastStep.step);
      stepMs = stepMs ? 0.8 * stepMs + 0.2 * per : per;
    }
    lastStep = { job: d.job_id, frame: d.frame, step: d.step, t: now };
    var p = panel();
    var ms = stepMs || Number(p && p.dataset.stepMs) || 0;
    if (!ms) return;
    var left = Math.max(0, (d.frames - d.frames_done) * d.steps - d.step);
    setText("job-eta", "Done in " + about((left * ms) / 1000) + ".");
  }

  // position -> the latest preview event of a frame still being drawn
  var previews = {};

  function showPreview(d) {
    var li = document.getElementById("frame-" + d.position);
    if (!li) return;
    var holder = li.querySelector(".frame-image, .placeholder");
    if (!holder) return;
    var img = holder.querySelector("img.live-preview");
    if (!img) {
      img = document.createElement("img");
      img.className = "live-preview";
      holder.appendChild(img);
    }
    img.src = d.image;
    img.alt = "Frame " + (d.position + 1) + " being drawn: step " + d.step + " of " + d.steps;
  }

  document.addEventListener("htmx:afterSwap", function (event) {
    var target = event.detail && event.detail.target;
    if (target && target.id === "generate-panel") {
      var p = panel();
      var id = p && p.dataset.jobId;
      // At most a few times: the database said the job ended before its event was sent.
      if (id && ended[id] !== undefined && p.dataset.storyId && staleRefreshes < 3) {
        staleRefreshes += 1;
        refreshPanel(p.dataset.storyId, ended[id]);
      } else if (panelMessage) {
        setText("generate-status", panelMessage);
        panelMessage = null;
      }
      return;
    }
    if (!target || target.id !== "frames-strip") return;
    Object.keys(previews).forEach(function (position) {
      var li = document.getElementById("frame-" + position);
      if (li && (li.dataset.status === "running" || li.dataset.status === "queued")) {
        showPreview(previews[position]);
      } else {
        delete previews[position];
      }
    });
  });

  // A job that ended draws no more: its previews go (a cancelled frame keeps its old image).
  function clearPreviews() {
    previews = {};
    document.querySelectorAll("#frames-strip img.live-preview").forEach(function (img) {
      img.remove();
    });
  }

  function follow(storyId) {
    if (!window.EventSource) return;
    var source = new EventSource("/api/stories/" + storyId + "/events");
    function on(name, handler) {
      source.addEventListener(name, function (e) {
        var data;
        try {
          data = JSON.parse(e.data);
        } catch (err) {
          return;
        }
        handler(data);
      });
    }
    function activeJob() {
      var p = panel();
      return p && p.dataset.jobId ? Number(p.dataset.jobId) : null;
    }
    on("queued", function (d) {
      if (activeJob() === null) refreshPanel(storyId);
      // The shown job went back to the queue (another story's turn, or a restart): say so,
      // with why; its bars keep what it has drawn.
      if (d.requeued && activeJob() === d.job_id) {
        setText("job-status", "queued");
        if (d.reason) setText("generate-status", "Waiting: " + d.reason + ".");
      }
      refreshStrip();
    });
    on("started", function (d) {
      if (activeJob() !== d.job_id) refreshPanel(storyId);
      setText("job-status", "running");
      refreshStrip();
    });
    on("progress", function (d) {
      if (activeJob() !== d.job_id) return refreshPanel(storyId);
      setText("job-status", "running");
      setBar("frames-progress", d.frames_done, d.frames);
      setText("frames-progress-text", d.frames_done + " of " + d.frames);
      setBar("steps-progress", d.step, d.steps);
      setText("steps-progress-text", d.step + " of " + d.steps);
      setText("current-frame-label", "frame " + d.frame + " of " + d.frames);
      setText("job-queue", "");
      measure(d);
    });
    on("preview", function (d) {
      previews[d.position] = d;
      showPreview(d);
    });
    on("frame", function (d) {
      delete previews[d.position];
      setBar("frames-progress", d.frames_done, d.frames);
      setText("frames-progress-text", d.frames_done + " of " + d.frames);
      setText(
        "generate-status",
        "Frame " + (d.position + 1) + " is ready (" + d.frames_done + " of " + d.frames + " done)."
      );
      refreshStrip();
    });
    on("caption", function (d) {
      setText(
        "generate-status",
        "The model continued the story: frame " + (d.story_position + 1) + ", \u201c" + d.caption + "\u201d."
      );
      refreshStrip();
      continued[d.job_id] = true;
      refreshCaptions(storyId);
    });
    function end(d, message) {
      ended[d.job_id] = message;
      // Once more when a continuation ends, in case the editor was busy when a caption came.
      if (continued[d.job_id]) refreshCaptions(storyId);
      clearPreviews();
      refreshStrip();
      refreshPanel(storyId, message);
    }
    on("completed", function (d) {
      end(d, "Done: " + d.frames_done + " of " + d.frames + " frames drawn.");
    });
    on("failed", function (d) {
      end(d, "Generation failed: " + (d.error || "unknown error"));
    });
    on("cancelled", function (d) {
      end(d, "Cancelled: " + d.frames_done + " of " + d.frames + " frames were drawn and kept.");
    });
  }

  function start() {
    var p = panel();
    if (p && p.dataset.storyId) follow(p.dataset.storyId);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
