"""The web app (`tokenbooth ui`): personalize, generate and manage subjects in a browser.

    workspace.py   the app's folder: subjects (adapter folders), uploads checks, generations, zips
    jobs.py        the training queue: one `tokenbooth train` child process at a time, FIFO, resumable
    lock.py        one server per workspace: a second `tokenbooth ui` on it refuses
    child.py       how that child runs (it dies with the server)
    progress.py    per-stage progress and time left, read from a run's log.jsonl
    models.py      loaded backbones and drawing through `sampling.draw`
    panels.py      what the page shows, as plain values
    handlers.py    what each click does, as plain functions of the server's state and the form's values
    app.py         the Gradio page: three tabs laid out and wired to the handlers

Gradio is an optional dependency (`pip install 'tokenbooth[ui]'`); only app.py imports it, and only
`tokenbooth ui` imports app.py (after checking Gradio is there), so everything else here works without it.
"""
