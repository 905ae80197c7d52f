"""The web app (`tokenbooth ui`): personalize, generate and manage subjects in a browser.

    workspace.py   the app's folder: subjects (adapter folders), uploads checks, generations, zips
    jobs.py        the training queue: one `tokenbooth train` child process at a time, FIFO, resumable
    child.py       how that child runs (it dies with the server)
    progress.py    per-stage progress and time left, read from a run's log.jsonl
    models.py      loaded backbones and drawing through `sampling.draw`
    panels.py      what the page shows, as plain values
    app.py         the Gradio page: three tabs wired to the above

Gradio is an optional dependency (`pip install 'tokenbooth[ui]'`); nothing here imports it at module level
except app.py's functions.
"""
