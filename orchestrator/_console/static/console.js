// The console's only script (the CSP allows no inline code). Without it every page still
// works: forms post and redirect, and a run page shows the run as it was when loaded.
(function () {
  "use strict";

  const POLL_MS = 1000;

  function flash(text, ok) {
    const box = document.getElementById("flash");
    if (!box || !text) return;
    box.textContent = text; // text, never markup: messages may quote user input
    box.className = "flash " + (ok ? "flash-ok" : "flash-error");
    box.hidden = false;
  }

  // A run page: re-fetch its parts while the run is not finished; replace a part only
  // when its version changed, so a comment being typed is not wiped every second.
  const run = document.querySelector("[data-live-url]");
  let timer = null;

  // A scrolled list (the timeline) keeps showing its newest entries if it was showing them.
  function atEnd(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 40;
  }

  function apply(doc) {
    Object.entries(doc.parts || {}).forEach(function ([name, part]) {
      const el = document.querySelector('[data-part="' + name + '"]');
      if (el && el.dataset.version !== part.version) {
        const following = atEnd(el);
        el.innerHTML = part.html; // rendered and escaped by the server's templates
        el.dataset.version = part.version;
        if (following) el.scrollTop = el.scrollHeight;
      }
    });
    const inbox = document.getElementById("inbox-count");
    if (inbox && typeof doc.inbox === "number") {
      inbox.textContent = String(doc.inbox);
      inbox.hidden = doc.inbox === 0;
    }
    run.dataset.status = doc.status;
    run.dataset.terminal = doc.terminal ? "yes" : "no";
  }

  async function poll() {
    timer = null;
    let again = true;
    try {
      const response = await fetch(run.dataset.liveUrl, {
        headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store",
      });
      if (response.ok) {
        const doc = await response.json();
        apply(doc);
        again = !doc.terminal;
      } else if ([401, 403, 404].includes(response.status)) {
        again = false; // signed out, or the run is gone: nothing more to show
      }
    } catch (err) {
      // the console restarting or the network blinking: try again next tick
    }
    if (again) timer = setTimeout(poll, POLL_MS);
  }

  function pollNow() {
    if (!run) return;
    if (timer !== null) clearTimeout(timer);
    poll();
  }

  if (run && run.dataset.terminal !== "yes") {
    const timeline = document.querySelector('[data-part="timeline"]');
    if (timeline) timeline.scrollTop = timeline.scrollHeight; // a live run: show its latest
    timer = setTimeout(poll, POLL_MS);
  }

  // Forms marked data-async post with fetch and stay on the page (the live view shows the
  // effect); the server answers JSON when asked for it.
  document.addEventListener("submit", async function (event) {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-async")) return;
    event.preventDefault();
    const submitter = event.submitter;
    const action = submitter && submitter.hasAttribute("formaction") ? submitter.formAction : form.action;
    const body = new URLSearchParams(new FormData(form, submitter));
    const buttons = form.querySelectorAll("button");
    buttons.forEach(function (b) { b.disabled = true; });
    try {
      const response = await fetch(action, {
        method: "POST", body: body, credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      const doc = await response.json().catch(function () { return {}; });
      flash(doc.message || doc.error || ("The console answered " + response.status), response.ok);
    } catch (err) {
      flash("The console did not answer; try again.", false);
    } finally {
      buttons.forEach(function (b) { b.disabled = false; });
    }
    pollNow();
  });

  // A select marked data-autosubmit filters as soon as it changes.
  document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });
})();
