"""Running a recipe: the pipeline (``pipeline``), run folders and side-by-side comparison
(``folders``), and plots."""
