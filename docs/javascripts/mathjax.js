// MathJax 3 settings. It typesets the formulas that pymdownx.arithmatex marks (generic
// mode: \( \) and \[ \]) and those of the notebooks' Markdown cells ($ $ and $$ $$);
// code is never touched, and the docs test keeps a bare $ out of the pages' text. MathJax
// itself is copied into the site at build time from an installed package (docs/hooks.py).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  svg: { fontCache: "global" },
};
