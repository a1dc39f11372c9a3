"""The studio: the whole run in a browser (`qlora-kit studio`), a view over the command line, not a second engine.

It writes a recipe TOML, runs the same `qlora-kit` commands as child processes and reads what they write into the run
directory. One job per module:

    cli.py        `qlora-kit studio`: options, the safety checks (loopback or --auth), then launch
    workspace.py  paths typed into the page, confined to the workspace root and the model caches; uploads
    form.py       recipe keys <-> form values <-> TOML (the form is generated from recipe.field_docs)
    fit.py        "Will it fit?": the planner's estimate for a card, as the page shows it
    runs.py       child processes (start, SIGINT stop, resume, jobs) and reading a run directory
    chat.py       base vs fine-tuned replies, streamed from two `qlora-kit chat` children
    i18n.py       English and Chinese texts of the page
    charts.py     the Train screen's live charts, as small SVG pictures made from metrics.jsonl
    views.py      what the other screens show, made from run files: preview rows, status, results, GGUF advice
    make_data_screen.py  "Make data from documents": `qlora-kit make-data` as a child, its chunks, progress, review
    make_data_views.py   that screen's command from its fields, and what it shows from the job's files
    app.py        the Gradio Blocks layout and its events (errors painted under the fields they concern)
    measure.py    `python -m qlora_kit.studio.measure`: the performance figures docs/studio.md reports

Gradio is imported only by app.py (and cli.py's launch) when the page is built: `qlora-kit studio --help` answers at
once.
"""
