/*
 * Search on a site opened from disk (file://), with no network.
 *
 * Material's search runs in a Web Worker, and browsers refuse to start a worker from a file://
 * page, so the theme hides the search box there. Material's `offline` plugin inlines the search
 * index into search/search_index.js and, unless a polyfill whose address contains
 * "iframe-worker" is listed in `extra.polyfills`, adds one loaded from a CDN at view time.
 * This file is that polyfill, written for this site and loaded from the site itself: on file://
 * pages only, `Worker` becomes a stand-in that runs the worker's script in a hidden iframe of the
 * same page and passes messages both ways as a worker would. Served over http(s), nothing
 * changes.
 */
(function () {
  "use strict";
  if (location.protocol !== "file:" || typeof document === "undefined") {
    return;
  }

  function FileWorker(url) {
    var target = new EventTarget(); // where the page listens for the worker's answers
    var pending = [];
    var ready = false;
    var frame = document.createElement("iframe");
    frame.hidden = true;
    frame.setAttribute("aria-hidden", "true");
    document.documentElement.appendChild(frame);
    var scope = frame.contentWindow;

    // What the worker's script sees as its global functions.
    scope.postMessage = function (data) {
      var event = new MessageEvent("message", { data: data });
      target.dispatchEvent(event);
      if (typeof self.onmessage === "function") {
        self.onmessage(event);
      }
    };
    scope.importScripts = function () {
      var urls = Array.prototype.slice.call(arguments);
      return urls.reduce(function (previous, next) {
        return previous.then(function () {
          return load(new URL(next, url).href);
        });
      }, Promise.resolve());
    };

    function load(src) {
      return new Promise(function (resolve, reject) {
        var script = scope.document.createElement("script");
        script.src = src;
        script.onload = resolve;
        script.onerror = reject;
        scope.document.head.appendChild(script);
      });
    }

    function deliver(data) {
      scope.dispatchEvent(new scope.MessageEvent("message", { data: data }));
    }

    load(new URL(url, location.href).href).then(function () {
      ready = true;
      pending.splice(0).forEach(deliver);
    });

    var self = this;
    this.onmessage = null;
    this.postMessage = function (data) {
      var copy = structuredClone(data);
      if (ready) {
        deliver(copy);
      } else {
        pending.push(copy);
      }
    };
    this.addEventListener = target.addEventListener.bind(target);
    this.removeEventListener = target.removeEventListener.bind(target);
    this.dispatchEvent = target.dispatchEvent.bind(target);
    this.terminate = function () {
      frame.remove();
    };
  }

  window.Worker = FileWorker;
})();
