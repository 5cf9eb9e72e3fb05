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
  });

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
    storyDraft = {
      title: form.elements.title ? form.elements.title.value : "",
      captions: form.elements.captions ? form.elements.captions.value : "",
      cast: Array.prototype.filter.call(form.querySelectorAll("input[name=character_id]"), function (box) {
        return box.checked;
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
    });
  });
})();
