// Render the math that pymdownx.arithmatex (generic mode) leaves as \( ... \) and \[ ... \],
// with the KaTeX bundled in docs/assets/katex: the site needs no network to show its formulas.
(function () {
  function render(root) {
    renderMathInElement(root, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(function (_) { render(document.body); });  // Material's page-load stream
  } else {
    document.addEventListener("DOMContentLoaded", function () { render(document.body); });
  }
})();
