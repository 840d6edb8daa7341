// Shipline console: live fragments and copy buttons. No framework, no build step.
(function () {
  "use strict";

  // An element with data-live="<url>" is re-fetched and swapped in place: every 1.5 s while the
  // fragment inside says data-running="1" (a build or deploy in motion), every 10 s otherwise.
  function watch(box) {
    var url = box.getAttribute("data-live");
    function running() {
      var inner = box.querySelector("[data-running]");
      return inner && inner.getAttribute("data-running") === "1";
    }
    function tick() {
      if (document.hidden) { return schedule(); }
      fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (resp) {
          if (resp.redirected && resp.url.indexOf("/console/login") !== -1) {
            window.location.href = resp.url;
            return null;
          }
          return resp.ok ? resp.text() : null;
        })
        .then(function (html) {
          if (html !== null && html !== undefined && html !== box.innerHTML) {
            var open = Array.prototype.map.call(box.querySelectorAll("details[open]"), function (d) {
              return d.textContent.slice(0, 80);
            });
            box.innerHTML = html;
            box.querySelectorAll("details").forEach(function (d) {
              if (open.indexOf(d.textContent.slice(0, 80)) !== -1) { d.open = true; }
            });
          }
        })
        .catch(function () { /* the next tick tries again */ })
        .then(schedule);
    }
    function schedule() { window.setTimeout(tick, running() ? 1500 : 10000); }
    schedule();
  }

  function copyText(text, button) {
    function done() {
      var old = button.textContent;
      button.textContent = "Copied";
      window.setTimeout(function () { button.textContent = old; }, 1500);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
    } else {
      fallback(text);
      done();
    }
  }

  function fallback(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing more to try */ }
    document.body.removeChild(area);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-copy]") : null;
    if (!button) { return; }
    var target = document.querySelector(button.getAttribute("data-copy"));
    if (target) { copyText(target.textContent.trim(), button); }
  });

  document.querySelectorAll("[data-live]").forEach(watch);
})();
