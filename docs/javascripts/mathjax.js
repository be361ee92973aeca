// MathJax 3 settings for pymdownx.arithmatex (generic mode): typeset only the
// `arithmatex` spans and blocks, written as \( \) and \[ \]. MathJax itself is copied
// into the site at build time from an installed package (docs/hooks.py).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
  svg: { fontCache: "global" },
};
