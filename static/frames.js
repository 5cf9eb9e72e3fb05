// storygpt-v frames strip: the "Where characters are" view. Each frame with an image has a
// toggle (#attention-{position}, hidden without this script) that shows, over the frame, the
// cross-attention heatmap of one character mention of its caption: bright where the model
// attended to that word, dark elsewhere (the map multiplies the image, like a spotlight).
// Buttons under the frame switch between the caption's mentions. The strip is re-rendered
// by HTMX (after a redraw, and every few seconds while frames are drawn), so which views are
// open, and on which mention, is remembered by frame id and restored after each swap.
(function () {
  "use strict";

  // frame id -> index of the mention shown
  var open = {};

  function frameOf(el) {
    return el.closest(".frame");
  }

  function viewOf(toggle) {
    return document.getElementById(toggle.getAttribute("aria-controls"));
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function removeOverlay(frame) {
    var old = frame.querySelector(".attention-overlay");
    if (old) old.remove();
  }

  function close(toggle) {
    var frame = frameOf(toggle);
    toggle.setAttribute("aria-pressed", "false");
    var view = viewOf(toggle);
    if (view) {
      clear(view);
      view.hidden = true;
    }
    removeOverlay(frame);
    delete open[frame.dataset.frameId];
  }

  function label(map) {
    var who = map.characters.length ? map.characters.join(" and ") : "nobody we could resolve";
    return map.characters.length === 1 && map.characters[0] === map.text
      ? map.text
      : "\u201c" + map.text + "\u201d \u2192 " + who;
  }

  // Shows mention `index` of `maps` over the frame's image.
  function show(toggle, maps, index) {
    var frame = frameOf(toggle);
    var view = viewOf(toggle);
    var number = toggle.dataset.frameNumber;
    var map = maps[index];
    open[frame.dataset.frameId] = index;
    removeOverlay(frame);
    var holder = frame.querySelector(".frame-image");
    var overlay = document.createElement("img");
    overlay.className = "attention-overlay";
    // The map changes with the image; the version (its seed) keeps the browser from showing
    // the map of the image before a redraw.
    overlay.src = map.image_url + "?v=" + encodeURIComponent(toggle.dataset.version || "");
    overlay.alt = "Heatmap over frame " + number + " of " + label(map) +
      ": bright where the model drew this character.";
    if (holder) holder.appendChild(overlay);
    var buttons = view.querySelectorAll("button[data-index]");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].setAttribute("aria-pressed", String(Number(buttons[i].dataset.index) === index));
    }
    var caption = view.querySelector(".attention-label");
    if (caption) caption.textContent = "Showing " + label(map) + ".";
  }

  function render(toggle, maps, index) {
    var view = viewOf(toggle);
    var position = toggle.id.replace("attention-", "");
    clear(view);
    view.hidden = false;
    if (!maps.length) {
      var none = document.createElement("p");
      none.className = "attention-label";
      none.textContent = "This frame's caption names no character, so there is no heatmap.";
      view.appendChild(none);
      removeOverlay(frameOf(toggle));
      return;
    }
    var group = document.createElement("div");
    group.className = "attention-mentions";
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", "Mentions in frame " + toggle.dataset.frameNumber);
    maps.forEach(function (map, k) {
      var b = document.createElement("button");
      b.type = "button";
      b.id = "attention-" + position + "-" + k;
      b.dataset.index = String(k);
      b.textContent = label(map);
      b.setAttribute("aria-pressed", "false");
      group.appendChild(b);
    });
    view.appendChild(group);
    var caption = document.createElement("p");
    caption.className = "attention-label";
    caption.setAttribute("aria-live", "polite");
    view.appendChild(caption);
    view._maps = maps;
    show(toggle, maps, Math.min(index, maps.length - 1));
  }

  function load(toggle, index) {
    var view = viewOf(toggle);
    toggle.setAttribute("aria-pressed", "true");
    open[frameOf(toggle).dataset.frameId] = index;
    fetch(toggle.dataset.attentionUrl, { headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) throw new Error("the server answered " + response.status);
        return response.json();
      })
      .then(function (maps) {
        // The strip may have been swapped meanwhile; only draw into a toggle still shown.
        if (toggle.isConnected && toggle.getAttribute("aria-pressed") === "true") {
          render(toggle, maps, index);
        }
      })
      .catch(function (error) {
        if (!toggle.isConnected) return;
        clear(view);
        view.hidden = false;
        var p = document.createElement("p");
        p.className = "attention-label error";
        p.setAttribute("role", "alert");
        p.textContent = "The heatmaps could not be loaded (" + error.message + ").";
        view.appendChild(p);
      });
  }

  function setUp(root) {
    var toggles = root.querySelectorAll ? root.querySelectorAll(".attention-toggle") : [];
    for (var i = 0; i < toggles.length; i++) {
      var toggle = toggles[i];
      toggle.hidden = false;
      var id = frameOf(toggle).dataset.frameId;
      if (Object.prototype.hasOwnProperty.call(open, id)) load(toggle, open[id]);
    }
  }

  document.addEventListener("click", function (event) {
    var target = event.target.closest ? event.target.closest("button") : null;
    if (!target) return;
    if (target.classList.contains("attention-toggle")) {
      if (target.getAttribute("aria-pressed") === "true") close(target);
      else load(target, 0);
      return;
    }
    var view = target.closest(".attention-view");
    if (view && target.dataset.index !== undefined && view._maps) {
      var toggle = document.querySelector("[aria-controls='" + view.id + "']");
      if (toggle) show(toggle, view._maps, Number(target.dataset.index));
    }
  });

  document.addEventListener("keydown", function (event) {
    // Escape closes the view the focus is in, and gives the focus back to its toggle.
    if (event.key !== "Escape") return;
    var view = event.target.closest ? event.target.closest(".attention-view") : null;
    if (!view) return;
    var toggle = document.querySelector("[aria-controls='" + view.id + "']");
    if (toggle) {
      close(toggle);
      toggle.focus();
    }
  });

  document.addEventListener("htmx:load", function (event) {
    setUp(event.detail.elt);
  });
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { setUp(document); });
  } else {
    setUp(document);
  }

  // ---- The full-size viewer: a frame's image scaled up (nearest neighbour, so a small
  // frame stays sharp), its caption, previous / next with the arrow keys, a PNG download.
  // Frames are read from the strip each time, so a redraw or a new frame shows at once.
  var viewer = document.getElementById("frame-viewer");
  var shown = -1;
  var opener = null;

  function viewable() {
    return Array.prototype.slice.call(document.querySelectorAll("#frames-strip a.frame-open"));
  }

  function showFrame(index) {
    var links = viewable();
    if (!viewer || !links.length) return;
    shown = Math.max(0, Math.min(index, links.length - 1));
    var link = links[shown];
    var image = link.querySelector("img");
    var number = link.dataset.number;
    document.getElementById("viewer-title").textContent = "Frame " + number + " of " + document.querySelectorAll("#frames-strip li.frame").length;
    var big = document.getElementById("viewer-image");
    big.src = link.getAttribute("href");
    big.alt = image ? image.alt : "";
    var figure = link.closest("figure");
    var caption = figure ? figure.querySelector("figcaption") : null;
    document.getElementById("viewer-caption").textContent = caption ? caption.getAttribute("title") : "";
    var download = document.getElementById("viewer-download");
    download.href = link.getAttribute("href");
    download.setAttribute("download", "frame-" + String(number).padStart(2, "0") + ".png");
    document.getElementById("viewer-prev").disabled = shown === 0;
    document.getElementById("viewer-next").disabled = shown === links.length - 1;
  }

  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a.frame-open") : null;
    if (link && viewer && viewer.showModal && !event.ctrlKey && !event.metaKey && !event.shiftKey) {
      event.preventDefault();
      opener = link;
      showFrame(viewable().indexOf(link));
      viewer.showModal();
      return;
    }
    if (!viewer || !viewer.open) return;
    if (event.target.id === "viewer-prev") showFrame(shown - 1);
    else if (event.target.id === "viewer-next") showFrame(shown + 1);
    else if (event.target.id === "viewer-close") viewer.close();
  });

  document.addEventListener("keydown", function (event) {
    if (!viewer || !viewer.open) return;
    if (event.key === "ArrowLeft") { event.preventDefault(); showFrame(shown - 1); }
    if (event.key === "ArrowRight") { event.preventDefault(); showFrame(shown + 1); }
  });

  if (viewer) {
    viewer.addEventListener("close", function () {
      // Back to where the user was; the link may have been re-rendered meanwhile.
      var links = viewable();
      var target = links[shown] || opener;
      if (target && document.body.contains(target)) target.focus();
    });
  }
})();
