// storygpt-v studio: small progressive enhancements. Every form works without this file;
// the server checks everything again and its messages win.
//
// - Portrait fields (input[type=file][data-preview]) inside a .dropzone accept dropped files
//   and show a preview, and say at once when a file is too large, not an image, or has too
//   many pixels (the limits come from the zone's data-max-bytes / data-max-side).
// - A portrait already known to be refused is not uploaded: the submit is stopped and the
//   field focused.
// - Alt+ArrowUp / Alt+ArrowDown in a caption moves it (the same as its Up / Down buttons);
//   Enter in a caption saves it (captions are one line; Shift+Enter is refused by the server
//   with a message, as without this file).
// - Buttons marked aria-disabled (the first caption's Up, the last one's Down) stay
//   focusable but do nothing.
// - When the Stories section is refreshed because the characters changed, the new-story form
//   keeps what the user had typed and ticked (the refresh only adds or drops cast choices).
// - The characters the new story's captions name (the server finds them, as it finds
//   mentions, and lists them in #story-draft-notes) are ticked as its cast, unless the user
//   ticked or unticked that box by hand.
// - A field the server marked invalid stops saying so as soon as it is edited; the server
//   checks it again on the next submit.
// Handlers are delegated from the document, so sections swapped in by HTMX need no setup.
(function () {
  "use strict";

  var TYPES = ["image/png", "image/jpeg", "image/webp"];

  function errorElement(input) {
    return document.getElementById(input.id + "-error");
  }

  function setError(input, message) {
    var target = errorElement(input);
    if (target) target.textContent = message;
    if (message) {
      input.setAttribute("aria-invalid", "true");
      input.dataset.clientError = "true";
    } else {
      input.removeAttribute("aria-invalid");
      delete input.dataset.clientError;
    }
  }

  function mib(bytes) {
    return (bytes / (1024 * 1024)).toFixed(1) + " MiB";
  }

  function check(input) {
    var zone = input.closest(".dropzone");
    var preview = document.getElementById(input.dataset.preview);
    var maxBytes = Number(zone && zone.dataset.maxBytes) || 10 * 1024 * 1024;
    var maxSide = Number(zone && zone.dataset.maxSide) || 4096;
    var file = input.files && input.files[0];
    if (preview && preview.src) {
      URL.revokeObjectURL(preview.src);
      preview.removeAttribute("src");
      preview.hidden = true;
    }
    if (!file) {
      setError(input, "");
      return;
    }
    if (TYPES.indexOf(file.type) < 0) {
      setError(input, "The portrait must be a PNG, JPEG or WebP image; " + file.name + " is not.");
      return;
    }
    if (file.size > maxBytes) {
      setError(input, "The portrait is " + mib(file.size) + "; the limit is " + mib(maxBytes) + ".");
      return;
    }
    setError(input, "");
    if (!preview) return;
    preview.onload = function () {
      var w = preview.naturalWidth, h = preview.naturalHeight;
      if (w > maxSide || h > maxSide) {
        setError(input, "The image is " + w + "x" + h + " px; at most " + maxSide + " px a side is accepted.");
      }
    };
    preview.onerror = function () {
      preview.hidden = true;
      setError(input, "The image could not be read; choose another file.");
    };
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  }

  document.addEventListener("change", function (event) {
    var input = event.target;
    if (input.matches && input.matches("input[type=file][data-preview]")) check(input);
    if (input.matches && input.matches("#stories input[name=character_id]")) {
      input.dataset.touched = "true";
    }
  });

  // A server-side message next to a field is about what was submitted; once the field is
  // edited it no longer applies (client-side file checks manage their own messages).
  function clearServerError(field) {
    if (!field.matches || field.getAttribute("aria-invalid") !== "true" || field.dataset.clientError) return;
    field.removeAttribute("aria-invalid");
    (field.getAttribute("aria-describedby") || "").split(/\s+/).forEach(function (id) {
      var el = id && /-error$/.test(id) ? document.getElementById(id) : null;
      if (el) el.textContent = "";
    });
  }
  ["input", "change"].forEach(function (type) {
    document.addEventListener(type, function (event) {
      if (event.target.type !== "file") clearServerError(event.target);
    });
  });

  // Ticks the cast boxes of the characters the captions name (ids in data-named-ids),
  // leaving alone any box the user set by hand; unticks only boxes it ticked itself.
  function tickNamed() {
    var notes = document.getElementById("story-draft-notes");
    var form = storyForm(document.getElementById("stories"));
    if (!notes || !form) return;
    var named = (notes.dataset.namedIds || "").split(",").filter(Boolean);
    form.querySelectorAll("input[name=character_id]").forEach(function (box) {
      if (box.dataset.touched) return;
      if (named.indexOf(box.value) >= 0) {
        if (!box.checked) box.dataset.auto = "true";
        box.checked = true;
      } else if (box.dataset.auto) {
        // Ticked here for a name since deleted from the captions.
        box.checked = false;
        delete box.dataset.auto;
      }
    });
  }

  // After any swap: the notes may be new (an outerHTML swap replaces the element the event
  // names, so the event's element is not a reliable test).
  document.addEventListener("htmx:afterSwap", tickNamed);
  document.addEventListener("DOMContentLoaded", tickNamed);

  function zoneOf(event) {
    return event.target.closest ? event.target.closest(".dropzone") : null;
  }

  ["dragenter", "dragover"].forEach(function (type) {
    document.addEventListener(type, function (event) {
      var zone = zoneOf(event);
      if (!zone) return;
      event.preventDefault();
      zone.classList.add("dragging");
    });
  });

  document.addEventListener("dragleave", function (event) {
    var zone = zoneOf(event);
    if (zone && !zone.contains(event.relatedTarget)) zone.classList.remove("dragging");
  });

  document.addEventListener("drop", function (event) {
    var zone = zoneOf(event);
    if (!zone) return;
    event.preventDefault();
    zone.classList.remove("dragging");
    var input = zone.querySelector("input[type=file]");
    if (!input || !event.dataTransfer || !event.dataTransfer.files.length) return;
    var files = new DataTransfer();
    files.items.add(event.dataTransfer.files[0]);
    input.files = files.files;
    check(input);
    input.focus();
  });

  // Capture phase, so a refused portrait stops the submit before HTMX sends it.
  document.addEventListener("submit", function (event) {
    var bad = event.target.querySelector("input[data-client-error]");
    if (bad) {
      event.preventDefault();
      event.stopPropagation();
      bad.focus();
    }
  }, true);

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button[aria-disabled=true]") : null;
    if (button) {
      event.preventDefault();
      event.stopPropagation();
    }
  }, true);

  document.addEventListener("keydown", function (event) {
    var field = event.target;
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing &&
        field.matches && field.matches("textarea[name=caption]") && field.form) {
      event.preventDefault();
      field.form.requestSubmit();
      return;
    }
    if (!event.altKey || (event.key !== "ArrowUp" && event.key !== "ArrowDown")) return;
    var item = event.target.closest ? event.target.closest(".caption-item") : null;
    if (!item) return;
    var button = item.querySelector(event.key === "ArrowUp" ? "button[value=up]" : "button[value=down]");
    if (!button || button.getAttribute("aria-disabled") === "true") return;
    event.preventDefault();
    // Focus stays in the caption: HTMX gives it back to the element with the same id after
    // the swap, so the user can keep moving it.
    button.click();
  });

  // The Stories section reloads itself (GET) when a character is added, renamed or deleted.
  // Read the draft when the response arrives, not when the request left, so a box ticked
  // while the request was in flight is not lost.
  var storyDraft = null;

  function storyForm(section) {
    return section ? section.querySelector("form[hx-post='/ui/stories']") : null;
  }

  document.addEventListener("htmx:beforeSwap", function (event) {
    var detail = event.detail;
    storyDraft = null;
    if (!detail.shouldSwap || !detail.elt || detail.elt.id !== "stories") return;
    if (detail.requestConfig.verb !== "get") return;
    var form = storyForm(detail.elt);
    if (!form) return;
    var boxes = form.querySelectorAll("input[name=character_id]");
    storyDraft = {
      title: form.elements.title ? form.elements.title.value : "",
      captions: form.elements.captions ? form.elements.captions.value : "",
      cast: Array.prototype.filter.call(boxes, function (box) {
        return box.checked;
      }).map(function (box) { return box.value; }),
      touched: Array.prototype.filter.call(boxes, function (box) {
        return box.dataset.touched;
      }).map(function (box) { return box.value; }),
    };
  });

  document.addEventListener("htmx:afterSwap", function () {
    if (!storyDraft) return;
    var draft = storyDraft;
    storyDraft = null;
    var form = storyForm(document.getElementById("stories"));
    if (!form) return;
    if (form.elements.title) form.elements.title.value = draft.title;
    if (form.elements.captions) form.elements.captions.value = draft.captions;
    form.querySelectorAll("input[name=character_id]").forEach(function (box) {
      if (draft.cast.indexOf(box.value) >= 0) box.checked = true;
      if (draft.touched.indexOf(box.value) >= 0) box.dataset.touched = "true";
    });
    // A character just added may be one the captions name: ask again which they are.
    var captions = form.elements.captions;
    if (captions && captions.value.trim() && window.htmx) {
      window.htmx.ajax("POST", "/ui/stories/draft", {
        source: captions, target: "#story-draft-notes", swap: "outerHTML",
      });
    }
  });
})();
